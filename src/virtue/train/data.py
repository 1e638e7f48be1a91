"""Training data: sources (SCaR-train, MMEB-train, JSON lines) read into validated `TrainExample`s, by subset.

Every global batch is drawn from one *subset* (virtue-spec §4.3), so a source yields one or more named subsets.
Every row is checked when it is loaded (image files exist and are readable, boxes, points and masks lie in the
image, captions are non-empty strings); a bad row is skipped and reported, or stops the load (`on_bad_row`).

Data sources, as written in a training config:

    data:
      sources:
        - {kind: scar, path: data/SCaR-Train, image_root: images/, hard_negatives: 9, limit: 100000}
        - {kind: mmeb, path: data/MMEB-train/MSCOCO_i2t.parquet, image_root: images/, weight: 2}
        - {kind: jsonl, path: my_pairs.jsonl}
        - {kind: synthetic, n: 4000, seed: 0, hard_negatives: 3}   # procedural, virtue.train.synthetic

* `kind`: `scar` (SCaR-train parquet), `mmeb` (MMEB-train parquet) or `jsonl` (the format below).
* `path`: one file, or a folder of `*.parquet` / `*.jsonl` files; each file is one subset named by its stem
  (e.g. `SCAR_RefCOCOg`). `name` renames the subset of a single file.
* `image_root`: folder that relative image and mask paths are resolved against; by default the data file's folder.
* `weight`: relative probability of drawing a batch from this source's subsets (default 1, the official mix).
* `limit`: keep the first N good rows of each subset (the official recipe keeps the first 100,000).
* `hard_negatives`: number of negatives per example, the first N of each row (default 0: in-batch negatives only).
  A row with fewer is rejected, so that every example of a batch carries the same number.

SCaR-train rows (virtue-spec §5.2) become: query = the image, the `bbox` (COCO `[x, y, w, h]` pixels, turned into
`[x1, y1, x2, y2]`) as a box prompt *and* written into the text (`qry` + `"\\nReferring object bbox: [x1, y1, x2,
y2]"`), plus a mask prompt when `segmentation` holds COCO polygons; positive = `pos_text`; negatives = `neg_text`.
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
  * `mask`: path of a binary mask image (0/255) of the image's size.
  A box, points or mask needs an image. Relative `image` and `mask` paths are resolved against `image_root`, or
  the folder of the `.jsonl` file when the source sets none.
* `subset` (optional): the subset the row belongs to; by default the source's `name`, else the file's stem.
  One file may thus hold several subsets.
* Row ids in error reports are `"<file name>:<line index>"`, the line index counted from 0 (line number - 1).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from virtue.errors import ConfigError, DataError, InputError
from virtue.inputs import EmbedInput, parse_input
from virtue.processing.text import DATASET_IMAGE_TOKEN, IMAGE_TOKEN, scar_train_query_text
from virtue.prompts import Box, VisualPrompt
from virtue.rows import BadRow, PolygonMask
from virtue.rows import BadValue as _BadValue
from virtue.rows import check_image_tokens as _check_tokens
from virtue.rows import check_prompt_part as _check_part
from virtue.train.examples import TrainExample

logger = logging.getLogger(__name__)

KINDS = ("scar", "mmeb", "jsonl")
ON_BAD_ROW = ("skip", "error")
SCAR_COLUMNS = ("qry", "qry_image_path", "pos_text", "bbox")
MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
JSONL_KEYS = ("query", "positive", "negatives", "subset")
# Files that mark a folder written by `datasets.Dataset.save_to_disk`.
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SHOWN_BAD_ROWS = 5

Sides = tuple[EmbedInput, EmbedInput, tuple[EmbedInput, ...]]


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DataSource:
    """One entry of the training config's data list; see the module docstring for the meaning of each field."""

    kind: str
    path: str
    image_root: str | None = None
    name: str | None = None
    weight: float = 1.0
    limit: int | None = None
    hard_negatives: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: expected one of {list(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "path", _path_str(self.path, "path"))
        if self.image_root is not None:
            object.__setattr__(self, "image_root", _path_str(self.image_root, "image_root"))
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ConfigError(f"name: expected a non-empty string, got {self.name!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ConfigError(f"weight: expected a number > 0, got {self.weight!r}")
        if not math.isfinite(self.weight):
            raise ConfigError(f"weight: expected a finite number, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if self.limit is not None:
            _check_int(self.limit, "limit", minimum=1)
        _check_int(self.hard_negatives, "hard_negatives", minimum=0)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "data source") -> DataSource:
        """Build from a config mapping; unknown or missing keys and bad values raise `ConfigError` naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with 'kind' and 'path', got {type(data).__name__}")
        allowed = list(cls.__dataclass_fields__)
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {allowed}")
        missing = [k for k in ("kind", "path") if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _path_str(value: Any, key: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty path string, got {value!r}")
    return value


def _check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, eq=False)
class Subset:
    """The good examples of one sub-dataset, the rows rejected from it, and its sampling weight."""

    name: str
    examples: list[TrainExample]
    bad_rows: list[BadRow] = field(default_factory=list)
    weight: float = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def load_sources(sources: Iterable[DataSource | dict[str, Any]], *, on_bad_row: str = "skip") -> list[Subset]:
    """Load several sources (config mappings or `DataSource`s); subset names must be unique across all of them."""
    subsets: list[Subset] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(sources):
        source = item if isinstance(item, DataSource) else DataSource.from_dict(item, where=f"data[{i}]")
        for subset in load_source(source, on_bad_row=on_bad_row):
            if subset.name in seen:
                raise ConfigError(
                    f"data[{i}]: subset name {subset.name!r} is already used by data[{seen[subset.name]}]; "
                    "set 'name' (or rename the file) so that every subset has its own name"
                )
            seen[subset.name] = i
            subsets.append(subset)
    return subsets


def load_source(source: DataSource, *, on_bad_row: str = "skip") -> list[Subset]:
    """Read and validate every row of one source.

    on_bad_row: "skip" drops bad rows, keeps them in `Subset.bad_rows` and logs a warning per subset;
        "error" raises `DataError` at the first one.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row: expected one of {list(ON_BAD_ROW)}, got {on_bad_row!r}")
    if source.image_root is not None and not Path(source.image_root).is_dir():
        raise ConfigError(f"image_root: folder not found: {source.image_root}")
    collector = _Collector(source, on_bad_row)
    sizes = _ImageSizes()
    path = Path(source.path)
    if source.kind == "mmeb" and _is_hf_dataset(path):
        _read_table(path, _hf_rows(path, _required_columns(source)), source, sizes, collector)
    else:
        for file in _source_files(source):
            reader = _read_jsonl if source.kind == "jsonl" else _read_parquet
            reader(file, source, sizes, collector)
    return collector.finish()


# ---------------------------------------------------------------------------------------------------------------
# Files


def _source_files(source: DataSource) -> list[Path]:
    path = Path(source.path)
    suffix = ".jsonl" if source.kind == "jsonl" else ".parquet"
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"path: not found: {path}")
    files = sorted(path.glob(f"*{suffix}"))
    if not files:
        raise ConfigError(f"path: no *{suffix} file in folder {path}")
    if source.name is not None and len(files) > 1:
        raise ConfigError(
            f"name: {source.name!r} can only name a single file's subset; the {len(files)} files in {path} "
            "are named by their stems"
        )
    return files


def _required_columns(source: DataSource) -> tuple[str, ...]:
    columns = SCAR_COLUMNS if source.kind == "scar" else MMEB_COLUMNS
    return (*columns, "neg_text") if source.hard_negatives else columns


def _check_columns(path: Path, present: Iterable[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in set(present)]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}")


def _read_parquet(path: Path, source: DataSource, sizes: _ImageSizes, collector: _Collector) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"path: reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as parquet ({exc})") from exc
    required = _required_columns(source)
    _check_columns(path, file.schema_arrow.names, required)
    wanted = dict.fromkeys((*required, "segmentation", "neg_text", "neg_image_path"))
    columns = [c for c in wanted if c in file.schema_arrow.names]
    # Batches, not the whole table: with `limit` a 400k-row subset is only read up to its first N good rows.
    rows = (row for batch in file.iter_batches(1024, columns=columns) for row in batch.to_pylist())
    _read_table(path, rows, source, sizes, collector)


