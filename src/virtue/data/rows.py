"""Row checks shared by the training and evaluation data readers: a failed check names its column and
becomes a `BadRow`; COCO polygons and mask files become masks read on first use; a check that needs an image
file can be recorded as a `DeferredCheck` and run later (training without image checks at load time)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from virtue.errors import ImageError, InputError, PromptError
from virtue.images import read_image_size
from virtue.inputs import EmbedInput, read_mask_file
from virtue.processing.text import with_image_token
from virtue.prompts import Box, Mask, Points


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


@dataclass(frozen=True)
class DeferredCheck:
    """A row check that needs an image file, recorded when the row is loaded and run later.

    Attributes:
        column: the column a failure is reported under, as the check at load time would ("qry_image_path",
            "bbox", "segmentation", "query.image", "query.mask", ...).
        image: the image file; only its header is read (its size).
        part: the prompt part that must lie within the image (a `PolygonMask` is checked against its polygons'
            extent, without drawing it; a `MaskFile` is read); None: the image must exist and be readable.
    """

    column: str
    image: Path
    part: Box | Points | Mask | None = None


class ImageHeaders:
    """Image sizes read from file headers, cached per path with the reason a file cannot be used: SCaR holds
    several annotations per image, and a DataLoader worker that keeps one instance reads each header once.

    Unbounded (about 200 bytes per distinct image). Safe to share between threads: a path looked up by two
    threads at once is read twice, and both store the same value.
    """

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int] | str] = {}

    def get(self, path: Path) -> tuple[int, int] | str:
        """(width, height), or why the file cannot be used (`read_image_size`)."""
        if path not in self._cache:
            self._cache[path] = read_image_size(path)
        return self._cache[path]

    def __len__(self) -> int:
        return len(self._cache)


def deferred_failure(check: DeferredCheck, sizes: ImageHeaders) -> str | None:
    """Why `check` fails (the reason the check at load time gives), or None when it passes."""
    size = sizes.get(check.image)
    if isinstance(size, str):
        return size
    part = check.part
    if part is None:
        return None
    if isinstance(part, PolygonMask):
        return polygon_outside(part.polygons, size)  # its extent, without drawing the mask
    try:
        part.validate(size)  # a MaskFile is read here
    except InputError as exc:  # PromptError, ImageError
        return str(exc)
    return None


def polygon_outside(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> str | None:
    """Why COCO polygons `[[x1, y1, x2, y2, ...], ...]` do not fit an image of `size` (W, H), or None."""
    width, height = size
    for ring in polygons:
        xs, ys = ring[0::2], ring[1::2]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
            return f"polygon lies outside the {width}x{height} image"
    return None


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
    """A `Mask` drawn from COCO polygons on first use; the reader checks their format and bounds.

    Drawn lazily because 100k full-size boolean masks per subset would not fit in memory.

    size_wh: the image size (W, H), the mask's size. Without it, `image` must be given and its header is read
        when the mask is first needed (training data loaded without opening any image).
    """

    polygons: tuple[tuple[float, ...], ...]
    image: Path | None

    def __init__(
        self, polygons: Sequence[Sequence[float]], size_wh: tuple[int, int] | None = None, *, image: Path | None = None
    ):
        if size_wh is None and image is None:
            raise ValueError("PolygonMask needs size_wh or the image it belongs to")
        object.__setattr__(self, "polygons", tuple(tuple(float(v) for v in ring) for ring in polygons))
        object.__setattr__(self, "image", None if image is None else Path(image))
        if size_wh is not None:
            # Fills the cached property below: no header is read.
            object.__setattr__(self, "size_wh", (int(size_wh[0]), int(size_wh[1])))

    @cached_property
    def size_wh(self) -> tuple[int, int]:
        size = read_image_size(self.image)  # type: ignore[arg-type]  # __init__ requires one of the two
        if isinstance(size, str):
            raise ImageError(f"segmentation: {size}")
        return size

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
        # Not `self.size_wh`: showing a mask must not read an image header.
        size = self.__dict__.get("size_wh")
        where = f"size_wh={size}" if size is not None else f"image={str(self.image)!r}"
        return f"PolygonMask({len(self.polygons)} polygon(s), {where})"


class MaskFile(Mask):
    """A `Mask` read from a binary image file (0/255, the image's size) on first use, so that loading a JSON lines
    file opens no image. Reading errors surface as `PromptError`, as they would at load time."""

    path: Path

    def __init__(self, path: Path):
        object.__setattr__(self, "path", Path(path))

    @cached_property
    def array(self) -> np.ndarray:  # type: ignore[override]
        if not self.path.is_file():
            raise PromptError(f"mask file not found: {self.path}")
        return Mask(read_mask_file(self.path)).array

    def __repr__(self) -> str:
        return f"MaskFile({str(self.path)!r})"
