"""Evaluation rows -> `EvalTask`: SCaR-Eval (virtue-spec §5.3) and MMEB-eval (§5.4) parquet files.

A loaded task holds each distinct input once (`eval.table`): candidates repeated across rows (MMEB's 1,000 per
query, SCaR's captions) are interned as the rows are read, under their official candidate name, and a query keeps
int32 indices. Memory grows with the distinct inputs, not with the (query, candidate) pairs.

Every row is validated when it is loaded. Unlike training (`virtue.train.data`), evaluation never drops a row:
a score over fewer rows is not the benchmark's score, so any bad row raises `DataError` naming the file, the
row id (`"<file name>:<row index>"`) and the column.

SCaR boxes that cross the image border (a few rows of the released files) are scored as the official code
scores them: the box as given, in the query text and as the SAM prompt, without clipping. The loader lists their
row ids (`EvalTask.boxes_outside_image`); `strict_boxes=True` makes them bad rows instead. Boxes of zero or
negative area are always bad rows.

SCaR query variants (`load_scar_eval(variant=...)`), so that the harness can run ablations and baselines through
the same model:

| variant | image | visual prompt | bbox in the text |
|---|---|---|---|
| `box` (the paper's protocol) | whole image | the box (original-image pixels) | yes |
| `box_mask` | whole image | the box and the `segmentation` polygon as a mask | yes |
| `mask` | whole image | the `segmentation` polygon | no |
| `point` | whole image | the `point` column (one positive point) | no |
| `no_box` | whole image | none (the model's k x k grid) | no |
| `crop` | the box cropped out (in memory) | none | no |
| `text_only` | none | none | yes (no image placeholder) |
| `box_text` | whole image | none | yes (for models without a SAM branch) |

`box_mask` is the query a model trained with SCaR masks (`masks: true` in `virtue.train.data`) saw in training:
`box`'s text and box, plus the mask; `virtue eval --scar-prompt box_mask` evaluates with it. `mask` and `point`
keep the bbox out of the text on purpose: with it, the text would carry the region and the variant would no longer
measure the prompt. Prompts stay in pixels of the original image; the model's compat
setting decides how they reach SAM's frame (virtue-spec §2.2, §10.2). `crop` decodes every image when the file
is loaded and keeps the crops in memory (about 18k for COCO-Stuff): use `limit` or one subset at a time; a box
crossing the border is cropped as PIL crops it (the outside filled with black).

MMEB-eval is read from one parquet file per task or from the hub layout (`virtue.data.layouts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from virtue.data.layouts import SCAR_SUBSETS, find_scar_files
from virtue.data.parquet import iter_rows, open_parquet
from virtue.data.rows import BadRow, ImageHeaders, PolygonMask, polygon_outside
from virtue.data.rows import BadValue as _BadValue
from virtue.data.rows import check_image_tokens as _checked_tokens
from virtue.data.rows import check_prompt_part as _checked_prompt
from virtue.errors import ConfigError, DataError
from virtue.eval.table import EvalQuery, EvalTask, InputTable
from virtue.inputs import EmbedInput
from virtue.processing.text import DATASET_IMAGE_TOKEN, IMAGE_TOKEN, mmeb_candidate_text, mmeb_query_text
from virtue.prompts import Box, Points, VisualPrompt

SCAR_VARIANTS = ("box", "box_mask", "mask", "point", "no_box", "crop", "text_only", "box_text")
# The variant that needs each optional column.
_SCAR_VARIANT_COLUMNS = {"box_mask": "segmentation", "mask": "segmentation", "point": "point"}
SCAR_COLUMNS = ("qry_text", "qry_image_path", "tgt_text", "bbox")
SCAR_OPTIONAL_COLUMNS = ("neg_types", "segmentation", "point")
SCAR_NUM_CANDIDATES = 10
MMEB_FAMILIES = ("cls", "i2t", "qa", "vg", "t2i")
# Which official parser (image_cls / _qa / _i2t / _t2i / _i2i_vg) builds each of the 36 MMEB tasks' texts (§5.4).
# The meta-tasks do not decide it: "Retrieval" holds i2t, t2i and i2i tasks.
_MMEB_TASKS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "cls": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A", "ImageNet-R",
            "ObjectNet", "Country211"),
    "qa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
           "TextVQA"),
    "i2t": ("MSCOCO_i2t", "VisualNews_i2t"),
    "t2i": ("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"),
    "vg": ("CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}  # fmt: skip
MMEB_FAMILY_BY_TASK: dict[str, str] = {t: f for f, tasks in _MMEB_TASKS_BY_FAMILY.items() for t in tasks}
MMEB_META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
MMEB_COLUMNS = ("qry_text", "qry_img_path", "tgt_text")
# `qry_inst` / `tgt_inst`: MMEB_Test_Instruct keeps the instruction apart; `tgt_img_path`: absent for text targets.
MMEB_OPTIONAL_COLUMNS = ("qry_inst", "tgt_inst", "tgt_img_path")
BBOX_PREFIX = "Referring object bbox: "
SHOWN_BAD_ROWS = 5

# SCAR_SUBSETS and find_scar_files are the layout's (`virtue.data.layouts`), importable here as before.
__all__ = ["SCAR_SUBSETS", "EvalQuery", "EvalTask", "InputTable", "find_scar_files", "load_mmeb_eval",
           "load_scar_eval"]


class _Converted(NamedTuple):
    """What a row becomes: table entries of the query and its candidates, their kinds (SCaR's neg_types), and
    whether the row's box crosses the image border."""

    query: int
    candidates: np.ndarray
    kinds: tuple[str, ...] | None = None
    box_outside: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Query texts


def scar_eval_query_text(qry_text: str, bbox_xywh: Sequence[float] | None, *, with_image: bool = True) -> str:
    """The SCaR evaluation query exactly as the official eval builds it (virtue-spec §5.3).

    bbox_xywh: COCO [x, y, w, h]; written as `Referring object bbox: [x, y, x + w, y + h]` (ints stay ints).
        None leaves the bbox line out (the instruction alone).
    with_image: False drops the image placeholder and the whitespace before the instruction (text-only query).
    """
    # process_input_text("", text=qry_text, add_image_token=True): token, space, empty instruction, space, text.
    text = IMAGE_TOKEN + " " + "" + " " + qry_text.replace(DATASET_IMAGE_TOKEN, "")
    text = text.replace(" \n", "\n") + "\n"
    if bbox_xywh is not None:
        x, y, w, h = (v.item() if isinstance(v, np.generic) else v for v in bbox_xywh)
        text += BBOX_PREFIX + str([x, y, x + w, y + h])
    return text if with_image else text.replace(IMAGE_TOKEN, "", 1).lstrip()


def t2i_query_suffix(task: str) -> str:
    """What the official t2i code appends to a text-only query of `task`: one more newline for "VisDial" only
    ("to be consistent with v1")."""
    return "\n" if task == "VisDial" else ""


def mmeb_image_candidate_text(instruction: str | None, entry: str, family: str) -> str:
    """An MMEB image candidate's text (virtue-spec §5.4).

    Assumptions, where the rows do not say: an entry holding `<|image_1|>` is the whole candidate text (the MMEB-eval
    v1 layout) and only has its token swapped; without a `tgt_inst` column, `mmeb_candidate_text`'s default
    instruction is used with the entry as caption.
    """
    if DATASET_IMAGE_TOKEN in entry:
        return entry.replace(DATASET_IMAGE_TOKEN, IMAGE_TOKEN)
    if instruction is None:
        return mmeb_candidate_text(caption=entry)
    # Not `mmeb_candidate_text`: the official code folds " \n" (tgt_inst starts with "\n" once its token is gone),
    # and keeps an empty instruction.
    prompt = instruction.replace(DATASET_IMAGE_TOKEN, "")
    if entry:
        prompt += " " + entry
    text = (IMAGE_TOKEN + " " + prompt).replace(" \n", "\n")
    # The i2i / VG image-only candidates are the one case without the trailing newline.
    return text if family == "vg" and not entry.strip() else text + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Row checks


class _Images:
    """Image sizes from file headers, cached with the reason a file cannot be used (SCaR has several queries per
    image; a missing image named by many rows is looked up once), and crops."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._headers = ImageHeaders()

    def path(self, value: Any, column: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _BadValue(column, f"expected an image path, got {value!r}")
        return self.root / value

    def size(self, path: Path, column: str) -> tuple[int, int]:
        size = self._headers.get(path)
        if isinstance(size, str):
            raise _BadValue(column, size)
        return size

    @staticmethod
    def crop(path: Path, box: Box, column: str) -> Image.Image:
        try:
            with Image.open(path) as img:
                return img.crop(box.xyxy)
        except (UnidentifiedImageError, OSError) as exc:
            raise _BadValue(column, f"cannot decode {path} ({exc})") from None


def _listed(value: Any, column: str) -> list[Any]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _BadValue(column, f"expected a list, got {type(value).__name__}")
    return list(value)


def _numbers(value: Any, count: int, column: str, what: str) -> list[float]:
    """Exactly `count` finite numbers (python scalars, so that they print as the official code prints them)."""
    items = _listed(value, column) if value is not None else None
    ok = items is not None and len(items) == count
    ok = ok and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items)
    ok = ok and all(math.isfinite(v) for v in items)
    if not ok:
        raise _BadValue(column, f"expected {count} finite numbers {what}, got {value!r}")
    return [v.item() if isinstance(v, np.generic) else v for v in items]


def _string(value: Any, column: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _BadValue(column, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadValue(column, "empty text")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Rows -> task (the files are read by `virtue.data.parquet`)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: expected an integer >= 1 or None, got {limit!r}")


def _load(
    where: str,
    task: str,
    table: InputTable,
    rows: Iterator[tuple[str, dict[str, Any]]],
    convert: Callable[[dict[str, Any]], _Converted],
) -> EvalTask:
    """Convert every row; collect all bad rows first so that one error lists them, then raise.

    where: the file (or task folder) named by errors.
    """
    queries: list[EvalQuery] = []
    outside: list[str] = []
    bad: list[BadRow] = []
    for row_id, row in rows:
        try:
            converted = convert(row)
        except _BadValue as exc:
            bad.append(BadRow(task, row_id, exc.column, exc.reason))
            continue
        queries.append(EvalQuery(task, row_id, table, converted.query, converted.candidates, 0, converted.kinds))
        if converted.box_outside:
            outside.append(row_id)
    if bad:
        first = "; ".join(str(b) for b in bad[:SHOWN_BAD_ROWS])
        raise DataError(f"{where}: {len(bad)} bad row(s), and evaluation drops none; first: {first}")
    if not queries:
        raise DataError(f"{where}: no rows")
    table.seal()
    return EvalTask(task, table, queries, outside)


# ---------------------------------------------------------------------------------------------------------------
# SCaR-Eval


def load_scar_eval(
    path: Path,
    image_root: Path,
    *,
    task: str,
    variant: str = "box",
    limit: int | None = None,
    strict_boxes: bool = False,
) -> EvalTask:
    """Read a SCaR-Eval parquet into queries with the 10 captions as text-only candidates (ground truth first).

    image_root: folder that `qry_image_path` is relative to.
    variant: what the query gets (module docstring table); "box_mask" and "mask" need the `segmentation` column,
        "point" the `point` column (`ConfigError` otherwise).
    limit: keep the first N rows.
    strict_boxes: a box crossing the image border is a bad row (default: scored as given and listed in
        `EvalTask.boxes_outside_image`, as the official code scores it).

    Raises:
        DataError: missing columns, or bad rows (unreadable image, bbox of zero area, not 10 non-empty captions,
            ...), each named by row id and column.
    """
    if variant not in SCAR_VARIANTS:
        raise ConfigError(f"variant: expected one of {list(SCAR_VARIANTS)}, got {variant!r}")
    _check_limit(limit)
    path = Path(path)
    parquet = open_parquet(path, SCAR_COLUMNS, SCAR_OPTIONAL_COLUMNS)
    needed = _SCAR_VARIANT_COLUMNS.get(variant)
    if needed is not None and needed not in parquet.columns:
        raise ConfigError(f"variant {variant!r}: {path} has no {needed!r} column")
    table = InputTable()
    convert = partial(_scar_row, images=_Images(Path(image_root)), variant=variant, strict_boxes=strict_boxes,
                      table=table)
    return _load(str(path), task, table, iter_rows(parquet, limit), convert)


@dataclass(frozen=True)
class _ScarRow:
    """The checked parts of one SCaR row that every variant builds its query from."""

    qry_text: str
    bbox: list[float]  # COCO [x, y, w, h], python numbers as the row holds them
    box: Box
    image: Path
    size: tuple[int, int]
    row: dict[str, Any]


def _scar_row(row: dict[str, Any], images: _Images, variant: str, strict_boxes: bool, table: InputTable) -> _Converted:
    qry_text = _string(row.get("qry_text"), "qry_text")
    captions = _scar_captions(row.get("tgt_text"))
    bbox = _numbers(row.get("bbox"), 4, "bbox", "[x, y, w, h]")
    image = images.path(row.get("qry_image_path"), "qry_image_path")
    size = images.size(image, "qry_image_path")
    box = _scar_box(bbox, size, strict_boxes)
    query = _checked_tokens(_scar_query(_ScarRow(qry_text, bbox, box, image, size, row), images, variant), "qry_text")
    kinds = _scar_kinds(row.get("neg_types"))
    # The official candidate name of a SCaR caption is the caption itself (virtue-spec §5.3).
    ids = np.fromiter((table.intern(("caption", t), partial(_caption, t)) for t in captions), np.int32)
    return _Converted(table.add(query), ids, kinds, box_outside=box.outside_ok)


def _caption(text: str) -> tuple[EmbedInput, str]:
    return EmbedInput(text=text), text


def _scar_captions(value: Any) -> list[str]:
    captions = _listed(value, "tgt_text")
    if len(captions) != SCAR_NUM_CANDIDATES:
        raise _BadValue("tgt_text", f"expected {SCAR_NUM_CANDIDATES} candidates, got {len(captions)}")
    return [_string(t, "tgt_text") for t in captions]


def _scar_box(bbox: list[float], size: tuple[int, int], strict: bool) -> Box:
    """The row's box; one crossing the image border is opted in (`Box.outside_ok`) unless `strict`."""
    if bbox[2] <= 0 or bbox[3] <= 0:
        raise _BadValue("bbox", f"zero-area box [x, y, w, h] = {bbox}")
    box = Box.from_xywh(bbox)
    if not strict and not box.is_inside(size):
        box = Box.from_xywh(bbox, outside_ok=True)
    _checked_prompt(box, size, "bbox")
    return box


def _scar_kinds(value: Any) -> tuple[str, ...] | None:
    # neg_types is optional metadata (per-type accuracies); a malformed one is still a bad row, not ignored.
    if value is None:
        return None
    kinds = _listed(value, "neg_types")
    if len(kinds) != SCAR_NUM_CANDIDATES:
        raise _BadValue("neg_types", f"expected {SCAR_NUM_CANDIDATES} entries, got {len(kinds)}")
    return tuple(_string(k, "neg_types") for k in kinds)


def _scar_query(r: _ScarRow, images: _Images, variant: str) -> EmbedInput:
    if variant == "box":
        return EmbedInput(scar_eval_query_text(r.qry_text, r.bbox), r.image, VisualPrompt(box=r.box))
    if variant == "box_mask":
        mask = _scar_mask(r.row.get("segmentation"), r.size, variant)
        return EmbedInput(scar_eval_query_text(r.qry_text, r.bbox), r.image, VisualPrompt(box=r.box, mask=mask))
    if variant == "text_only":
        return EmbedInput(scar_eval_query_text(r.qry_text, r.bbox, with_image=False))
    if variant == "box_text":
        return EmbedInput(scar_eval_query_text(r.qry_text, r.bbox), r.image)
    text = scar_eval_query_text(r.qry_text, None)
    if variant == "no_box":
        return EmbedInput(text, r.image)
    if variant == "crop":
        return EmbedInput(text, images.crop(r.image, r.box, "qry_image_path"))
    if variant == "mask":
        return EmbedInput(text, r.image, VisualPrompt(mask=_scar_mask(r.row.get("segmentation"), r.size, variant)))
    point = Points([_numbers(r.row.get("point"), 2, "point", "[x, y]")])
    _checked_prompt(point, r.size, "point")
    return EmbedInput(text, r.image, VisualPrompt(points=point))


def _scar_mask(value: Any, size: tuple[int, int], variant: str) -> PolygonMask:
    rings = _listed(value, "segmentation") if value is not None else []
    if not rings:
        raise _BadValue("segmentation", f"no polygon; the {variant!r} variant needs one per row")
    polygons = []
    for ring in rings:
        items = _listed(ring, "segmentation")
        if len(items) < 6 or len(items) % 2:
            raise _BadValue("segmentation", "expected COCO polygons [[x1, y1, x2, y2, x3, y3, ...], ...]")
        polygons.append(_numbers(items, len(items), "segmentation", "in a polygon"))
    outside = polygon_outside(polygons, size)
    if outside is not None:
        raise _BadValue("segmentation", outside)
    return PolygonMask(polygons, size)


# ---------------------------------------------------------------------------------------------------------------
# MMEB-eval


def mmeb_family(task: str, family: str | None = None) -> str:
    """The text family of an MMEB task: `family` when it is one, else looked up by task name.

    family: one of `MMEB_FAMILIES`; None or a meta-task name ("Classification", ..., "Retrieval") looks the task
        up in `MMEB_FAMILY_BY_TASK`, since a meta-task does not decide the family.
    """
    if family in MMEB_FAMILIES:
        return family
    if family is not None and family not in MMEB_META_TASKS:
        raise ConfigError(f"family: expected one of {list(MMEB_FAMILIES)}, a meta-task or None, got {family!r}")
    if task not in MMEB_FAMILY_BY_TASK:
        raise ConfigError(f"task {task!r}: not an MMEB task name; pass family= one of {list(MMEB_FAMILIES)}")
    return MMEB_FAMILY_BY_TASK[task]


def load_mmeb_eval(
    path: Path | Sequence[Path],
    image_root: Path,
    *,
    task: str,
    family: str | None = None,
    limit: int | None = None,
    root: Path | None = None,
) -> EvalTask:
    """Read one MMEB-eval task (VLM2Vec's `MMEB_Test_Instruct` / MMEB-eval layout), ground truth first.

    Columns: `qry_text`, `qry_img_path`, `tgt_text` (list), and optionally `tgt_img_path` (list; absent or empty
    entries mean text candidates), `qry_inst` and `tgt_inst`. Without `qry_inst`, `qry_text` holds the whole
    instruction (the MMEB-eval v1 layout). Queries follow virtue-spec §5.4 through `mmeb_query_text`.

    path: the task's parquet file, or its shards in order (the hub layout, `virtue.data.layouts`).
    task: the MMEB task name; "VisDial" gets the extra trailing newline of the official t2i code.
    family: "cls", "i2t", "qa", "vg" (grounding and i2i) or "t2i" (text-only queries); None or a meta-task name
        takes the task's official family (`mmeb_family`).
    root: row ids name files relative to it (`ImageNet-1K/test-00000-of-00001.parquet:3`); default: by file name.
    """
    family = mmeb_family(task, family)
    _check_limit(limit)
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise ConfigError(f"task {task}: no parquet file given")
    sources = []
    for file_path in paths:
        label = file_path.relative_to(root).as_posix() if root is not None else file_path.name
        sources.append(open_parquet(file_path, MMEB_COLUMNS, MMEB_OPTIONAL_COLUMNS, label=label))
    table = InputTable()
    convert = partial(_mmeb_row, images=_Images(Path(image_root)), task=task, family=family, table=table)
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} files)"
    return _load(where, task, table, iter_rows(sources, limit), convert)


