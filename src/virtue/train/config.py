"""`TrainConfig`: one YAML file plus `section.key=value` overrides describes a training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from virtue.config import dataclass_from_dict
from virtue.errors import ConfigError
from virtue.train.adapters import TrainableConfig


@dataclass(frozen=True)
class ModelSection:
    """Where the starting weights come from — exactly one of:

    * `path`: a VIRTUE checkpoint (official layout, library layout, or a `checkpoint-N` of an earlier run),
      local folder or hub id; `sam_checkpoint` for official layouts that lack SAM2;
    * `base`: a Qwen2-VL model (e.g. `Qwen/Qwen2-VL-2B-Instruct`, folder or hub id) + SAM2.1 (`sam_checkpoint`,
      else found as for official checkpoints) + a connector initialised as officially, seeded with `seed`:
      the paper's starting point; `compat` picks the preprocessing quirks to train with (`clean`, default, or
      `official`, the released weights' quirks);
    * `preset`: an architecture preset with random weights (e.g. "tiny", `preset_args`) and a `tokenizer` folder.

    dtype: `float32`, or `bfloat16` = mixed precision as the official training (frozen Qwen2-VL weights in
        bfloat16, SAM2 and every trainable tensor in float32, forward under autocast).
    gradient_checkpointing: recompute the LLM's layers (and the ViT's, when it trains) in the backward pass.
    """

    path: str | None = None
    base: str | None = None
    preset: str | None = None
    sam_checkpoint: str | None = None
    compat: str = "clean"
    preset_args: dict = field(default_factory=dict)
    tokenizer: str | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        given = [k for k in ("path", "base", "preset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                "model: give exactly one of 'path' (a VIRTUE checkpoint), 'base' (a Qwen2-VL model to start "
                f"from) or 'preset' (random weights); got {given or 'none'}"
            )
        if self.preset is not None and self.tokenizer is None:
            raise ConfigError("model: a preset needs 'tokenizer' (a directory with tokenizer files)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype: expected float32 or bfloat16, got {self.dtype!r}")
        if self.compat not in ("clean", "official"):
            raise ConfigError(f"model.compat: expected clean or official, got {self.compat!r}")
        if self.compat != "clean" and self.base is None:
            raise ConfigError("model.compat: only for 'base' (checkpoints carry their own compatibility setting)")


@dataclass(frozen=True)
class DataSection:
    """sources: see `virtue.train.data`. global_batch_size: over all processes; every global batch comes from
    one subset. shuffle: False takes each subset's rows in file order (the official batching).
    num_workers / prefetch: DataLoader worker processes that read, decode and preprocess images ahead of the
    model (0: in the training process), and batches each worker prepares in advance.
    image_checks: when images are checked (file readable, prompts inside): `eager` all before training, `lazy`
    a sample of each subset at start and every row when first used (a bad row is reported and replaced by the
    next good row of its subset), `auto` eager up to 20,000 rows, else lazy.
    """

    sources: list = field(default_factory=list)
    global_batch_size: int = 64
    on_bad_row: str = "skip"
    seed: int = 42
    shuffle: bool = True
    num_workers: int = 2
    prefetch: int = 2
    image_checks: str = "auto"
    drop_visual_prompts: bool = False  # ablation: boxes stay in the text only (a model without SAM branch)

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources: at least one data source is needed")
        if self.on_bad_row not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_row: expected 'skip' or 'error', got {self.on_bad_row!r}")
        if self.global_batch_size < 2:
            raise ConfigError("data.global_batch_size: must be >= 2 (in-batch negatives)")
        if self.image_checks not in ("auto", "eager", "lazy"):
            raise ConfigError(f"data.image_checks: expected auto, eager or lazy, got {self.image_checks!r}")
        if self.num_workers < 0 or self.prefetch < 1:
            raise ConfigError(f"data: need num_workers >= 0 and prefetch >= 1, got {self.num_workers}, "
                              f"{self.prefetch}")


@dataclass(frozen=True)
class GradCacheSection:
    """enabled: embed the batch in chunks twice (no-grad, then replay) at the memory of one chunk.
    reuse_image_features: when the ViT and SAM2 are frozen, the replay reuses the first pass's image features
    instead of running both towers again (same values; no effect when a tower trains)."""

    enabled: bool = True
    query_chunk: int = 2
    target_chunk: int = 2
    reuse_image_features: bool = True

    def __post_init__(self):
        if self.query_chunk < 1 or self.target_chunk < 1:
            raise ConfigError("gradcache: query_chunk and target_chunk must be >= 1")


@dataclass(frozen=True)
class LossSection:
    temperature: float = 0.02
    use_hard_negatives: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature: must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 200
    max_steps: int = 1000
    max_grad_norm: float = 1.0
    schedule: str = "linear"

    def __post_init__(self):
        if self.schedule not in ("linear", "constant"):
            raise ConfigError(f"optim.schedule: expected linear or constant, got {self.schedule!r}")
        if self.max_steps < 1:
            raise ConfigError("optim.max_steps: must be >= 1")


@dataclass(frozen=True)
class OutputSection:
    dir: str = "outputs/run"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True
    export: bool = True
    export_dtype: str | None = None  # the exported model's weights; default model.dtype

    def __post_init__(self):
        if self.export_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"output.export_dtype: expected float32 or bfloat16, got {self.export_dtype!r}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("output: checkpoint_every and keep_checkpoints must be >= 1")


@dataclass(frozen=True)
class EvalSection:
    """Validation during training: every `every` steps (and at the last step), the evaluation harness
    (`virtue eval`, without its cache) runs on the current model on rank 0; hit@1 goes to metrics.jsonl.
    `every: 0` turns it off. The other keys are `virtue eval`'s."""

    every: int = 0
    benchmark: str = "scar"
    data_root: str | None = None
    image_root: str | None = None
    tasks: list | None = None
    limit: int | None = None
    batch_size: int = 16
    scar_prompt: str = "box"

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {self.every}")
        if self.every and not self.data_root:
            raise ConfigError("eval.data_root: needed when eval.every > 0")
        if self.benchmark not in ("scar", "mmeb"):
            raise ConfigError(f"eval.benchmark: expected scar or mmeb, got {self.benchmark!r}")
        if self.scar_prompt not in ("box", "box_mask"):
            raise ConfigError(f"eval.scar_prompt: expected box or box_mask, got {self.scar_prompt!r}")


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "gradcache": GradCacheSection,
    "loss": LossSection,
    "optim": OptimSection,
    "trainable": TrainableConfig,
    "output": OutputSection,
    "eval": EvalSection,
}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    gradcache: GradCacheSection = field(default_factory=GradCacheSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    output: OutputSection = field(default_factory=OutputSection)
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 42

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - set(SECTIONS) - {"seed"})
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; allowed: {sorted(SECTIONS) + ['seed']}")
        kwargs: dict[str, Any] = {"seed": data.get("seed", 42)}
        for name, section in SECTIONS.items():
            if name in data:
                kwargs[name] = dataclass_from_dict(section, data[name] or {}, name)
        if "model" not in kwargs or "data" not in kwargs:
            raise ConfigError("a training config needs 'model' and 'data' sections")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the training config ({exc})") from exc
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_override(data: dict, item: str) -> None:
    """`optim.lr=1e-4` sets data['optim']['lr'] to the YAML value of the right-hand side; a number indexes a
    list (`data.sources.0.path=my.jsonl`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth]) or 'value'} is a list of "
                                  f"{len(node)}; expected an index below {len(node)}, got {part!r}")
            index = int(part)
            if last:
                node[index] = yaml.safe_load(raw)
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is not a section")
