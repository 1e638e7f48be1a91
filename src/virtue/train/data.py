"""Training data: sources (SCaR-train, MMEB-train, JSON lines) read into validated `TrainExample`s, by subset.

Every global batch is drawn from one *subset* (virtue-spec §4.3), so a source yields one or more named subsets.
Every row is checked (texts, boxes, points, masks, image files); a bad row is skipped and reported, or stops the
load (`on_bad_row`). See "Image checks" below for the checks that need an image file.

Data sources, as written in a training config:

    data:
      sources:
        - {kind: scar, path: data/SCaR-Train, hard_negatives: 9, limit: 100000}
        - {kind: mmeb, path: data/MMEB-train, subsets: [MSCOCO_i2t, VisDial], limit: 100000}
        - {kind: mmeb, path: data/MSCOCO_i2t.parquet, image_root: data/MMEB-train, weight: 2}
        - {kind: jsonl, path: my_pairs.jsonl}
        - {kind: synthetic, n: 4000, seed: 0, hard_negatives: 3}   # procedural, virtue.train.synthetic

* `kind`: `scar` (SCaR-train parquet), `mmeb` (MMEB-train parquet) or `jsonl` (the format below).
* `path`: one file, or a folder (layouts below).
* `name`: renames the subset of a source that holds a single one.
* `subsets`: for a folder, the subsets to keep (default: all); an unknown name is an error that lists the folder's.
* `image_root`: folder that relative image and mask paths are resolved against (default below).
* `weight`: relative probability of drawing a batch from this source's subsets (default 1, the official mix).
* `limit`: keep the first N good rows of each subset (the official recipe keeps the first 100,000).
* `hard_negatives`: number of negatives per example, the first N of each row (default 0: in-batch negatives only).
  A row with fewer is rejected, so that every example of a batch carries the same number.
* `masks` (scar only, default false): also give the `segmentation` polygon as a mask prompt (below).

Layouts of `path`
-----------------

* A single `.parquet` file (scar, mmeb) or `.jsonl` file: one subset named by its stem.
* A flat folder of `*.parquet` / `*.jsonl` files: one subset per file, named by its stem. The official SCaR-train
  layout is one: `SCAR_RefCOCO_plus.parquet`, `SCAR_RefCOCOg.parquet`, `SCAR_ADE20K.parquet`,
  `SCAR_VisualGenome.parquet`, `SCAR_COCO_Stuff.parquet`, images under `images/<subset>_train/` beside them.
* MMEB-train as cloned from the hub (`TIGER-Lab/MMEB-train`, kind mmeb, a folder with no `*.parquet` directly in
  it): one folder per subset holding `original-0000k-of-0000n.parquet`, `diverse_instruction-...` and `train-...`
  shards. Only the `original` split is read, as the official recipe does (virtue-spec §5.1); a subset's shards are
  read in shard order, the subset is named by its folder, and row ids are `<Subset>/original-00000-of-00001.parquet:
  <row>`. Folders without `original-*.parquet` (`images/`, `images_zip/`, subsets with another split only) are
  skipped. `MMEB_TRAIN_SUBSETS` lists the 20 subsets of the recipe; other subset folders are loaded too unless
  `subsets` leaves them out, with a warning.
* A `datasets` folder written by `save_to_disk` or an `.arrow` file (kind mmeb; needs `datasets`): one subset, the
  `original` split of a `DatasetDict`.

Where images are found (`image_root`)
-------------------------------------

A given `image_root` is used as is: a row's path is `image_root / path`. Without it, paths are relative to the
data folder (the folder given as `path`, or the folder of a single file), and for scar and mmeb, when that folder
holds an `images/` folder, a path that does not itself start with `images/` is looked up inside `images/`. Thus:

* MMEB-train: the rows store `images/<Subset>/Train/<file>.jpg` (e.g. `images/ImageNet_1K/Train/image_0.jpg`), and
  the image archives `images_zip/<Subset>.zip` are unpacked into `<clone>/images/` by the dataset's
  `unzip_file.py`; VLM2Vec's training README passes `--image_dir MMEB-train`, the clone itself. So the clone's
  folder is the right base: `path: data/MMEB-train` needs no `image_root` (set it for images kept elsewhere, e.g.
  VLM2Vec's later configs point `image_dir` at `vlm2vec_train/MMEB-train/image`).
  Sources: VLM2Vec `README.md` at 7ba08a5 ("git clone .../TIGER-Lab/MMEB-train; cd MMEB-train; python
  unzip_file.py", `--image_dir MMEB-train`) and `experiments/public/data/download_data.sh`; `load_mmeb_dataset`
  (`src/data/dataset/mmeb_dataset.py`) joins `image_dir` and the row's path. The `images/<Subset>/Train/` form
  was seen in third-party code quoting raw MMEB-train rows, not in a file of TIGER-Lab's.
* SCaR-train: rows store `<subset>_train/<file>` (virtue-spec §5.2) and are found in `<path>/images/`; rows that
  store `images/<subset>_train/<file>` resolve against `<path>` and reach the same file.
* JSON lines: always relative to the `.jsonl` file's folder (no `images/` rule).

Rows
----

SCaR-train rows (virtue-spec §5.2) become: query = the image and the `bbox` (COCO `[x, y, w, h]` pixels, turned
into `[x1, y1, x2, y2]`) as a box prompt *and* written into the text (`qry` + `"\\nReferring object bbox: [x1, y1,
x2, y2]"`); positive = `pos_text`; negatives = `neg_text`. As in the official code the query gets the box only;
`masks: true` adds the `segmentation` COCO polygons, when a row has them, as a mask prompt (box + mask; the
evaluation's matching protocol is the SCaR `box_mask` variant). Without `masks` the column is not read.
MMEB-train rows (§5.1): `qry` / `qry_image_path`, `pos_text` / `pos_image_path`, `neg_text` / `neg_image_path`,
`<|image_1|>` swapped for `<|image_pad|>`, an empty image path meaning a text-only side.

Image checks (`check_images`)
-----------------------------

`load_sources(..., check_images=True)` (the default) checks at load time that every image file exists and its
header is readable, and that boxes, points, masks and polygons lie within the image. That opens one header per
image on every rank, too slow for a million rows. With `check_images=False` no image file is opened: everything
else is still checked at load (texts, bbox shape and area, polygon format, points and labels, negatives count, image
paths being non-empty strings), and the checks that need an image are recorded on the example
(`TrainExample.deferred`, a tuple of `DeferredCheck`). `run_deferred_checks(example, sizes)` runs them later, e.g.
in a DataLoader worker, and returns the first failure as the same `BadRow` (column, reason) the load-time check
would have reported. With deferred checks, `limit` counts rows that passed the load-time checks.

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

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from virtue.errors import ConfigError, DataError, InputError, PromptError
from virtue.inputs import EmbedInput, as_stored, parse_input
from virtue.processing.text import DATASET_IMAGE_TOKEN, IMAGE_TOKEN, scar_train_query_text
from virtue.prompts import Box, VisualPrompt
from virtue.rows import BadRow, DeferredCheck, ImageHeaders, MaskFile, PolygonMask, deferred_failure
from virtue.rows import BadValue as _BadValue
from virtue.rows import check_image_tokens as _check_tokens
from virtue.train.examples import TrainExample

__all__ = [
    "MMEB_TRAIN_SUBSETS", "BadRow", "DataSource", "DeferredCheck", "ImageHeaders", "PolygonMask", "Subset",
    "load_source", "load_sources", "run_deferred_checks",
]  # fmt: skip

logger = logging.getLogger(__name__)

KINDS = ("scar", "mmeb", "jsonl")
ON_BAD_ROW = ("skip", "error")
SCAR_COLUMNS = ("qry", "qry_image_path", "pos_text", "bbox")
MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
JSONL_KEYS = ("query", "positive", "negatives", "subset")
# The 20 subsets of the official MMEB-train recipe (virtue-spec §5.1, `train_mmeb.yaml`).
MMEB_TRAIN_SUBSETS = (
    "ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
    "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
    "NIGHTS", "WebQA", "MSCOCO",
)  # fmt: skip
MMEB_SPLIT = "original"  # the split the official recipe trains on
_SHARD = re.compile(rf"{MMEB_SPLIT}-(\d+)-of-(\d+)\.parquet")
IMAGES_FOLDER = "images"
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
    subsets: tuple[str, ...] | None = None
    masks: bool = False

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
        if self.subsets is not None:
            object.__setattr__(self, "subsets", _subset_names(self.subsets, self.kind))
        if not isinstance(self.masks, bool):
            raise ConfigError(f"masks: expected true or false, got {self.masks!r}")
        if self.masks and self.kind != "scar":
            raise ConfigError(f"masks: only kind 'scar' has segmentation polygons, not {self.kind!r}")

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


def _subset_names(value: Any, kind: str) -> tuple[str, ...]:
    if kind == "jsonl":
        raise ConfigError("subsets: a jsonl source names its subsets in its rows; select them with separate files")
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"subsets: expected a non-empty list of subset names, got {value!r}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"subsets: expected non-empty strings, got {list(value)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"subsets: a name is listed twice in {list(value)}")
    return tuple(value)


@dataclass(frozen=True, eq=False)
class Subset:
    """The good examples of one sub-dataset, the rows rejected from it, and its sampling weight."""

    name: str
    examples: list[TrainExample]
    bad_rows: list[BadRow] = field(default_factory=list)
    weight: float = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def load_sources(
    sources: Iterable[DataSource | dict[str, Any]], *, on_bad_row: str = "skip", check_images: bool = True
) -> list[Subset]:
    """Load several sources (config mappings or `DataSource`s); subset names must be unique across all of them.

    check_images: False opens no image file; the checks that need one are left on the examples
        (`TrainExample.deferred`, run by `run_deferred_checks`).
    """
    subsets: list[Subset] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(sources):
        source = item if isinstance(item, DataSource) else DataSource.from_dict(item, where=f"data[{i}]")
        for subset in load_source(source, on_bad_row=on_bad_row, check_images=check_images):
            if subset.name in seen:
                raise ConfigError(
                    f"data[{i}]: subset name {subset.name!r} is already used by data[{seen[subset.name]}]; "
                    "set 'name' (or rename the file) so that every subset has its own name"
                )
            seen[subset.name] = i
            subsets.append(subset)
    return subsets


def load_source(source: DataSource, *, on_bad_row: str = "skip", check_images: bool = True) -> list[Subset]:
    """Read and validate every row of one source.

    on_bad_row: "skip" drops bad rows, keeps them in `Subset.bad_rows` and logs a warning per subset;
        "error" raises `DataError` at the first one.
    check_images: True checks image files (existence, header, prompts within bounds) now; False defers these
        checks to `run_deferred_checks` and opens no image file.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row: expected one of {list(ON_BAD_ROW)}, got {on_bad_row!r}")
    if source.image_root is not None and not Path(source.image_root).is_dir():
        raise ConfigError(f"image_root: folder not found: {source.image_root}")
    collector = _Collector(source, on_bad_row, check_images)
    path = Path(source.path)
    if source.kind == "jsonl":
        for file in _flat_files(source, ".jsonl"):
            _read_jsonl(file, _context(source, file.parent), collector)
    elif source.kind == "mmeb" and _is_hf_dataset(path):
        if source.subsets is not None:
            raise ConfigError(f"subsets: {path} holds a single subset; 'subsets' selects among a folder's")
        context = _context(source, path.parent)
        _read_rows(source.name or path.stem, f"{path.name}:", _hf_rows(path, _required_columns(source)), context,
                   collector)
    else:
        root = path if path.is_dir() else path.parent
        context = _context(source, root)
        for subset in _parquet_subsets(source):
            _read_parquet_subset(subset, context, collector)
    return collector.finish()


