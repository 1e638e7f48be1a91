"""Model-free baselines: one score vector per `EvalQuery`, higher = better, ranked like a model's scores.

They set the floor a model must beat and expose shortcuts in a benchmark's candidate lists:

* `random_scores`: chance (1 / number of candidates at hit@1).
* `consensus_scores`: the "consensus caption". It never looks at the query; it only asks which caption agrees
  most with the other captions. When every negative is the positive with one part changed (SCaR's layout), the
  positive is the per-part majority and this finds it far above chance; mini-SCaR's crossed layout brings it
  down to about 1 in 8.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from virtue.eval.table import EvalQuery

_PUNCTUATION = re.compile(r"[^\w\s]")


def random_scores(queries: Sequence[EvalQuery], seed: int) -> list[np.ndarray]:
    """Uniform random scores, reproducible from `seed`; continuous, so ties (which count as misses) do not occur."""
    rng = np.random.default_rng(seed)
    return [rng.random(len(q.candidate_ids)) for q in queries]


def caption_words(text: str) -> frozenset[str]:
    """The distinct words of a caption: lower-cased, punctuation deleted, split on whitespace."""
    return frozenset(_PUNCTUATION.sub("", text.lower()).split())


def consensus_scores(queries: Sequence[EvalQuery]) -> list[np.ndarray]:
    """Score each text candidate by its agreement with the query's other candidates.

    Rule: score(c) = sum over the distinct words w of c of the number of OTHER candidates of the same query
    containing w (case-insensitive, punctuation deleted, see `caption_words`). Words every caption shares add
    the same amount to every score, so only the words that differ between captions decide.
    Candidates with an image score 0 and do not count as "others": their text is an instruction, not a caption.
    """
    # The words of each table entry, computed once: a table holds each distinct candidate once, while its queries
    # list them many times (1,000 candidates per MMEB query).
    tables: dict[int, list[frozenset[str] | None]] = {}
    for q in queries:
        if id(q.table) not in tables:
            tables[id(q.table)] = [None if c.has_image else caption_words(c.text or "") for c in q.table.inputs]
    return [_consensus(q, tables[id(q.table)]) for q in queries]


def _consensus(query: EvalQuery, table_words: Sequence[frozenset[str] | None]) -> np.ndarray:
    words = [table_words[i] for i in query.candidate_ids.tolist()]
    # How many candidates contain each word; each candidate counts a word once.
    counts = Counter(w for ws in words if ws is not None for w in ws)
    # "- 1" removes the candidate itself from the count of candidates containing its own word.
    scores = [0.0 if ws is None else float(sum(counts[w] - 1 for w in ws)) for ws in words]
    return np.asarray(scores, dtype=np.float64)
