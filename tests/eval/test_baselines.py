"""Model-free baselines: random and the "consensus caption", on SCaR's layout and on mini-SCaR's crossed layout."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from virtue.eval.baselines import caption_words, consensus_scores, random_scores
from virtue.eval.datasets import EvalQuery, load_scar_eval
from virtue.inputs import EmbedInput

MINI_SCAR = Path(__file__).resolve().parents[2].parent / "shared/data/mini-scar"


def _query(captions: list[str], images: tuple[int, ...] = ()) -> EvalQuery:
    candidates = [
        EmbedInput(text=t, image=Path("x.png")) if i in images else EmbedInput(text=t) for i, t in enumerate(captions)
    ]
    return EvalQuery.from_inputs("t", "t:0", EmbedInput(text="query"), candidates)


def hit_at_1(scores: list[np.ndarray], queries: list[EvalQuery]) -> float:
    """Ties count against the positive: rank = 1 + the number of other candidates scoring >= the positive."""
    hits = []
    for s, q in zip(scores, queries, strict=True):
        others = np.delete(s, q.positive)
        hits.append(int((others >= s[q.positive]).sum() == 0))
    return float(np.mean(hits))


def test_random_scores_are_reproducible():
    queries = [_query(["a", "b", "c"]), _query(["a", "b"])]
    first, again, other = random_scores(queries, 0), random_scores(queries, 0), random_scores(queries, 1)
    assert [s.shape for s in first] == [(3,), (2,)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_random_scores_are_near_chance():
    queries = [_query([f"c{i}" for i in range(10)]) for _ in range(4000)]
    assert abs(hit_at_1(random_scores(queries, 3), queries) - 0.1) < 0.02


def test_caption_words():
    assert caption_words("A Cat, sitting. on a mat!") == {"a", "cat", "sitting", "on", "mat"}


def test_consensus_rule():
    # Word document counts: a 3, cat 2, sitting 2, dog 1, standing 1; a word counts once per caption.
    [scores] = consensus_scores([_query(["A cat, sitting.", "a dog sitting", "a cat a standing"])])
    np.testing.assert_array_equal(scores, [2 + 1 + 1, 2 + 0 + 1, 2 + 1 + 0])


def test_consensus_image_candidates_score_zero_and_do_not_vote():
    [scores] = consensus_scores([_query(["a cat", "a dog", "a dog"], images=(2,))])
    np.testing.assert_array_equal(scores, [1, 1, 0])


OBJECTS = ["a horse", "a person", "a dog", "a cup", "an oven", "a bus", "a clock", "a chair"]
RELATIONS = ["to the left of a tree", "to the right of a tree", "above a table", "below a table", "next to a car"]
SCENES = ["in a kitchen", "on a city street", "at the beach", "in a forest", "at a zoo", "on a tennis court"]


def _scar_layout_query(rng: random.Random) -> EvalQuery:
    """SCaR's layout: the positive, then 3 scene, 3 relation and 3 object swaps, each changing one part."""
    obj, rel, scene = rng.choice(OBJECTS), rng.choice(RELATIONS), rng.choice(SCENES)
    others = [[v for v in values if v != true] for values, true in ((OBJECTS, obj), (RELATIONS, rel), (SCENES, scene))]
    negatives = [f"{obj} {rel} {s}" for s in rng.sample(others[2], 3)]
    negatives += [f"{obj} {r} {scene}" for r in rng.sample(others[1], 3)]
    negatives += [f"{o} {rel} {scene}" for o in rng.sample(others[0], 3)]
    return _query([f"{obj} {rel} {scene}", *negatives])


def test_consensus_finds_the_positive_in_scar_layout():
    rng = random.Random(0)
    queries = [_scar_layout_query(rng) for _ in range(200)]
    assert hit_at_1(consensus_scores(queries), queries) == 1.0


def test_consensus_is_near_chance_on_mini_scar():
    queries = load_scar_eval(MINI_SCAR / "mini_scar.parquet", MINI_SCAR, task="mini-scar", variant="text_only")
    scores = consensus_scores(queries)
    strict = hit_at_1(scores, queries)
    # With ties broken at random instead, the positive wins 1 / (size of its tie) when nothing beats it.
    shared = [0.0 if (s[1:] > s[0]).any() else 1 / (1 + int((s[1:] == s[0]).sum())) for s in scores]
    print(f"consensus hit@1 on mini-SCaR: {strict:.1%} (ties against), {np.mean(shared):.1%} (ties shared)")
    assert len(queries) == 72
    assert strict < 0.3
    assert np.mean(shared) == pytest.approx(0.125, abs=0.05)
