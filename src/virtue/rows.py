"""Row checks shared by the training and evaluation data readers: a failed check names its column and
becomes a `BadRow`; COCO polygons become lazily drawn masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from virtue.errors import InputError, PromptError
from virtue.inputs import EmbedInput
from virtue.processing.text import with_image_token
from virtue.prompts import Mask


@dataclass(frozen=True)
class BadRow:
    """A source row that was rejected, with the reason; reported, never dropped silently."""

    subset: str
    row_id: str
    column: str
    reason: str

    def __str__(self) -> str:
        return f"{self.subset} row {self.row_id}, column {self.column!r}: {self.reason}"


class BadValue(Exception):
    """Raised by a row check; the reader turns it into a `BadRow` or a `DataError`."""

    def __init__(self, column: str, reason: str):
        super().__init__(reason)
        self.column = column
        self.reason = reason


def check_prompt_part(part: Any, size: tuple[int, int], column: str) -> None:
    """A box, points or mask that must lie in an image of `size` (W, H)."""
    try:
        part.validate(size)
    except PromptError as exc:
        raise BadValue(column, str(exc)) from None


def check_image_tokens(side: EmbedInput, column: str) -> EmbedInput:
    """At most one image placeholder, and none without an image, as the model will require."""
    try:
        with_image_token(side.text, side.has_image, column)
    except InputError as exc:
        raise BadValue(column, str(exc)) from None
    return side


class PolygonMask(Mask):
    """A `Mask` drawn from COCO polygons on first use; its shape and bounds are checked when the row is loaded.

    Drawn lazily because 100k full-size boolean masks per subset would not fit in memory.
    """

    polygons: tuple[tuple[float, ...], ...]
    size_wh: tuple[int, int]

    def __init__(self, polygons: Sequence[Sequence[float]], size_wh: tuple[int, int]):
        object.__setattr__(self, "polygons", tuple(tuple(float(v) for v in ring) for ring in polygons))
        object.__setattr__(self, "size_wh", (int(size_wh[0]), int(size_wh[1])))

    @cached_property
    def array(self) -> np.ndarray:  # type: ignore[override]
        canvas = Image.new("1", self.size_wh, 0)
        draw = ImageDraw.Draw(canvas)
        for ring in self.polygons:
            draw.polygon(list(ring), fill=1, outline=1)
        array = np.array(canvas, dtype=bool)
        array.setflags(write=False)
        return array

    def __repr__(self) -> str:
        return f"PolygonMask({len(self.polygons)} polygon(s), size_wh={self.size_wh})"