def _mmeb_row(row: dict[str, Any], images: _Images, task: str, family: str, table: InputTable) -> _Converted:
    query = _checked_tokens(_mmeb_query(row, images, task, family), "qry_text")
    texts = [_string(t, "tgt_text", allow_empty=True) for t in _listed(row.get("tgt_text"), "tgt_text")]
    if not texts:
        raise _BadValue("tgt_text", "no candidates")
    paths = _mmeb_target_paths(row.get("tgt_img_path"), len(texts))
    instruction = row.get("tgt_inst")
    if instruction is not None:
        instruction = _string(instruction, "tgt_inst", allow_empty=True)
    # A candidate repeated in many rows (MMEB draws 1,000 per query from a few thousand) is checked once.
    ids = np.fromiter(
        (table.intern((t, p, instruction), partial(_mmeb_candidate, t, p, instruction, images, family))
         for t, p in zip(texts, paths, strict=True)),
        np.int32, count=len(texts),
    )
    return _Converted(table.add(query), ids)


def mmeb_candidate_name(text: str, path: str, family: str) -> str:
    """The official candidate key (virtue-spec §5.4): the image path for t2i, `path:caption` for i2i / VG (the
    caption's double quotes stripped, as VLM2Vec does), the text otherwise and for any text-only candidate."""
    if not path:
        return text
    if family == "t2i":
        return path
    if family == "vg":
        return f"{path}:{text.strip(chr(34))}"
    return text


