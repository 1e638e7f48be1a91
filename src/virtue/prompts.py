"""Visual prompts: small frozen values in pixel coordinates of the user's original image.

A region is selected by any combination of `Points`, one `Box` and one `Mask` (as in SAM). With none of
them the model uses its k x k point grid (`GridPrompt`), exactly as the released checkpoints were trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from virtue.errors import PromptError


def _finite_pair(value, where: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{where}: expected (x, y) numbers, got {value!r}") from exc
    if not (np.isfinite(x) and np.isfinite(y)):
        raise PromptError(f"{where}: coordinates must be finite, got ({x}, {y})")
    return x, y


@dataclass(frozen=True)
class Points:
    """One or more points, (x, y) in pixels of the original image; labels 1 = positive, 0 = negative."""

    xy: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]

    def __init__(self, xy: Sequence[Sequence[float]], labels: Sequence[int] | None = None):
        arr = list(xy)
        if arr and not isinstance(arr[0], (Sequence, np.ndarray)):
            arr = [arr]  # a single (x, y)
        pts = tuple(_finite_pair(p, f"points[{i}]") for i, p in enumerate(arr))
        if not pts:
            raise PromptError("points: expected at least one (x, y) point, got none")
        labs = tuple(int(v) for v in (labels if labels is not None else [1] * len(pts)))
        if len(labs) != len(pts):
            raise PromptError(f"points: {len(pts)} points but {len(labs)} labels")
        if any(v not in (0, 1) for v in labs):
            raise PromptError(f"points: labels must be 1 (positive) or 0 (negative), got {list(labs)}")
        object.__setattr__(self, "xy", pts)
        object.__setattr__(self, "labels", labs)

    def validate(self, size_wh: tuple[int, int]) -> None:
        w, h = size_wh
        for i, (x, y) in enumerate(self.xy):
            if not (0 <= x <= w and 0 <= y <= h):
                raise PromptError(f"points[{i}] ({x:g}, {y:g}) lies outside the {w}x{h} image")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box, x1 y1 x2 y2 in pixels of the original image (XYXY).

    outside_ok: accept a box that crosses the image border (`validate` still refuses zero or negative area). Off by
        default: a user's box outside the image is a mistake. Benchmark rows opt in, because the official evaluation
        scores such boxes as given (see `virtue.eval.datasets`). Left out of equality, hashing and repr, so that
        cache keys and comparisons do not depend on it.
    """

    x1: float
    y1: float
    x2: float
    y2: float
    outside_ok: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def from_xyxy(cls, value: Sequence[float], *, outside_ok: bool = False) -> Box:
        try:
            x1, y1, x2, y2 = (float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise PromptError(f"box: expected [x1, y1, x2, y2], got {value!r}") from exc
        return cls(x1, y1, x2, y2, outside_ok=outside_ok)

    @classmethod
    def from_xywh(cls, value: Sequence[float], *, outside_ok: bool = False) -> Box:
        """From COCO's [x, y, width, height] (the SCaR `bbox` column)."""
        x, y, w, h = (float(v) for v in value)
        return cls(x, y, x + w, y + h, outside_ok=outside_ok)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def is_inside(self, size_wh: tuple[int, int]) -> bool:
        w, h = size_wh
        return self.x1 >= 0 and self.y1 >= 0 and self.x2 <= w and self.y2 <= h

    def check_shape(self, size_wh: tuple[int, int] | None = None) -> None:
        """The checks that need no image: finite coordinates, positive width and height. `size_wh`, if known,
        is named in the message."""
        shown = "[" + ", ".join(f"{v:g}" for v in self.xyxy) + "]"
        within = f" within {size_wh[0]}x{size_wh[1]}" if size_wh is not None else ""
        if not all(np.isfinite(v) for v in self.xyxy):
            raise PromptError(f"box {shown}: coordinates must be finite")
        if self.x2 <= self.x1:
            raise PromptError(f"box {shown} has zero or negative width; expected x1 < x2{within}")
        if self.y2 <= self.y1:
            raise PromptError(f"box {shown} has zero or negative height; expected y1 < y2{within}")

    def validate(self, size_wh: tuple[int, int]) -> None:
        self.check_shape(size_wh)
        w, h = size_wh
        shown = "[" + ", ".join(f"{v:g}" for v in self.xyxy) + "]"
        if not self.outside_ok and not self.is_inside(size_wh):
            raise PromptError(f"box {shown} lies outside the {w}x{h} image")


@dataclass(frozen=True, eq=False)
class Mask:
    """A binary mask of the original image's size (H x W); True marks the region."""

    array: np.ndarray

    def __init__(self, array):
        arr = np.asarray(array)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[..., 0]  # a greyscale image saved as RGB(A)
        if arr.ndim != 2:
            raise PromptError(f"mask: expected a 2-D (H x W) array, got shape {tuple(arr.shape)}")
        if arr.dtype != bool:
            values = np.unique(arr)
            if not np.isin(values, (0, 1, 255)).all():
                raise PromptError(f"mask: expected binary values (0/1 or 0/255), found {values[:5].tolist()}")
            arr = arr > 0
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)
        object.__setattr__(self, "array", arr)

    def validate(self, size_wh: tuple[int, int]) -> None:
        w, h = size_wh
        if self.array.shape != (h, w):
            raise PromptError(
                f"mask of shape {self.array.shape[1]}x{self.array.shape[0]} (WxH) does not match the {w}x{h} image"
            )
        if not self.array.any():
            raise PromptError("mask is empty (no pixel set)")


@dataclass(frozen=True, eq=False)
class MaskLogits(Mask):
    """A mask prompt in SAM2's *image predictor* convention: low-resolution logits (> 0 inside), as
    `SAM2ImagePredictor.predict(mask_input=...)` takes them — e.g. the logits of a previous prediction, 256 x 256
    for SAM2 at 1024² — in SAM's square input frame, so of any aspect; fed to the prompt encoder as they are
    (resized bilinearly to the prompt encoder's mask size if needed).

    The default `Mask` follows SAM2's video/tracker convention instead: a binary mask of the image's size, resized
    to the mask size, 0/1 values (what a user draws).
    """

    def __init__(self, array):
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim != 2 or min(arr.shape) == 0:
            raise PromptError(f"mask_logits: expected a non-empty 2-D array, got shape {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise PromptError("mask_logits: values must be finite")
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)
        object.__setattr__(self, "array", arr)

    def validate(self, size_wh: tuple[int, int]) -> None:
        """In SAM's frame, not the image's: any size fits any image."""


@dataclass(frozen=True)
class GridPrompt:
    """No user prompt: a k x k grid of positive points used as one prompt (the official default)."""

    points_per_side: int


@dataclass(frozen=True, eq=False)
class VisualPrompt:
    """What selects the region of one image: points, a box and a mask, each optional."""

    points: Points | None = None
    box: Box | None = None
    mask: Mask | None = None

    @property
    def is_empty(self) -> bool:
        return self.points is None and self.box is None and self.mask is None

    def validate(self, size_wh: tuple[int, int]) -> None:
        for part in (self.points, self.box, self.mask):
            if part is not None:
                part.validate(size_wh)

    def fingerprint(self) -> tuple:
        """A hashable summary, for de-duplicating identical requests."""
        mask = None if self.mask is None else hash(self.mask.array.tobytes())
        return (self.points, self.box, mask)