def _is_hf_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".arrow"
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def _hf_rows(path: Path, required: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of a `datasets` folder (`save_to_disk`) or `.arrow` file; `datasets` is an optional dependency."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(
            f"path: {path} is a Hugging Face `datasets` file or folder; install `datasets` (pip install datasets) "
            "or convert it to parquet"
        ) from None
    data = datasets.Dataset.from_file(str(path)) if path.is_file() else datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        # MMEB-train's subsets are loaded with split="original" (virtue-spec §5.1).
        split = "original" if "original" in data else splits[0] if len(splits) == 1 else None
        if split is None:
            raise ConfigError(f"path: {path} holds the splits {splits}; expected 'original' or a single split")
        data = data[split]
    _check_columns(path, data.column_names, required)
    yield from data


def _read_table(
    path: Path, rows: Iterable[dict[str, Any]], source: DataSource, sizes: _ImageSizes, collector: _Collector
) -> None:
    name = source.name or path.stem
    convert = _scar_example if source.kind == "scar" else _mmeb_example
    context = _Context(Path(source.image_root) if source.image_root else path.parent, sizes, source.hard_negatives)
    collector.open(name)
    for index, row in enumerate(rows):
        if collector.full(name):
            break
        collector.add(name, f"{path.name}:{index}", partial(convert, row, context))


