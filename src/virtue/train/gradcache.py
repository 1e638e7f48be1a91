"""GradCache (Gao et al., 2021): a large contrastive batch at the memory cost of a small chunk.

1. Embed every chunk without gradients, recording the RNG state before each (dropout is replayed).
2. Compute the loss on the detached embeddings (gathered over processes) and its gradient with respect to
   each local embedding: the cache.
3. Re-embed each chunk with gradients under its recorded RNG state and backpropagate
   `sum(embedding * cached_grad)`, which adds exactly that chunk's share of d loss / d parameters.

The result equals one backward pass over the whole batch (tested to 1e-5). It works the same in one
process (CPU or one GPU) and under torchrun; the caller sums gradients over processes afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from virtue.inputs import EmbedInput
from virtue.train.loss import gather_with_grad

EmbedFn = Callable[[Sequence[EmbedInput]], torch.Tensor]


@dataclass
class ContrastiveBatch:
    """This process's share of a global batch. negatives[i] are query i's hard negatives (may be empty)."""

    queries: list[EmbedInput]
    targets: list[EmbedInput]
    negatives: list[list[EmbedInput]]

    def flat_negatives(self) -> tuple[list[EmbedInput], int]:
        width = max((len(n) for n in self.negatives), default=0)
        return [x for row in self.negatives for x in row], width


class RngState:
    """CPU and CUDA generator states captured before a chunk, restored for its replay."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)] if items else []


def _embed_no_grad(embed: EmbedFn, items: Sequence[EmbedInput], size: int) -> tuple[torch.Tensor | None, list]:
    reps, states = [], []
    for chunk in _chunks(items, size):
        states.append(RngState())
        with torch.no_grad():
            reps.append(embed(chunk))
    return (torch.cat(reps) if reps else None), states


def _replay(embed: EmbedFn, items, size: int, states: list[RngState], grads: torch.Tensor) -> None:
    start = 0
    for chunk, state in zip(_chunks(items, size), states, strict=True):
        with state.replay():
            reps = embed(chunk)
        surrogate = (reps * grads[start : start + len(chunk)]).sum()
        surrogate.backward()
        start += len(chunk)


def contrastive_loss(
    q: torch.Tensor, t: torch.Tensor, n: torch.Tensor | None, width: int, batch: ContrastiveBatch, loss_fn
) -> torch.Tensor:
    """Loss on this process's embeddings, gathered over processes. n holds the flat local negatives."""
    width = _global_max(width, q.device)
    negatives = mask = None
    if width:
        n = q.new_zeros(0, q.shape[1]) if n is None else n
        negatives, mask = _pad_negatives(n, batch, width)
        negatives = gather_with_grad(negatives)
        mask = gather_with_grad(mask.to(torch.uint8)).bool()  # gloo cannot gather bool tensors
    return loss_fn(gather_with_grad(q), gather_with_grad(t), negatives=negatives, negatives_mask=mask)


def _global_max(value: int, device: torch.device) -> int:
    """Processes may hold different numbers of negatives; all pad to the largest."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _pad_negatives(flat: torch.Tensor, batch: ContrastiveBatch, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, masks, start = [], [], 0
    for row in batch.negatives:
        k = len(row)
        pad = flat.new_zeros(width - k, flat.shape[1])
        rows.append(torch.cat([flat[start : start + k], pad]))
        masks.append(torch.arange(width, device=flat.device) < k)
        start += k
    return torch.stack(rows), torch.stack(masks)


def gradcache_step(
    embed: EmbedFn, batch: ContrastiveBatch, loss_fn, *, query_chunk: int, target_chunk: int
) -> torch.Tensor:
    """Accumulate d loss / d params for this process's share into `.grad`; returns the (detached) loss."""
    flat_negatives, width = batch.flat_negatives()
    q, q_states = _embed_no_grad(embed, batch.queries, query_chunk)
    t, t_states = _embed_no_grad(embed, batch.targets, target_chunk)
    n, n_states = _embed_no_grad(embed, flat_negatives, target_chunk)
    leaves = [x.detach().requires_grad_() if x is not None else None for x in (q, t, n)]
    loss = contrastive_loss(*leaves[:3], width, batch, loss_fn)
    loss.backward()
    _replay(embed, batch.queries, query_chunk, q_states, leaves[0].grad)
    _replay(embed, batch.targets, target_chunk, t_states, leaves[1].grad)
    if leaves[2] is not None:
        _replay(embed, flat_negatives, target_chunk, n_states, leaves[2].grad)
    return loss.detach()


def plain_step(embed: EmbedFn, batch: ContrastiveBatch, loss_fn) -> torch.Tensor:
    """The same loss with one forward/backward over the whole share (memory grows with the batch)."""
    flat_negatives, width = batch.flat_negatives()
    q, t = embed(batch.queries), embed(batch.targets)
    n = embed(flat_negatives) if flat_negatives else None
    loss = contrastive_loss(q, t, n, width, batch, loss_fn)
    loss.backward()
    return loss.detach()
