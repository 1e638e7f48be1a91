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
    """Where the starting weights come from: a checkpoint (`path`) or an architecture preset (`preset`,
    random weights, e.g. "tiny" with `preset_args`) plus a `tokenizer` directory."""

    path: str | None = None
    sam_checkpoint: str | None = None
    preset: str | None = None
    preset_args: dict = field(default_factory=dict)
    tokenizer: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if (self.path is None) == (self.preset is None):
            raise ConfigError("model: give exactly one of 'path' (a checkpoint) or 'preset' (random weights)")
        if self.preset is not None and self.tokenizer is None:
            raise ConfigError("model: a preset needs 'tokenizer' (a directory with tokenizer files)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype: expected float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class DataSection:
    sources: list = field(default_factory=list)
    global_batch_size: int = 64
    on_bad_row: str = "skip"
    seed: int = 42
    drop_visual_prompts: bool = False  # ablation: boxes stay in the text only (a model without SAM branch)

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources: at least one data source is needed")
        if self.on_bad_row not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_row: expected 'skip' or 'error', got {self.on_bad_row!r}")
        if self.global_batch_size < 2:
            raise ConfigError("data.global_batch_size: must be >= 2 (in-batch negatives)")


@dataclass(frozen=True)
class GradCacheSection:
    enabled: bool = True
    query_chunk: int = 2
    target_chunk: int = 2


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


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "gradcache": GradCacheSection,
    "loss": LossSection,
    "optim": OptimSection,
    "trainable": TrainableConfig,
    "output": OutputSection,
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
    """`optim.lr=1e-4` sets data['optim']['lr'] to the YAML value of the right-hand side."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)
