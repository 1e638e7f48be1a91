"""Training checkpoints: everything needed to continue exactly — trainable weights, optimiser, scheduler,
RNG states, data position, step. Tensors in safetensors; the optimiser through weights-only torch.load."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from virtue.errors import CheckpointError

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"


@dataclass
class Resumable:
    """The live objects a checkpoint captures."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: Any  # has state_dict() / load_state_dict()


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out_dir: Path, step: int, live: Resumable, extra: dict | None = None, keep: int = 2) -> Path:
    path = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in live.model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / WEIGHTS_FILE))
    torch.save(live.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    save_file(_torch_rng(), str(tmp / RNG_FILE))
    state = {
        "step": step,
        "scheduler": live.scheduler.state_dict(),
        "sampler": live.sampler.state_dict(),
        "python_rng": _python_rng(),
        "numpy_rng": _numpy_rng(),
        **(extra or {}),
    }
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint is complete or absent, never half written
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, live: Resumable) -> dict:
    """Restore `live` in place from `path`; returns the saved state dict (step, extras)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        weights = load_file(str(path / WEIGHTS_FILE))
        optimizer = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        rng = load_file(str(path / RNG_FILE))
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read the training checkpoint ({exc})") from exc
    params = {n: p for n, p in live.model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        diff = sorted(set(params) ^ set(weights))[:5]
        raise CheckpointError(f"{path / WEIGHTS_FILE}: trainable parameters differ from this config's: {diff}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    live.optimizer.load_state_dict(optimizer)
    live.scheduler.load_state_dict(state["scheduler"])
    live.sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_to_tuple(state["python_rng"]))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def _torch_rng() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _to_tuple(value: list) -> tuple:
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
