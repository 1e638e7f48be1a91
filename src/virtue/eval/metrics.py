"""Ranking metrics for one positive per query, with ties counted AGAINST the positive.

The official scorer puts the positive first and sorts stably, so a tie always favours it and a model that
returns the same score for every candidate reaches 100 % (virtue-spec §8.1). Here the rank of the positive is
``1 + #(other candidates scoring >= the positive)``: the same constant model ranks the positive last.

Candidates named like the positive (`rank_by_name`): the official scorer ranks candidate *names* and counts a hit
when the top name is the positive's, so a duplicate of the positive is a hit, not a tie lost. `rank_by_name`
follows it: candidates sharing the positive's name count as the positive (its score is their best), and only
candidates with another name are counted against it, ties included.

Ranks are 1-based integers. Every metric is a fraction in [0, 1]; reports multiply by 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def scores_to_ranks(scores: np.ndarray, positives: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rank of each query's positive among its own candidates.

    Args:
        scores: float array [Q, C], one row of candidate scores per query (higher = more similar).
        positives: [Q] index of the positive candidate in each row.

    Returns:
        int64 array [Q] of 1-based ranks; a positive tied with m other candidates gets rank (#strictly higher) + m + 1.

    Raises:
        ValueError: wrong shapes, a positive index out of range, or a NaN score (NaN would compare False and
            silently help the positive).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores: expected a [Q, C] array with C >= 1, got shape {scores.shape}")
    pos = np.asarray(positives)
    if pos.shape != (scores.shape[0],) or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
        raise ValueError(f"positives: expected {scores.shape[0]} integer indices, got {pos.dtype} shape {pos.shape}")
    pos = pos.astype(np.int64)
    bad = np.flatnonzero((pos < 0) | (pos >= scores.shape[1]))
    if bad.size:
        raise ValueError(f"positives[{bad[0]}] = {pos[bad[0]]} is outside 0..{scores.shape[1] - 1}")
    nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
    if nan_rows.size:
        raise ValueError(f"scores: query {nan_rows[0]} has a NaN score ({nan_rows.size} queries in all)")
    pos_scores = scores[np.arange(scores.shape[0]), pos]  # [Q]
    # The positive compares >= with itself, so the count already includes the "+1" of a 1-based rank.
    return (scores >= pos_scores[:, None]).sum(axis=1).astype(np.int64)


def rank_of_positive(scores: np.ndarray, positive: int = 0) -> int:
    """1-based rank of ``scores[positive]`` among ``scores`` [C]: 1 + number of others scoring >= it.

    Raises:
        ValueError: ``scores`` is not 1-D, ``positive`` is out of range, or a score is NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores: expected a [C] array, got shape {scores.shape}")
    return int(scores_to_ranks(scores[None, :], [positive])[0])


def rank_by_name(scores: np.ndarray, positive: int, names: np.ndarray) -> int:
    """1-based rank of the positive when candidates named like it count as the positive.

    Args:
        scores: [C] candidate scores.
        positive: index of the positive.
        names: [C] candidate names (or name ids); equal values mean the same candidate for the official scorer.

    Returns:
        1 + the number of candidates with another name scoring >= the best score among the positive's name.
        With unique names this equals `rank_of_positive`.

    Raises:
        ValueError: shapes differ, ``positive`` is out of range, or a score is NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    names = np.asarray(names)
    if scores.ndim != 1 or names.shape != scores.shape:
        raise ValueError(f"scores and names: expected two [C] arrays, got shapes {scores.shape} and {names.shape}")
    if not 0 <= positive < scores.size:
        raise ValueError(f"positive = {positive} is outside 0..{scores.size - 1}")
    if np.isnan(scores).any():
        raise ValueError(f"scores: {int(np.isnan(scores).sum())} NaN score(s)")
    same = names == names[positive]
    return 1 + int((scores[~same] >= scores[same].max()).sum())


def _as_ranks(ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ranks: expected a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 1:
        raise ValueError(f"ranks: expected integers >= 1, got dtype {arr.dtype}, min {arr.min()}")
    return arr.astype(np.int64)


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")


def hit_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """Fraction of queries whose positive ranks within the top ``k``."""
    _check_k(k)
    return float((_as_ranks(ranks) <= k).mean())


def recall_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """Recall@k; with a single positive per query it equals hit@k."""
    return hit_at_k(ranks, k)


def precision_at_1(ranks: Sequence[int] | np.ndarray) -> float:
    """Precision@1 = hit@1 for one positive: the number the paper reports (×100)."""
    return hit_at_k(ranks, 1)


def mrr(ranks: Sequence[int] | np.ndarray) -> float:
    """Mean reciprocal rank, mean of 1 / rank."""
    return float((1.0 / _as_ranks(ranks)).mean())


def ndcg_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """nDCG@k with binary relevance and one positive: 1 / log2(rank + 1) if rank <= k else 0 (ideal DCG = 1)."""
    _check_k(k)
    r = _as_ranks(ranks)
    gains = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    return float(gains.mean())


def ranking_metrics(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """All metrics for a list of ranks.

    Returns:
        ``{"hit@k", "recall@k", "ndcg@k"}`` for each k in ``ks``, plus ``"precision@1"``, ``"mrr"`` (fractions
        in [0, 1]) and ``"n"`` (the number of queries).
    """
    r = _as_ranks(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(r, k)
        out[f"recall@{k}"] = recall_at_k(r, k)
        out[f"ndcg@{k}"] = ndcg_at_k(r, k)
    out["precision@1"] = precision_at_1(r)
    out["mrr"] = mrr(r)
    out["n"] = int(r.size)
    return out