def _read_jsonl(path: Path, source: DataSource, sizes: _ImageSizes, collector: _Collector) -> None:
    default = source.name or path.stem
    context = _Context(Path(source.image_root) if source.image_root else path.parent, sizes, source.hard_negatives)
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            row_id = f"{path.name}:{index}"
            try:
                record = _json_record(line)
                name = _record_subset(record, default)
            except _BadValue as bad:
                collector.reject(BadRow(default, row_id, bad.column, bad.reason))
                continue
            collector.open(name)
            if not collector.full(name):
                collector.add(name, row_id, partial(_jsonl_example, record, context))


# ---------------------------------------------------------------------------------------------------------------
# Collecting good and bad rows


class _Collector:
    """Groups the examples of one source by subset, applies `limit`, and reports bad rows."""

    def __init__(self, source: DataSource, on_bad_row: str):
        self.source = source
        self.on_bad_row = on_bad_row
        self.examples: dict[str, list[TrainExample]] = {}
        self.bad_rows: dict[str, list[BadRow]] = {}

    def open(self, name: str) -> None:
        self.examples.setdefault(name, [])
        self.bad_rows.setdefault(name, [])

    def full(self, name: str) -> bool:
        return self.source.limit is not None and len(self.examples[name]) >= self.source.limit

    def add(self, name: str, row_id: str, convert: Callable[[], Sides]) -> None:
        try:
            query, positive, negatives = convert()
        except _BadValue as bad:
            self.reject(BadRow(name, row_id, bad.column, bad.reason))
            return
        self.examples[name].append(TrainExample(query, positive, negatives, subset=name, row_id=row_id))

    def reject(self, bad: BadRow) -> None:
        if self.on_bad_row == "error":
            raise DataError(f"{self.source.kind} dataset {self.source.path}: {bad} (on_bad_row='skip' drops such rows)")
        self.open(bad.subset)
        self.bad_rows[bad.subset].append(bad)

    def finish(self) -> list[Subset]:
        subsets = []
        for name, examples in self.examples.items():
            bad = self.bad_rows[name]
            if bad:
                first = "; ".join(str(b) for b in bad[:SHOWN_BAD_ROWS])
                logger.warning("%s: skipped %d bad row(s), kept %d; first: %s", name, len(bad), len(examples), first)
            if not examples:
                raise DataError(f"{self.source.kind} dataset {self.source.path}: subset {name!r} has no usable row")
            subsets.append(Subset(name, examples, bad, self.source.weight))
        return subsets


