"""Row formats of the training sources: one source row -> (query, positive, negatives) `EmbedInput`s, every value
checked (a failed check raises `BadValue` naming its column), and the checks that need an image file recorded as
`DeferredCheck`s. Which files hold the rows and where their images are is `virtue.train.data`'s concern.

Rows
----

SCaR-train rows (virtue-spec §5.2) become: query = the image and the `bbox` (COCO `[x, y, w, h]` pixels, turned
into `[x1, y1, x2, y2]`) as a box prompt *and* written into the text (`qry` + `"\\nReferring object bbox: [x1, y1,
x2, y2]"`); positive = `pos_text`; negatives = `neg_text`. As in the official code the query gets the box only;
`masks: true` adds the `segmentation` COCO polygons, when a row has them, as a mask prompt (box + mask; the
evaluation's matching protocol is the SCaR `box_mask` variant). Without `masks` the column is not read.
MMEB-train rows (§5.1): `qry` / `qry_image_path`, `pos_text` / `pos_image_path`, `neg_text` / `neg_image_path`,
`<|image_1|>` swapped for `<|image_pad|>`, an empty image path meaning a text-only side.

JSON lines format (`kind: jsonl`)
---------------------------------

One JSON object per line (blank lines are ignored):

    {"query": {"text": "Describe the boxed object.", "image": "imgs/cat.jpg", "box": [10, 20, 120, 200]},
     "positive": {"text": "a grey cat on a sofa"},
     "negatives": [{"text": "a dog on a sofa"}, {"text": "a grey cat on a bed"}],
     "subset": "pets"}

* `query`, `positive` (required) and each item of `negatives` (optional) is either a string (a text-only side)
  or an object with the keys accepted by `virtue.inputs.parse_input`:
  * `text`: the instruction or caption; an image side may omit it;
  * `image`: image file path;
  * `box` (or `bbox`): `[x1, y1, x2, y2]` in pixels of the original image;
  * `points` (or `point`): `[[x, y], ...]` in pixels, with optional `labels`: `[1, 0, ...]` (1 = positive point);
  * `mask`: path of a binary mask image (0/255) of the image's size, read when first needed.
  A box, points or mask needs an image. Relative `image` and `mask` paths are resolved against `image_root`, or
  the folder of the `.jsonl` file when the source sets none.
* `subset` (optional): the subset the row belongs to; by default the source's `name`, else the file's stem.
  One file may thus hold several subsets.
* Row ids in error reports are `"<file name>:<line index>"`, the line index counted from 0 (line number - 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from virtue.data.layouts import IMAGES_FOLDER
from virtue.data.rows import BadValue, DeferredCheck, MaskFile, PolygonMask, check_image_tokens
from virtue.errors import InputError, PromptError
from virtue.inputs import EmbedInput, parse_input
from virtue.processing.text import DATASET_IMAGE_TOKEN, IMAGE_TOKEN, scar_train_query_text
from virtue.prompts import Box, VisualPrompt

__all__ = [
    "JSONL_KEYS", "MMEB_COLUMNS", "SCAR_COLUMNS", "ImageBase", "RowContext", "Sides", "json_record", "jsonl_example",
    "mmeb_example", "record_subset", "scar_example",
]  # fmt: skip

# The columns a row must have; `neg_text` too when the source asks for hard negatives (`virtue.train.data`).
SCAR_COLUMNS = ("qry", "qry_image_path", "pos_text", "bbox")
MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
JSONL_KEYS = ("query", "positive", "negatives", "subset")

Sides = tuple[EmbedInput, EmbedInput, tuple[EmbedInput, ...]]


# ---------------------------------------------------------------------------------------------------------------
# Row checks shared by every format


@dataclass(frozen=True)
class ImageBase:
    """Where relative image paths live: `root`, or `images` for paths that do not start with `images/`."""

    root: Path
    images: Path | None = None

    def resolve(self, value: str) -> Path:
        relative = PurePath(value)
        if self.images is not None and not relative.is_absolute() and relative.parts[:1] != (IMAGES_FOLDER,):
            return self.images / relative
        return self.root / relative


@dataclass(frozen=True)
class RowContext:
    """What a row's conversion needs from its source: where its images are, how many negatives it must give, and
    whether SCaR polygons become mask prompts."""

    base: ImageBase
    hard_negatives: int
    masks: bool = False

    def image(self, value: Any, column: str, checks: list[DeferredCheck]) -> Path:
        """The resolved path; its existence and header are checked later (`DeferredCheck` with no part)."""
        if not isinstance(value, str) or not value.strip():
            raise BadValue(column, f"expected an image path, got {value!r}")
        path = self.base.resolve(value)
        checks.append(DeferredCheck(column, path))
        return path


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise BadValue(column, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadValue(column, "empty text")
    return value


def _numbers(value: Any) -> list[float] | None:
    """The value as a list of finite numbers, or None when it is not one."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return list(value) if ok else None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first_negatives(values: list[Any], count: int, column: str) -> list[Any]:
    if len(values) < count:
        raise BadValue(column, f"{len(values)} negative(s), but hard_negatives={count}")
    return values[:count]


