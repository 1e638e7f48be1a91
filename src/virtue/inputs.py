"""The one door for loose user input: strings, images and dicts become validated `EmbedInput`s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from virtue.errors import ImageError, InputError, PromptError
from virtue.images import load_image
from virtue.prompts import Box, Mask, MaskLogits, Points, VisualPrompt

DICT_KEYS = ("image", "text", "box", "bbox", "points", "point", "labels", "mask", "mask_logits")
ImageLike = Image.Image | str | Path | np.ndarray


@dataclass(frozen=True, eq=False)
class EmbedInput:
    """One thing to embed: text, an image, or both, with an optional visual prompt (needs an image).

    `image` is kept as given (path, PIL image or array) and read when its batch is built.
    """

    text: str | None = None
    image: ImageLike | None = None
    prompt: VisualPrompt | None = None
    # The image's pixels as stored, its EXIF orientation not applied: dataset rows, whose boxes were drawn in
    # stored pixels. A user's photo (False) is turned upright first in the clean compatibility mode.
    stored_pixels: bool = False

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def image_identity(self) -> Any:
        """A cheap key that groups inputs sharing one image object or path (before decoding)."""
        if isinstance(self.image, (str, Path)):
            return ("path", str(Path(self.image).resolve()), self.stored_pixels)
        return ("object", id(self.image), self.stored_pixels)


def as_stored(item: EmbedInput) -> EmbedInput:
    """The input marked as a dataset row: its image is read as stored (no EXIF rotation)."""
    return item if item.image is None or item.stored_pixels else dataclasses.replace(item, stored_pixels=True)


def parse_input(value: Any, index: int = 0, where: str | None = None) -> EmbedInput:
    """`str` -> text; PIL image / path / array -> image; dict -> image, text and prompt keys. Errors name the
    input as `where` (default "input {index}")."""
    where = where or f"input {index}"
    if isinstance(value, EmbedInput):
        return _checked(value, where)
    if isinstance(value, str):
        return _checked(EmbedInput(text=value), where)
    if isinstance(value, (Image.Image, Path, np.ndarray)):
        return EmbedInput(image=value)
    if isinstance(value, dict):
        return _from_dict(value, where)
    raise InputError(
        f"{where}: expected a string, an image (PIL, path, numpy) or a dict, got {type(value).__name__}"
    )


def _from_dict(d: dict, where: str) -> EmbedInput:
    unknown = sorted(set(d) - set(DICT_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {list(DICT_KEYS)}")
    if "box" in d and "bbox" in d:
        raise InputError(f"{where}: give 'box' or 'bbox', not both")
    if "points" in d and "point" in d:
        raise InputError(f"{where}: give 'points' or 'point', not both")
    text = d.get("text")
    if text is not None and not isinstance(text, str):
        raise InputError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    image = d.get("image")
    if isinstance(image, str):
        image = Path(image)
    try:
        prompt = _prompt(d)
    except PromptError as exc:
        raise PromptError(f"{where}: {exc}") from None
    return _checked(EmbedInput(text=text, image=image, prompt=prompt), where)


def _prompt(d: dict) -> VisualPrompt | None:
    box = d.get("box", d.get("bbox"))
    if box is not None and not isinstance(box, Box):
        box = Box.from_xyxy(box)
    points = d.get("points", d.get("point"))
    if points is not None and not isinstance(points, Points):
        points = Points(points, d.get("labels"))
    elif d.get("labels") is not None and points is None:
        raise PromptError("'labels' given without 'points'")
    if "mask" in d and "mask_logits" in d:
        raise PromptError("give 'mask' or 'mask_logits', not both")
    mask = d.get("mask")
    if d.get("mask_logits") is not None:
        mask = MaskLogits(d["mask_logits"])
    elif mask is not None and not isinstance(mask, Mask):
        if isinstance(mask, (str, Path)):
            mask = read_mask_file(mask)
        mask = Mask(mask)
    prompt = VisualPrompt(points=points, box=box, mask=mask)
    return None if prompt.is_empty else prompt


def read_mask_file(path: str | Path) -> np.ndarray:
    """A mask image file (0/255) -> its 8-bit array; PromptError when it cannot be read."""
    try:
        return np.asarray(load_image(path, "mask").convert("L"))
    except ImageError as exc:
        raise PromptError(str(exc)) from None


def _checked(item: EmbedInput, where: str) -> EmbedInput:
    if item.image is None:
        if item.prompt is not None:
            raise PromptError(f"{where}: a visual prompt (box/points/mask) needs an image")
        if item.text is None or not item.text.strip():
            raise InputError(f"{where}: empty input (no image and no text)")
    return item