def run_deferred_checks(example: TrainExample, sizes: ImageHeaders | None = None) -> BadRow | None:
    """Run the image checks left on an example by `load_sources(..., check_images=False)`.

    sizes: a header-size cache to reuse across calls (one per worker process), so that each header is read once.
    Returns the first failure as the `BadRow` (subset, row id, column, reason) that the check at load time would
    have reported, or None when the example is good (or has no deferred check).
    """
    sizes = ImageHeaders() if sizes is None else sizes
    for check in example.deferred:
        reason = deferred_failure(check, sizes)
        if reason is not None:
            return BadRow(example.subset, example.row_id, check.column, reason)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Files and layouts


@dataclass(frozen=True)
class _SubsetFiles:
    """The parquet file(s) of one subset, read one after the other; row ids are `<prefix><file name>:<row>`."""

    name: str
    files: tuple[Path, ...]
    prefix: str = ""


def _flat_files(source: DataSource, suffix: str) -> list[Path]:
    path = Path(source.path)
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


def _parquet_subsets(source: DataSource) -> list[_SubsetFiles]:
    """The subsets of a parquet source, in any of its layouts, after `subsets` and `name` are applied."""
    path = Path(source.path)
    if path.is_file():
        if source.subsets is not None:
            raise ConfigError(f"subsets: {path} is a single file; 'subsets' selects among a folder's")
        return [_SubsetFiles(source.name or path.stem, (path,))]
    if not path.is_dir():
        raise ConfigError(f"path: not found: {path}")
    flat = sorted(path.glob("*.parquet"))
    if flat:
        found = [_SubsetFiles(f.stem, (f,)) for f in flat]
    elif source.kind == "mmeb":
        found = _hub_subsets(path)
    else:
        raise ConfigError(f"path: no *.parquet file in folder {path}")
    found = _selected(found, source, path)
    if source.name is not None:
        if len(found) > 1:
            raise ConfigError(
                f"name: {source.name!r} can only name a single subset; the {len(found)} subsets in {path} "
                "are named by their files or folders"
            )
        found = [dataclasses.replace(found[0], name=source.name)]
    return found