# ---------------------------------------------------------------------------------------------------------------
# SCaR-train


def _bbox_xyxy(value: Any) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2], keeping ints as ints (they are printed into the query text)."""
    numbers = _numbers(value)
    if numbers is None or len(numbers) != 4:
        raise BadValue("bbox", f"expected 4 numbers [x, y, w, h], got {value!r}")
    x, y, w, h = numbers
    if w <= 0 or h <= 0:
        raise BadValue("bbox", f"zero-area box [x, y, w, h] = {numbers}")
    return x, y, x + w, y + h


def _polygon_mask(value: Any, image: Path) -> PolygonMask | None:
    """The format of COCO polygons; their bounds need the image's size and are a deferred check."""
    rings = _as_list(value)
    if not rings:
        return None  # null / [] = no segmentation, as in the released SCaR files
    for ring in rings:
        numbers = _numbers(ring)
        if numbers is None or len(numbers) < 6 or len(numbers) % 2:
            raise BadValue("segmentation", "expected COCO polygons [[x1, y1, x2, y2, x3, y3, ...], ...]")
    return PolygonMask(rings, image=image)


def scar_example(row: dict[str, Any], context: RowContext, checks: list[DeferredCheck]) -> Sides:
    qry = _text(row.get("qry"), "qry")
    pos_text = _text(row.get("pos_text"), "pos_text")
    xyxy = _bbox_xyxy(row.get("bbox"))
    image = context.image(row.get("qry_image_path"), "qry_image_path", checks)
    box = Box.from_xyxy(xyxy)
    checks.append(DeferredCheck("bbox", image, box))
    # virtue-spec §5.2: the official query gets the box only (to SAM and in the text); `masks` adds the polygon.
    mask = _polygon_mask(row.get("segmentation"), image) if context.masks else None
    if mask is not None:
        checks.append(DeferredCheck("segmentation", image, mask))
    query = EmbedInput(text=scar_train_query_text(qry, xyxy), image=image, prompt=VisualPrompt(box=box, mask=mask))
    check_image_tokens(query, "qry")
    positive = EmbedInput(text=pos_text)
    check_image_tokens(positive, "pos_text")
    negatives = _first_negatives(_as_list(row.get("neg_text")), context.hard_negatives, "neg_text")
    return query, positive, tuple(EmbedInput(text=_text(t, "neg_text")) for t in negatives)


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train


