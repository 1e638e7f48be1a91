"""Evaluation over several processes (`torchrun`): each rank embeds a contiguous share of every task's unique
inputs, rank 0 gathers the vectors, writes the embedding cache and scores.

One process is the same code with a world of 1: every collective below is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from virtue.errors import ConfigError


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> torch.device:
    """This process's GPU under torchrun, cuda:LOCAL_RANK, when CUDA is available; else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def join_process_group(device: torch.device) -> bool:
    """Initialise the process group torchrun describes, if there is one (WORLD_SIZE > 1) and none is yet: NCCL
    with `device` made the current GPU when it is one, gloo on the CPU. Returns whether it initialised one."""
    if dist.is_initialized() or world_size() <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


@dataclass
class Ranks:
    """This process's place among the evaluation processes.

    Attributes:
        rank, world: as torch.distributed numbers them (0 and 1 without it).
        device: where tensor collectives run: CUDA under NCCL, else the CPU (gloo).
        owned: this object initialised the process group, so `close` destroys it.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @classmethod
    def setup(cls, model_device: torch.device, mode: bool | None = None) -> Ranks:
        """This process's ranks for an evaluation.

        mode: None joins the process group already initialised, or the one torchrun describes (WORLD_SIZE > 1);
            False evaluates in this process alone even inside a process group (e.g. a call from one rank of a
            training job: the other ranks would never join the collectives); True requires a group.

        The backend of a group initialised here follows the model: NCCL when it runs on CUDA (device
        cuda:LOCAL_RANK is the caller's choice, see `virtue eval`), gloo on the CPU.

        Raises:
            ConfigError: mode True without a process group or torchrun's environment.
        """
        if mode is False:
            return cls()
        owned = join_process_group(model_device)
        if not dist.is_initialized():
            if mode:
                raise ConfigError("distributed: True, but no process group is initialised and WORLD_SIZE is not > 1 "
                                  "(launch with torchrun)")
            return cls()
        device = model_device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device, owned)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous part of n items (ranks differ by at most one item)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def max(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX)

    def counts(self, value: int) -> list[int]:
        """Every rank's `value`, on every rank."""
        if self.world == 1:
            return [value]
        t = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def _reduce(self, value: int, op) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def gather_objects(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (a list by rank); None elsewhere."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rows(self, rows: np.ndarray, n: int) -> np.ndarray | None:
        """The [n, D] float32 matrix whose `share(n)` rows each rank holds, on rank 0 (None elsewhere).

        Tensors rather than pickled objects: rank 0 receives into one preallocated buffer (not a pickle per rank,
        unpickled, then concatenated).
        """
        if self.world == 1:
            return rows
        width = max(len(Ranks(r, self.world).share(n)) for r in range(self.world))
        send = torch.zeros(width, rows.shape[1], dtype=torch.float32, device=self.device)
        send[: len(rows)] = torch.from_numpy(rows).to(self.device)
        if not self.is_main:
            dist.gather(send, None, dst=0)
            return None
        buffer = torch.empty(self.world * width, rows.shape[1], dtype=torch.float32, device=self.device)
        dist.gather(send, list(buffer.split(width)), dst=0)
        keep = [r * width + i for r in range(self.world) for i in range(len(Ranks(r, self.world).share(n)))]
        return buffer[torch.tensor(keep, device=self.device)].cpu().numpy()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False