def _selected(found: list[_SubsetFiles], source: DataSource, path: Path) -> list[_SubsetFiles]:
    by_name = {s.name: s for s in found}
    if source.subsets is None:
        return found
    unknown = [n for n in source.subsets if n not in by_name]
    if unknown:
        raise ConfigError(f"subsets: {unknown} not found in {path}; available: {sorted(by_name)}")
    return [by_name[n] for n in source.subsets]


def _hub_subsets(root: Path) -> list[_SubsetFiles]:
    """TIGER-Lab/MMEB-train as cloned: one folder per subset; only its `original-*.parquet` shards are read."""
    found, other_splits = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        shards = _original_shards(folder)
        if shards:
            found.append(_SubsetFiles(folder.name, shards, prefix=f"{folder.name}/"))
        elif any(folder.glob("*.parquet")):
            other_splits.append(folder.name)
    if not found:
        raise ConfigError(
            f"path: no *.parquet file in folder {root}, and no subset folder with "
            f"{MMEB_SPLIT}-*.parquet shards (the TIGER-Lab/MMEB-train layout)"
        )
    if other_splits:
        logger.warning("%s: skipped subset folder(s) without %s-*.parquet shards: %s", root, MMEB_SPLIT, other_splits)
    return found


def _original_shards(folder: Path) -> tuple[Path, ...]:
    """The `original-0000k-of-0000n.parquet` shards of a subset folder, in shard order, all n present."""
    files = sorted(folder.glob(f"{MMEB_SPLIT}-*.parquet"))
    shards: dict[int, Path] = {}
    totals = set()
    for file in files:
        match = _SHARD.fullmatch(file.name)
        if match is None:
            raise ConfigError(f"{file}: unexpected shard name; expected {MMEB_SPLIT}-<k>-of-<n>.parquet")
        shards[int(match[1])] = file
        totals.add(int(match[2]))
    if not shards:
        return ()
    total = max(totals)
    if len(totals) != 1 or sorted(shards) != list(range(total)):
        # A half-downloaded subset would otherwise train on part of its rows without a word.
        raise ConfigError(f"{folder}: incomplete or inconsistent {MMEB_SPLIT} shards {[f.name for f in files]}; "
                          f"expected {MMEB_SPLIT}-00000-of-{total:05d}.parquet ... all {total}")
    return tuple(shards[k] for k in range(total))


