"""Run by tests/train/test_distributed.py under torchrun: one GradCache step on this rank's share of a batch,
gradients summed over ranks; rank 0 writes the loss and gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import FIXTURE  # noqa: E402
from tests.train.helpers import grads, mixed_batch, tiny_trainable  # noqa: E402
from virtue.train.gradcache import ContrastiveBatch, gradcache_step  # noqa: E402
from virtue.train.loss import all_reduce_gradients, info_nce  # noqa: E402
from virtue.train.trainer import _distributed  # noqa: E402


def main(out: str, n: int, uneven: bool) -> None:
    procs = _distributed()
    rank, world = procs.rank, procs.world
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURE / "checkpoint"))
    model, params = tiny_trainable(tokenizer, dtype=torch.float64)
    images = {p.name: p for p in (FIXTURE / "images").iterdir()}
    full = mixed_batch(images, n=n, uneven=uneven)
    share = slice(rank * n // world, (rank + 1) * n // world)
    batch = ContrastiveBatch(full.queries[share], full.targets[share], full.negatives[share])
    loss = gradcache_step(lambda x: model(x), batch, lambda q, t, **kw: info_nce(q, t, temperature=0.05, **kw),
                          query_chunk=2, target_chunk=2)
    all_reduce_gradients(params)
    if rank == 0:
        tensors = {f"grad.{i}": g for i, g in enumerate(grads(params))}
        save_file({**tensors, "loss": loss.reshape(1)}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "uneven")
