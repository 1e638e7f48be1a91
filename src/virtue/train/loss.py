"""InfoNCE over in-batch targets plus optional per-query hard negatives, gathered across processes.

    logits[i] = [q_i . t_j / tau for every target j in the global batch] + [q_i . n_ik / tau for k < K_i]
    loss      = mean_i  CE(logits[i], target = i * (N_t / N_q))

q, t and n are L2-normalised embeddings; tau is fixed (0.02 in the paper). Without negatives this is the
official loss (virtue-spec §4.1): one direction (query -> target), no symmetric term.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 0.02,
    negatives: torch.Tensor | None = None,
    negatives_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss.

    Args:
        queries: [N_q, D]; targets: [N_t, D] with N_t a multiple of N_q (query i's positive is target
            i * N_t / N_q, as in the official code).
        negatives: [N_q, K, D] hard negatives of each query, or None.
        negatives_mask: [N_q, K] bool, False where a query has fewer than K negatives (padding).
    """
    logits = queries @ targets.T  # [N_q, N_t]
    if negatives is not None and negatives.shape[1] > 0:
        extra = torch.einsum("qd,qkd->qk", queries, negatives)  # [N_q, K]
        if negatives_mask is not None:
            extra = extra.masked_fill(~negatives_mask, float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    step = targets.shape[0] // queries.shape[0]
    labels = torch.arange(queries.shape[0], device=queries.device) * step
    return F.cross_entropy(logits / temperature, labels)


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All processes' rows, in rank order; only this process's own slice carries a gradient.

    Gradients are then summed across processes by the caller (`all_reduce_gradients`), which is what DDP
    averaging does to a loss multiplied by the world size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def all_reduce_gradients(params, bucket_elements: int = 1 << 24) -> None:
    """Sum the gradients of trainable parameters over processes (each holds d loss / d its own rows).

    Every process reduces the same list of tensors in the same order: a parameter this process's rows did not
    reach (no image in its share, say) contributes zeros instead of being skipped, which would leave the
    processes issuing different collectives (a hang). Gradients travel in flat buckets of one dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if buckets and buckets[-1][0].dtype == p.grad.dtype and size + p.numel() <= bucket_elements:
            buckets[-1].append(p.grad)
            size += p.numel()
        else:
            buckets.append([p.grad])
            size = p.numel()
    for grads in buckets:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for g in grads:
            g.copy_(flat[start : start + g.numel()].view_as(g))
            start += g.numel()