def _required_columns(source: DataSource) -> tuple[str, ...]:
    columns = SCAR_COLUMNS if source.kind == "scar" else MMEB_COLUMNS
    return (*columns, "neg_text") if source.hard_negatives else columns


def _check_columns(path: Path, present: Iterable[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in set(present)]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}")


def _parquet_rows(path: Path, source: DataSource) -> Iterator[dict[str, Any]]:
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
    optional = ("segmentation",) if source.masks else ()
    wanted = dict.fromkeys((*required, *optional, "neg_text", "neg_image_path"))
    columns = [c for c in wanted if c in file.schema_arrow.names]
    # Batches, not the whole table: with `limit` a 400k-row subset is only read up to its first N good rows.
    return (row for batch in file.iter_batches(1024, columns=columns) for row in batch.to_pylist())


def _read_parquet_subset(subset: _SubsetFiles, context: _Context, collector: _Collector) -> None:
    collector.open(subset.name)
    for file in subset.files:
        if collector.full(subset.name):
            return
        rows = _parquet_rows(file, collector.source)
        _read_rows(subset.name, f"{subset.prefix}{file.name}:", rows, context, collector)


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
        split = MMEB_SPLIT if MMEB_SPLIT in data else splits[0] if len(splits) == 1 else None
        if split is None:
            raise ConfigError(f"path: {path} holds the splits {splits}; expected '{MMEB_SPLIT}' or a single split")
        data = data[split]
    _check_columns(path, data.column_names, required)
    yield from data