def _mmeb_query(row: dict[str, Any], images: _Images, task: str, family: str) -> EmbedInput:
    path = _string(row.get("qry_img_path") or "", "qry_img_path", allow_empty=True)
    text = _string(row.get("qry_text") or "", "qry_text", allow_empty=True)
    instruction = row.get("qry_inst")
    if instruction is None:  # v1 layout: qry_text is "<|image_1|>\n<instruction> <text>"
        instruction, text = text, ""
    instruction = _string(instruction, "qry_inst", allow_empty=True)
    if family == "t2i" and path:
        raise _BadValue("qry_img_path", "family 't2i' has text-only queries, but the row has an image")
    image = None
    if path:
        image = images.path(path, "qry_img_path")
        images.size(image, "qry_img_path")
    query_text = mmeb_query_text(instruction, text, with_image=image is not None, family=family)
    if family == "t2i":
        query_text += t2i_query_suffix(task)
    if image is None and not query_text.strip():
        raise _BadValue("qry_text", "empty text and no image")
    return EmbedInput(query_text, image)


def _mmeb_target_paths(value: Any, count: int) -> list[str]:
    if value is None:
        return [""] * count
    paths = [_string(p or "", "tgt_img_path", allow_empty=True) for p in _listed(value, "tgt_img_path")]
    if not paths:
        return [""] * count
    if len(paths) != count:
        raise _BadValue("tgt_img_path", f"{len(paths)} image paths for {count} tgt_text entries")
    return paths


def _mmeb_candidate(
    text: str, path: str, instruction: str | None, images: _Images, family: str
) -> tuple[EmbedInput, str]:
    name = mmeb_candidate_name(text, path, family)
    if not path:
        if not text.strip():
            raise _BadValue("tgt_text", "empty text and no image")
        return _checked_tokens(EmbedInput(text), "tgt_text"), name
    image = images.path(path, "tgt_img_path")
    images.size(image, "tgt_img_path")
    side = EmbedInput(mmeb_image_candidate_text(instruction, text, family), image)
    return _checked_tokens(side, "tgt_text"), name
