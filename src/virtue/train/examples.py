"""The unit of training data: a query, its positive, optional hard negatives, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from virtue.data.rows import BadRow, DeferredCheck
from virtue.inputs import EmbedInput

__all__ = ["BadRow", "DeferredCheck", "TrainExample"]


@dataclass(frozen=True, eq=False)
class TrainExample:
    """One contrastive pair.

    Attributes:
        query: what is embedded on the query side (image + prompt + instruction, or text).
        positive: the matching target (a caption, or an image with optional text).
        negatives: hard negatives for this query (MMEB `neg_*`, SCaR's 9 distractor captions).
        subset: name of the sub-dataset; every global batch is drawn from one subset.
        row_id: stable id of the source row ("<file>:<row>"), used in error reports and resume.
        deferred: the image checks not yet run (data loaded with `check_images=False`): image files exist and are
            readable, prompts lie within their image. `virtue.train.data.run_deferred_checks` runs them; empty
            when they passed at load time.
    """

    query: EmbedInput
    positive: EmbedInput
    negatives: tuple[EmbedInput, ...] = field(default_factory=tuple)
    subset: str = "default"
    row_id: str = ""
    deferred: tuple[DeferredCheck, ...] = ()
