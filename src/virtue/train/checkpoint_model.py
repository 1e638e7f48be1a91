"""A `checkpoint-N/` folder of a training run as a model: the starting weights rebuilt from the run's config
(checked against the stored fingerprint of the frozen weights), the trainable tensors of step N loaded on top,
adapters merged or kept. This is what `from_pretrained`, `virtue eval --model outputs/run/checkpoint-500` and
`virtue export` use."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from virtue.config import CompatConfig
from virtue.errors import CheckpointError
from virtue.model.embedder import VirtueModel
from virtue.model.loaders import CheckpointLoader
from virtue.processing.batch import VirtueProcessor
from virtue.train.adapters import merge_adapters as merge_adapter_weights
from virtue.train.build import build_model, frozen_fingerprint, prepare_for_training
from virtue.train.config import TrainConfig
from virtue.train.state import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, load_trainable, read_state


def is_training_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_training_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    merge_adapters: bool = True,
    allow_hub: bool = True,
    compat: CompatConfig | None = None,
    float32_modules: Sequence[str] = (),
) -> VirtueModel:
    """The model of a training run at the checkpoint's step.

    merge_adapters: True folds the adapters into the weights (computed in float32, stored in `dtype`): a plain
        model that runs at full speed. False keeps the run's own form (adapters in float32, autocast under mixed
        precision): bit-for-bit the model that was training; `dtype` is then ignored.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path / CONFIG_FILE}: missing; checkpoints written before this file existed hold "
                              "only trainable tensors and cannot be rebuilt on their own")
    cfg = TrainConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    state = read_state(path)
    model = build_model(cfg, allow_hub=allow_hub)
    prepare_for_training(model, cfg)
    expected = state.get("frozen_sha256")
    if expected is not None and frozen_fingerprint(model) != expected:
        raise CheckpointError(
            f"{path}: the starting weights rebuilt from {path / CONFIG_FILE} (model section: "
            f"{json.dumps({k: v for k, v in json.loads((path / CONFIG_FILE).read_text())['model'].items() if v})}) "
            "differ from those the run trained on; the base checkpoint has changed or moved"
        )
    load_trainable(path, model)
    if compat is not None:
        model.config = model.config.replace(compat=compat)
        model.processor = VirtueProcessor(model.config, model.processor.tokenizer)
    if merge_adapters:
        merged_for_inference(model, dtype, float32_modules)
    model.to(device=device)
    return model.eval()


def merged_for_inference(model: VirtueModel, dtype: torch.dtype, float32_modules: Sequence[str] = ()) -> VirtueModel:
    """Fold the adapters in, in place: a plain model with every weight in `dtype` (except `float32_modules`), no
    autocast. The merge is computed in float32 (peft adds the update to the base weight in the adapters' dtype)
    and stored once in `dtype`, so a float32 export keeps updates a bfloat16 base weight could not hold."""
    model.autocast_dtype = None
    if dtype == torch.float32:
        model.float()
    merge_adapter_weights(model)
    model.requires_grad_(False)
    for name, module in model.named_children():
        module.to(dtype=torch.float32 if name in float32_modules else dtype)
    return model


# `VirtueModel.from_pretrained("run/checkpoint-500")` finds this through the `virtue.checkpoint_loaders` entry point
# (pyproject.toml), so the model package never imports training code.
TRAINING_CHECKPOINTS = CheckpointLoader("training", is_training_checkpoint, load_training_checkpoint)