def _read_rows(
    name: str, row_prefix: str, rows: Iterable[dict[str, Any]], context: _Context, collector: _Collector
) -> None:
    convert = _scar_example if collector.source.kind == "scar" else _mmeb_example
    collector.open(name)
    for index, row in enumerate(rows):
        if collector.full(name):
            break
        collector.add(name, f"{row_prefix}{index}", partial(convert, row, context))


def _read_jsonl(path: Path, context: _Context, collector: _Collector) -> None:
    default = collector.source.name or path.stem
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
    """Groups the examples of one source by subset, runs or defers the image checks, applies `limit`, and reports
    bad rows."""

    def __init__(self, source: DataSource, on_bad_row: str, check_images: bool):
        self.source = source
        self.on_bad_row = on_bad_row
        self.check_images = check_images
        self.sizes = ImageHeaders()
        self.examples: dict[str, list[TrainExample]] = {}
        self.bad_rows: dict[str, list[BadRow]] = {}

    def open(self, name: str) -> None:
        self.examples.setdefault(name, [])
        self.bad_rows.setdefault(name, [])

    def full(self, name: str) -> bool:
        return self.source.limit is not None and len(self.examples[name]) >= self.source.limit

    def add(self, name: str, row_id: str, convert: Callable[[list[DeferredCheck]], Sides]) -> None:
        checks: list[DeferredCheck] = []
        try:
            query, positive, negatives = convert(checks)
        except _BadValue as bad:
            self.reject(BadRow(name, row_id, bad.column, bad.reason))
            return
        # Dataset boxes are in stored pixels: the images are read as stored, without EXIF rotation.
        query, positive, negatives = as_stored(query), as_stored(positive), tuple(as_stored(n) for n in negatives)
        example = TrainExample(query, positive, negatives, subset=name, row_id=row_id, deferred=tuple(checks))
        if self.check_images:
            # The same checks as a worker would run later, so that both paths report the same bad rows.
            bad = run_deferred_checks(example, self.sizes)
            if bad is not None:
                self.reject(bad)
                return
            example = dataclasses.replace(example, deferred=())
        self.examples[name].append(example)

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
        if self.source.kind == "mmeb" and self.source.subsets is None:
            other = sorted(s.name for s in subsets if s.name not in MMEB_TRAIN_SUBSETS and self.source.name is None)
            if len(subsets) > 1 and other:
                logger.warning("%s: loaded subset(s) outside the recipe's 20 (MMEB_TRAIN_SUBSETS): %s; "
                               "set 'subsets' to choose", self.source.path, other)
        return subsets


# ---------------------------------------------------------------------------------------------------------------
# Row checks shared by every format


@dataclass(frozen=True)
class _ImageBase:
    """Where relative image paths live: `root`, or `images` for paths that do not start with `images/`."""

    root: Path
    images: Path | None = None

    def resolve(self, value: str) -> Path:
        relative = PurePath(value)
        if self.images is not None and not relative.is_absolute() and relative.parts[:1] != (IMAGES_FOLDER,):
            return self.images / relative
        return self.root / relative


@dataclass(frozen=True)
class _Context:
    base: _ImageBase
    hard_negatives: int
    masks: bool = False

    def image(self, value: Any, column: str, checks: list[DeferredCheck]) -> Path:
        """The resolved path; its existence and header are checked later (`DeferredCheck` with no part)."""
        if not isinstance(value, str) or not value.strip():
            raise _BadValue(column, f"expected an image path, got {value!r}")
        path = self.base.resolve(value)
        checks.append(DeferredCheck(column, path))
        return path


def _context(source: DataSource, folder: Path) -> _Context:
    if source.image_root is not None:
        base = _ImageBase(Path(source.image_root))
    else:
        images = folder / IMAGES_FOLDER
        use_images = source.kind != "jsonl" and images.is_dir()
        base = _ImageBase(folder, images if use_images else None)
    return _Context(base, source.hard_negatives, source.masks)


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


