"""Ranking metrics against hand-computed values; ties must count against the positive."""

from __future__ import annotations

import math

import numpy as np
import pytest

from virtue.eval.metrics import (
    hit_at_k,
    mrr,
    ndcg_at_k,
    precision_at_1,
    rank_of_positive,
    ranking_metrics,
    recall_at_k,
    scores_to_ranks,
)


def test_rank_of_positive_basic_and_ties():
    assert rank_of_positive(np.array([0.9, 0.1, 0.5])) == 1
    assert rank_of_positive(np.array([0.3, 0.1, 0.5])) == 2
    assert rank_of_positive(np.array([0.1, 0.9, 0.5]), positive=2) == 2
    # Tied with one other candidate: the tie goes against the positive.
    assert rank_of_positive(np.array([0.5, 0.5, 0.1])) == 2
    assert rank_of_positive(np.array([0.1, 0.5, 0.5]), positive=2) == 2
    # All equal: the positive is last of C.
    assert rank_of_positive(np.zeros(10)) == 10
    assert rank_of_positive(np.full(7, 3.0), positive=4) == 7


def test_rank_of_positive_rejects_nan_and_bad_index():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_positive(np.array([0.5, math.nan, 0.1]))
    with pytest.raises(ValueError, match="outside"):
        rank_of_positive(np.array([0.5, 0.1]), positive=2)
    with pytest.raises(ValueError, match=r"\[C\]"):
        rank_of_positive(np.zeros((2, 3)))


def _constructed_scores() -> tuple[np.ndarray, list[int]]:
    """4 queries x 12 candidates whose positives rank 1, 2, 4 and 11 by construction."""
    scores = np.zeros((4, 12))
    positives = [0, 3, 5, 1]
    scores[0] = np.linspace(0.0, 0.5, 12)
    scores[0, 0] = 1.0  # strictly highest -> rank 1
    scores[1, 3], scores[1, 7] = 0.8, 0.9  # one candidate above -> rank 2
    scores[2, 5], scores[2, [1, 2]], scores[2, 9] = 0.6, 0.6, 0.7  # one above + two tied -> rank 1 + 1 + 2 = 4
    scores[3] = np.arange(12.0)  # the positive (score 1) is beaten by scores 2..11 -> rank 1 + 10 = 11
    return scores, positives


def test_constructed_ranks_and_metrics_by_hand():
    scores, positives = _constructed_scores()
    ranks = scores_to_ranks(scores, positives)
    assert ranks.tolist() == [1, 2, 4, 11]

    assert hit_at_k(ranks, 1) == pytest.approx(1 / 4)  # only rank 1
    assert hit_at_k(ranks, 5) == pytest.approx(3 / 4)  # ranks 1, 2, 4
    assert hit_at_k(ranks, 10) == pytest.approx(3 / 4)  # 11 > 10
    assert recall_at_k(ranks, 5) == hit_at_k(ranks, 5)
    assert precision_at_1(ranks) == pytest.approx(0.25)
    # MRR = (1/1 + 1/2 + 1/4 + 1/11) / 4 = (44 + 22 + 11 + 4) / 44 / 4 = 81 / 176 = 0.4602...
    assert mrr(ranks) == pytest.approx(81 / 176)
    # nDCG@5 = (1/log2(2) + 1/log2(3) + 1/log2(5) + 0) / 4 = (1 + 0.6309298 + 0.4306766) / 4 = 0.5154016
    assert ndcg_at_k(ranks, 5) == pytest.approx(0.5154016, abs=1e-7)
    assert ndcg_at_k(ranks, 10) == pytest.approx(0.5154016, abs=1e-7)  # rank 11 still outside
    # nDCG@1 = (1 + 0 + 0 + 0) / 4
    assert ndcg_at_k(ranks, 1) == pytest.approx(0.25)


def test_ranking_metrics_keys_and_values():
    out = ranking_metrics([1, 2, 4, 11])
    for k in (1, 5, 10):
        assert {f"hit@{k}", f"recall@{k}", f"ndcg@{k}"} <= out.keys()
    assert out["n"] == 4
    assert out["hit@1"] == out["precision@1"] == pytest.approx(0.25)
    assert out["mrr"] == pytest.approx(81 / 176)
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k != "n")


def test_scores_to_ranks_matches_a_brute_force_count():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(50, 10)).astype(float)  # small integer scores: many ties
    positives = rng.integers(0, 10, size=50)
    expected = [1 + sum(scores[q, c] >= scores[q, p] for c in range(10) if c != p) for q, p in enumerate(positives)]
    assert scores_to_ranks(scores, positives).tolist() == expected


def test_constant_model_scores_zero_not_hundred():
    scores = np.zeros((100, 10))  # a model that returns the same score for everything
    ranks = scores_to_ranks(scores, [0] * 100)
    assert (ranks == 10).all()
    metrics = ranking_metrics(ranks)
    assert metrics["hit@1"] == 0.0 <= 0.1  # at or below chance (1 / 10)
    assert metrics["mrr"] == pytest.approx(0.1)
    # The official rule (positive first, stable sort) would have ranked every positive first: 100 %.
    official = [int(np.argsort(-row, kind="stable").tolist().index(0)) + 1 for row in scores]
    assert hit_at_k(official, 1) == 1.0


def test_random_scores_are_near_chance():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((100, 10))
    positives = rng.integers(0, 10, size=100)
    metrics = ranking_metrics(scores_to_ranks(scores, positives))
    assert abs(metrics["hit@1"] - 0.1) <= 0.05


@pytest.mark.parametrize(
    ("scores", "positives", "match"),
    [
        (np.zeros(5), [0], r"\[Q, C\]"),
        (np.zeros((2, 3)), [0], "2 integer indices"),
        (np.zeros((2, 3)), [0.0, 1.0], "integer"),
        (np.zeros((2, 3)), [0, -1], "outside"),
        (np.array([[0.0, 1.0], [math.nan, 0.0]]), [0, 0], "query 1"),
    ],
)
def test_scores_to_ranks_rejects_bad_input(scores, positives, match):
    with pytest.raises(ValueError, match=match):
        scores_to_ranks(scores, positives)


@pytest.mark.parametrize("ranks", [[], [0, 1], [1.5, 2.0], [[1, 2]]])
def test_metrics_reject_bad_ranks(ranks):
    with pytest.raises(ValueError, match="ranks"):
        mrr(ranks)


def test_metrics_reject_bad_k():
    with pytest.raises(ValueError, match="k"):
        hit_at_k([1, 2], 0)
