"""Training checkpoints: everything needed to continue exactly — trainable weights, optimiser, scheduler, every
process's RNG states, data position, step — plus what is needed to rebuild the model alone (the run's config with
absolute paths and a fingerprint of the frozen weights), so that any `checkpoint-N` can be evaluated or exported.
Tensors in safetensors; the optimiser through weights-only torch.load.

Layout of `checkpoint-N/`:
    state.json              step, scheduler, data position, frozen-weight fingerprint, world size
    trainable.safetensors   every trainable tensor (adapters, connector, unfrozen parts), float32
    optimizer.pt            AdamW state (weights_only)
    rng-rank<R>.safetensors torch CPU/CUDA generator states of process R
    rng-rank<R>.json        Python and NumPy generator states of process R
    train_config.json       the run's TrainConfig, local paths made absolute
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from virtue.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "train_config.json"
LEGACY_RNG_FILE = "rng.safetensors"  # one file for all processes (rank 0's), before per-rank states


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"


@dataclass
class Resumable:
    """The live objects a checkpoint captures. `sampler` has state_dict() / load_state_dict(); its state must
    be the data position after the last step *taken* (not after batches prefetched ahead)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: Any


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _no_barrier() -> None:
    return None


def save_checkpoint(
    out_dir: Path,
    step: int,
    live: Resumable,
    extra: dict | None = None,
    keep: int = 2,
    *,
    rank: int = 0,
    barrier: Callable[[], None] = _no_barrier,
    config: dict | None = None,
) -> Path:
    """Called by every process: each writes its own RNG state, rank 0 the rest; `barrier` synchronises them.
    The folder appears complete (renamed from a temporary one) or not at all."""
    path = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors_file, json_file = rng_files(rank)
    save_file(_torch_rng(), str(tmp / tensors_file))
    (tmp / json_file).write_text(json.dumps({"python_rng": _python_rng(), "numpy_rng": _numpy_rng()}))
    barrier()
    if rank == 0:
        trainable = {n: p.detach().cpu().contiguous() for n, p in live.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / WEIGHTS_FILE))
        torch.save(live.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        state = {
            "step": step,
            "scheduler": live.scheduler.state_dict(),
            "sampler": live.sampler.state_dict(),
            **(extra or {}),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a checkpoint is complete or absent, never half written
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return path


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: cannot read the training checkpoint state ({exc})") from exc


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's trainable tensors into `model`, whose trainable set must be the same."""
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot read the trainable weights ({exc})") from exc
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        diff = sorted(set(params) ^ set(weights))[:5]
        raise CheckpointError(f"{path / WEIGHTS_FILE}: trainable parameters differ from this config's: {diff}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{path / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def load_checkpoint(path: Path, live: Resumable, *, rank: int = 0) -> dict:
    """Restore `live` and this process's RNG states in place from `path`; returns the saved state dict."""
    state = read_state(path)
    load_trainable(path, live.model)
    try:
        optimizer = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: cannot read the optimiser state ({exc})") from exc
    live.optimizer.load_state_dict(optimizer)
    live.scheduler.load_state_dict(state["scheduler"])
    live.sampler.load_state_dict(state["sampler"])
    _restore_rng(path, rank, state)
    return state


def _restore_rng(path: Path, rank: int, state: dict) -> None:
    tensors_file, json_file = rng_files(rank)
    if (path / tensors_file).is_file():
        rng = load_file(str(path / tensors_file))
        generators = json.loads((path / json_file).read_text())
    elif rank == 0 and (path / LEGACY_RNG_FILE).is_file():
        rng, generators = load_file(str(path / LEGACY_RNG_FILE)), state
    else:
        saved = state.get("world_size", "?")
        logger.warning("%s: no RNG state for process %d (saved by %s processes); dropout streams of this "
                       "process restart from the run's seed", path, rank, saved)
        return
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_to_tuple(generators["python_rng"]))
    kind, keys, pos, has_gauss, cached = generators["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _torch_rng() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()  # this process's current device
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