# ---------------------------------------------------------------------------------------------------------------
# Row checks shared by every format


class _ImageSizes:
    """Image sizes read from file headers only, cached: SCaR has several annotations per image."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int] | str] = {}

    def __call__(self, path: Path, column: str) -> tuple[int, int]:
        if path not in self._cache:
            self._cache[path] = _read_size(path)
        size = self._cache[path]
        if isinstance(size, str):
            raise _BadValue(column, size)
        return size


def _read_size(path: Path) -> tuple[int, int] | str:
    """The (width, height) of an image file, or why it cannot be used."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        return f"cannot read {path} as an image ({exc})"
    if width == 0 or height == 0:
        return f"image {path} is empty ({width}x{height})"
    return width, height


@dataclass(frozen=True)
class _Context:
    base: Path  # relative image and mask paths are resolved against it
    sizes: _ImageSizes
    hard_negatives: int

    def image(self, value: Any, column: str) -> tuple[Path, tuple[int, int]]:
        if not isinstance(value, str) or not value.strip():
            raise _BadValue(column, f"expected an image path, got {value!r}")
        path = self.base / value
        return path, self.sizes(path, column)


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise _BadValue(column, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadValue(column, "empty text")
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
        raise _BadValue(column, f"{len(values)} negative(s), but hard_negatives={count}")
    return values[:count]


# ---------------------------------------------------------------------------------------------------------------
# SCaR-train


def _bbox_xyxy(value: Any) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2], keeping ints as ints (they are printed into the query text)."""
    numbers = _numbers(value)
    if numbers is None or len(numbers) != 4:
        raise _BadValue("bbox", f"expected 4 numbers [x, y, w, h], got {value!r}")
    x, y, w, h = numbers
    if w <= 0 or h <= 0:
        raise _BadValue("bbox", f"zero-area box [x, y, w, h] = {numbers}")
    return x, y, x + w, y + h


def _polygon_mask(value: Any, size: tuple[int, int]) -> PolygonMask | None:
    rings = _as_list(value)
    if not rings:
        return None  # null / [] = no segmentation, as in the released SCaR files
    width, height = size
    for ring in rings:
        numbers = _numbers(ring)
        if numbers is None or len(numbers) < 6 or len(numbers) % 2:
            raise _BadValue("segmentation", "expected COCO polygons [[x1, y1, x2, y2, x3, y3, ...], ...]")
        xs, ys = numbers[0::2], numbers[1::2]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
            raise _BadValue("segmentation", f"polygon lies outside the {width}x{height} image")
    return PolygonMask(rings, size)


def _scar_example(row: dict[str, Any], context: _Context) -> Sides:
    qry = _text(row.get("qry"), "qry")
    pos_text = _text(row.get("pos_text"), "pos_text")
    xyxy = _bbox_xyxy(row.get("bbox"))
    image, size = context.image(row.get("qry_image_path"), "qry_image_path")
    box = Box.from_xyxy(xyxy)
    _check_part(box, size, "bbox")
    prompt = VisualPrompt(box=box, mask=_polygon_mask(row.get("segmentation"), size))
    # virtue-spec §5.2: the box goes to SAM and is also written into the query text.
    query = EmbedInput(text=scar_train_query_text(qry, xyxy), image=image, prompt=prompt)
    _check_tokens(query, "qry")
    positive = EmbedInput(text=pos_text)
    _check_tokens(positive, "pos_text")
    negatives = _first_negatives(_as_list(row.get("neg_text")), context.hard_negatives, "neg_text")
    return query, positive, tuple(EmbedInput(text=_text(t, "neg_text")) for t in negatives)


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train


def _mmeb_side(text: Any, image_path: Any, columns: tuple[str, str], context: _Context) -> EmbedInput:
    text_column, image_column = columns
    if text is not None and not isinstance(text, str):
        raise _BadValue(text_column, f"expected a string, got {type(text).__name__}")
    image = None
    if image_path is not None and image_path != "":  # an empty path is a text-only side
        image, _ = context.image(image_path, image_column)
    elif text is None or not text.strip():
        raise _BadValue(text_column, "empty text and no image")
    side = EmbedInput(text=None if text is None else text.replace(DATASET_IMAGE_TOKEN, IMAGE_TOKEN), image=image)
    _check_tokens(side, text_column)
    return side


def _mmeb_example(row: dict[str, Any], context: _Context) -> Sides:
    query = _mmeb_side(row.get("qry"), row.get("qry_image_path"), ("qry", "qry_image_path"), context)
    positive = _mmeb_side(row.get("pos_text"), row.get("pos_image_path"), ("pos_text", "pos_image_path"), context)
    texts = _first_negatives(_as_list(row.get("neg_text")), context.hard_negatives, "neg_text")
    images = _as_list(row.get("neg_image_path"))[: len(texts)]
    images += [None] * (len(texts) - len(images))
    columns = ("neg_text", "neg_image_path")
    negatives = tuple(_mmeb_side(t, i, columns, context) for t, i in zip(texts, images, strict=True))
    return query, positive, negatives


# ---------------------------------------------------------------------------------------------------------------
# JSON lines


def _json_record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadValue("json", f"invalid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _BadValue("json", f"expected an object per line, got {type(record).__name__}")
    return record


def _record_subset(record: dict[str, Any], default: str) -> str:
    name = record.get("subset", default)
    if not isinstance(name, str) or not name.strip():
        raise _BadValue("subset", f"expected a non-empty string, got {name!r}")
    return name


def _jsonl_side(value: Any, column: str, context: _Context) -> EmbedInput:
    if isinstance(value, dict):
        value = dict(value)
        for key in ("image", "mask"):
            if isinstance(value.get(key), str):
                value[key] = context.base / value[key]
        if isinstance(value.get("mask"), Path) and not value["mask"].is_file():
            raise _BadValue(f"{column}.mask", f"mask file not found: {value['mask']}")
    elif not isinstance(value, str):
        raise _BadValue(column, f"expected an object or a string, got {type(value).__name__}")
    try:
        side = parse_input(value)
    except InputError as exc:
        raise _BadValue(column, str(exc).removeprefix("input 0: ")) from None
    if side.image is not None:
        size = context.sizes(Path(side.image), f"{column}.image")
        for name in ("box", "points", "mask"):
            part = getattr(side.prompt, name, None)
            if part is not None:
                _check_part(part, size, f"{column}.{name}")
    _check_tokens(side, f"{column}.text")
    return side


def _jsonl_example(record: dict[str, Any], context: _Context) -> Sides:
    unknown = sorted(set(record) - set(JSONL_KEYS))
    if unknown:
        raise _BadValue(unknown[0], f"unknown key(s) {unknown}; allowed: {list(JSONL_KEYS)}")
    for key in ("query", "positive"):
        if key not in record:
            raise _BadValue(key, "missing")
    query = _jsonl_side(record["query"], "query", context)
    positive = _jsonl_side(record["positive"], "positive", context)
    given = record.get("negatives", [])
    if not isinstance(given, list):
        raise _BadValue("negatives", f"expected a list, got {type(given).__name__}")
    chosen = _first_negatives(given, context.hard_negatives, "negatives")
    negatives = tuple(_jsonl_side(n, f"negatives[{i}]", context) for i, n in enumerate(chosen))
    return query, positive, negatives
