"""Run by tests/train/test_distributed.py under torchrun: `train()` from a config file, optionally stopped or
resumed; rank 0 writes the losses of the steps it ran, every rank `<out>.rank<R>.json`: a digest of the torch
generator state at each dropout draw it made (its dropout stream, comparable between ranks and runs)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from virtue.train.config import TrainConfig  # noqa: E402
from virtue.train.trainer import train  # noqa: E402


def record_dropout_stream() -> list[str]:
    """Digests of the CPU generator state before each active dropout call of this process. `nn.Dropout` (LoRA's
    dropout) looks `F.dropout` up at call time, so replacing the module attribute sees every draw; the state
    before a draw fixes its mask, so equal digests mean the same masks for tensors of the same shape."""
    draws: list[str] = []
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F.dropout's own signature
        if training and p > 0:
            draws.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16])
        return original(input, p, training, inplace)

    F.dropout = dropout
    return draws


def main(config: str, out: str, stop: int, resume: bool) -> None:
    draws = record_dropout_stream()
    cfg = TrainConfig.load(config)
    result = train(cfg, resume=resume, stop_at_step=stop or None, show_progress_bar=False)
    import torch.distributed as dist

    rank = dist.get_rank()
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"dropout_draws": draws}))
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "steps": result.steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume")