def _polygon_mask(value: Any, image: Path) -> PolygonMask | None:
    """The format of COCO polygons; their bounds need the image's size and are a deferred check."""
    rings = _as_list(value)
    if not rings:
        return None  # null / [] = no segmentation, as in the released SCaR files
    for ring in rings:
        numbers = _numbers(ring)
        if numbers is None or len(numbers) < 6 or len(numbers) % 2:
            raise _BadValue("segmentation", "expected COCO polygons [[x1, y1, x2, y2, x3, y3, ...], ...]")
    return PolygonMask(rings, image=image)


def _scar_example(row: dict[str, Any], context: _Context, checks: list[DeferredCheck]) -> Sides:
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
    _check_tokens(query, "qry")
    positive = EmbedInput(text=pos_text)
    _check_tokens(positive, "pos_text")
    negatives = _first_negatives(_as_list(row.get("neg_text")), context.hard_negatives, "neg_text")
    return query, positive, tuple(EmbedInput(text=_text(t, "neg_text")) for t in negatives)


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train


def _mmeb_side(
    text: Any, image_path: Any, columns: tuple[str, str], context: _Context, checks: list[DeferredCheck]
) -> EmbedInput:
    text_column, image_column = columns
    if text is not None and not isinstance(text, str):
        raise _BadValue(text_column, f"expected a string, got {type(text).__name__}")
    image = None
    if image_path is not None and image_path != "":  # an empty path is a text-only side
        image = context.image(image_path, image_column, checks)
    elif text is None or not text.strip():
        raise _BadValue(text_column, "empty text and no image")
    side = EmbedInput(text=None if text is None else text.replace(DATASET_IMAGE_TOKEN, IMAGE_TOKEN), image=image)
    _check_tokens(side, text_column)
    return side


def _mmeb_example(row: dict[str, Any], context: _Context, checks: list[DeferredCheck]) -> Sides:
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


def _jsonl_side(value: Any, column: str, context: _Context, checks: list[DeferredCheck]) -> EmbedInput:
    if isinstance(value, dict):
        value = dict(value)
        image = value.get("image")
        if image is not None:
            if not isinstance(image, str) or not image.strip():
                raise _BadValue(f"{column}.image", f"expected an image path, got {image!r}")
            value["image"] = context.base.resolve(image)
        if isinstance(value.get("mask"), str):
            value["mask"] = MaskFile(context.base.resolve(value["mask"]))  # read by its deferred check
    elif not isinstance(value, str):
        raise _BadValue(column, f"expected an object or a string, got {type(value).__name__}")
    try:
        side = parse_input(value)
    except InputError as exc:
        raise _BadValue(column, str(exc).removeprefix("input 0: ")) from None
    box = side.prompt.box if side.prompt is not None else None
    if box is not None:
        try:
            box.check_shape()  # needs no image: checked now
        except PromptError as exc:
            raise _BadValue(f"{column}.box", str(exc)) from None
    if side.image is not None:
        image = Path(side.image)
        checks.append(DeferredCheck(f"{column}.image", image))
        for name in ("box", "points", "mask"):
            part = getattr(side.prompt, name, None)
            if part is not None:
                checks.append(DeferredCheck(f"{column}.{name}", image, part))
    _check_tokens(side, f"{column}.text")
    return side


def _jsonl_example(record: dict[str, Any], context: _Context, checks: list[DeferredCheck]) -> Sides:
    unknown = sorted(set(record) - set(JSONL_KEYS))
    if unknown:
        raise _BadValue(unknown[0], f"unknown key(s) {unknown}; allowed: {list(JSONL_KEYS)}")
    for key in ("query", "positive"):
        if key not in record:
            raise _BadValue(key, "missing")
    query = _jsonl_side(record["query"], "query", context, checks)
    positive = _jsonl_side(record["positive"], "positive", context, checks)
    given = record.get("negatives", [])
    if not isinstance(given, list):
        raise _BadValue("negatives", f"expected a list, got {type(given).__name__}")
    chosen = _first_negatives(given, context.hard_negatives, "negatives")
    negatives = tuple(_jsonl_side(n, f"negatives[{i}]", context, checks) for i, n in enumerate(chosen))
    return query, positive, negatives
