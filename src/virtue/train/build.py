"""The model a training run starts from, made ready to train: weights from a VIRTUE checkpoint, from base models
(Qwen2-VL-Instruct + SAM2.1 + a fresh connector) or an architecture preset; adapters and unfrozen parts; mixed
precision as the official training runs it; gradient checkpointing.

Mixed precision (virtue-spec §3 "Dtypes"), for `model.dtype: bfloat16`: the frozen Qwen2-VL weights are held in
bfloat16, SAM2 in float32, and every trainable tensor (adapters, connector, anything unfrozen) in float32, so that
AdamW's small updates are not rounded away; the forward runs under `torch.autocast(bfloat16)` on CUDA and CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from virtue.config import quiet_transformers
from virtue.errors import ConfigError
from virtue.hashing import hash_tensors
from virtue.model.embedder import VirtueModel
from virtue.train.adapters import apply_trainable
from virtue.train.config import TrainConfig

# Kept in float32 under mixed precision: SAM2 runs in float32 under autocast (as officially), the connector
# trains; both are small.
FLOAT32_MODULES = ("sam", "connector")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named in the config (`model.dtype`, `output.export_dtype`: validated there)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; expected float32 or bfloat16")
    return dtype


def build_model(cfg: TrainConfig, *, allow_hub: bool = True) -> VirtueModel:
    """The starting weights, frozen parts in `model.dtype` (SAM2 and the connector in float32 when that is
    bfloat16); nothing is trainable yet."""
    section = cfg.model
    dtype = dtype_of(section.dtype)
    keep = FLOAT32_MODULES if dtype != torch.float32 else ()
    if section.path is not None:
        return VirtueModel.from_pretrained(section.path, sam_checkpoint=section.sam_checkpoint, dtype=dtype,
                                           allow_hub=allow_hub, float32_modules=keep)
    if section.base is not None:
        from virtue.config import CompatConfig

        compat = CompatConfig.official() if section.compat == "official" else CompatConfig.clean()
        return VirtueModel.from_base(section.base, sam_checkpoint=section.sam_checkpoint, seed=cfg.seed,
                                     compat=compat, dtype=dtype, float32_modules=keep, allow_hub=allow_hub)
    from transformers import AutoTokenizer

    from virtue.model import presets

    build = getattr(presets, f"{section.preset}_config", None)
    if build is None:
        raise ConfigError(f"model.preset: unknown preset {section.preset!r}; available: tiny")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(section.tokenizer)
    torch.manual_seed(cfg.seed)  # the random initialisation is part of the run
    model = VirtueModel(build(**section.preset_args), tokenizer)
    model.cast_weights(dtype, keep)
    return model


def prepare_for_training(model: VirtueModel, cfg: TrainConfig) -> list[nn.Parameter]:
    """Adapters and unfrozen parts per `cfg.trainable`, trainables in float32 and autocast under mixed
    precision, gradient checkpointing if asked. Returns the trainable parameters (what the optimiser steps)."""
    if cfg.model.gradient_checkpointing:
        _enable_checkpointing(model, cfg)
    params = apply_trainable(model, cfg.trainable)
    dtype = dtype_of(cfg.model.dtype)
    if dtype != torch.float32:
        for p in params:
            p.data = p.data.float()  # same Parameter objects: hooks and the optimiser see the float32 tensor
        model.autocast_dtype = dtype
    return params


def _enable_checkpointing(model: VirtueModel, cfg: TrainConfig) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations. Non-reentrant,
    so frozen inputs need no `requires_grad` trick and dropout is replayed from the saved RNG state."""
    towers = [model.qwen.language_model] + ([model.qwen.visual] if cfg.trainable.vision else [])
    for tower in towers:
        enable = getattr(tower, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def frozen_fingerprint(model: nn.Module) -> str:
    """sha256 of every frozen parameter and buffer (names, shapes, dtypes, bytes): a training checkpoint stores
    only what trains, so the rest must be rebuilt bit-for-bit from the config; this proves it was."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    h = hashlib.sha256()
    state = sorted(model.state_dict(keep_vars=True).items())
    hash_tensors(h, ((name, t) for name, t in state if name not in trainable))
    return h.hexdigest()


def absolute_model_section(data: dict) -> dict:
    """The config's model section with local paths made absolute, so that a checkpoint can be rebuilt from any
    working directory; hub ids stay as they are."""
    model = dict(data)
    for key in ("path", "base", "sam_checkpoint", "tokenizer"):
        value = model.get(key)
        if isinstance(value, str) and Path(value).expanduser().exists():
            model[key] = str(Path(value).expanduser().resolve())
    return model