def _mmeb_side(
    text: Any, image_path: Any, columns: tuple[str, str], context: RowContext, checks: list[DeferredCheck]
) -> EmbedInput:
    text_column, image_column = columns
    if text is not None and not isinstance(text, str):
        raise BadValue(text_column, f"expected a string, got {type(text).__name__}")
    image = None
    if image_path is not None and image_path != "":  # an empty path is a text-only side
        image = context.image(image_path, image_column, checks)
    elif text is None or not text.strip():
        raise BadValue(text_column, "empty text and no image")
    side = EmbedInput(text=None if text is None else text.replace(DATASET_IMAGE_TOKEN, IMAGE_TOKEN), image=image)
    check_image_tokens(side, text_column)
    return side


def mmeb_example(row: dict[str, Any], context: RowContext, checks: list[DeferredCheck]) -> Sides:
    side = partial(_mmeb_side, context=context, checks=checks)
    query = side(row.get("qry"), row.get("qry_image_path"), ("qry", "qry_image_path"))
    positive = side(row.get("pos_text"), row.get("pos_image_path"), ("pos_text", "pos_image_path"))
    texts = _first_negatives(_as_list(row.get("neg_text")), context.hard_negatives, "neg_text")
    images = _as_list(row.get("neg_image_path"))[: len(texts)]
    images += [None] * (len(texts) - len(images))
    negatives = tuple(side(t, i, ("neg_text", "neg_image_path")) for t, i in zip(texts, images, strict=True))
    return query, positive, negatives


# ---------------------------------------------------------------------------------------------------------------
# JSON lines


def json_record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadValue("json", f"invalid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise BadValue("json", f"expected an object per line, got {type(record).__name__}")
    return record


def record_subset(record: dict[str, Any], default: str) -> str:
    name = record.get("subset", default)
    if not isinstance(name, str) or not name.strip():
        raise BadValue("subset", f"expected a non-empty string, got {name!r}")
    return name


def _jsonl_side(value: Any, column: str, context: RowContext, checks: list[DeferredCheck]) -> EmbedInput:
    if isinstance(value, dict):
        value = dict(value)
        image = value.get("image")
        if image is not None:
            if not isinstance(image, str) or not image.strip():
                raise BadValue(f"{column}.image", f"expected an image path, got {image!r}")
            value["image"] = context.base.resolve(image)
        if isinstance(value.get("mask"), str):
            value["mask"] = MaskFile(context.base.resolve(value["mask"]))  # read by its deferred check
    elif not isinstance(value, str):
        raise BadValue(column, f"expected an object or a string, got {type(value).__name__}")
    try:
        side = parse_input(value)
    except InputError as exc:
        raise BadValue(column, str(exc).removeprefix("input 0: ")) from None
    box = side.prompt.box if side.prompt is not None else None
    if box is not None:
        try:
            box.check_shape()  # needs no image: checked now
        except PromptError as exc:
            raise BadValue(f"{column}.box", str(exc)) from None
    if side.image is not None:
        image = Path(side.image)
        checks.append(DeferredCheck(f"{column}.image", image))
        for name in ("box", "points", "mask"):
            part = getattr(side.prompt, name, None)
            if part is not None:
                checks.append(DeferredCheck(f"{column}.{name}", image, part))
    check_image_tokens(side, f"{column}.text")
    return side


def jsonl_example(record: dict[str, Any], context: RowContext, checks: list[DeferredCheck]) -> Sides:
    unknown = sorted(set(record) - set(JSONL_KEYS))
    if unknown:
        raise BadValue(unknown[0], f"unknown key(s) {unknown}; allowed: {list(JSONL_KEYS)}")
    for key in ("query", "positive"):
        if key not in record:
            raise BadValue(key, "missing")
    query = _jsonl_side(record["query"], "query", context, checks)
    positive = _jsonl_side(record["positive"], "positive", context, checks)
    given = record.get("negatives", [])
    if not isinstance(given, list):
        raise BadValue("negatives", f"expected a list, got {type(given).__name__}")
    chosen = _first_negatives(given, context.hard_negatives, "negatives")
    negatives = tuple(_jsonl_side(n, f"negatives[{i}]", context, checks) for i, n in enumerate(chosen))
    return query, positive, negatives
