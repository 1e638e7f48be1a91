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

* `kind`: `scar` (SCaR-train parquet), `mmeb` (MMEB-train parquet) or `jsonl` (JSON lines, `virtue.train.formats`).
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

How each kind's rows become examples, SCaR-train and MMEB-train columns and the JSON lines format (`kind: jsonl`):
`virtue.train.formats`.

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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from virtue.data.layouts import IMAGES_FOLDER, MMEB_SPLIT, MMEB_TRAIN_SUBSETS, original_shards
from virtue.data.parquet import hf_rows, is_hf_dataset, iter_rows, open_parquet
from virtue.data.rows import BadRow, BadValue, DeferredCheck, ImageHeaders, PolygonMask, deferred_failure
from virtue.errors import ConfigError, DataError
from virtue.inputs import as_stored
from virtue.train.examples import TrainExample
from virtue.train.formats import (
    MMEB_COLUMNS,
    SCAR_COLUMNS,
    ImageBase,
    RowContext,
    Sides,
    json_record,
    jsonl_example,
    mmeb_example,
    record_subset,
    scar_example,
)

__all__ = [
    "MMEB_TRAIN_SUBSETS", "BadRow", "DataSource", "DeferredCheck", "ImageHeaders", "PolygonMask", "Subset",
    "load_source", "load_sources", "run_deferred_checks",
]  # fmt: skip

logger = logging.getLogger(__name__)

KINDS = ("scar", "mmeb", "jsonl")
ON_BAD_ROW = ("skip", "error")
SHOWN_BAD_ROWS = 5


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
    elif source.kind == "mmeb" and is_hf_dataset(path):
        if source.subsets is not None:
            raise ConfigError(f"subsets: {path} holds a single subset; 'subsets' selects among a folder's")
        context = _context(source, path.parent)
        _read_rows(source.name or path.stem, hf_rows(path, _required_columns(source)), context, collector)
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
        shards = original_shards(folder)
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


def _required_columns(source: DataSource) -> tuple[str, ...]:
    columns = SCAR_COLUMNS if source.kind == "scar" else MMEB_COLUMNS
    return (*columns, "neg_text") if source.hard_negatives else columns


def _parquet_rows(path: Path, label: str, source: DataSource) -> Iterator[tuple[str, dict[str, Any]]]:
    required = _required_columns(source)
    optional = ("segmentation",) if source.masks else ()
    parquet = open_parquet(path, required, (*optional, "neg_text", "neg_image_path"), label=label, name_found=False)
    # Batches, not the whole table: with `limit` a 400k-row subset is only read up to its first N good rows.
    return iter_rows(parquet, batch_size=1024)


def _read_parquet_subset(subset: _SubsetFiles, context: RowContext, collector: _Collector) -> None:
    collector.open(subset.name)
    for file in subset.files:
        if collector.full(subset.name):
            return
        rows = _parquet_rows(file, f"{subset.prefix}{file.name}", collector.source)
        _read_rows(subset.name, rows, context, collector)


def _read_rows(
    name: str, rows: Iterable[tuple[str, dict[str, Any]]], context: RowContext, collector: _Collector
) -> None:
    convert = scar_example if collector.source.kind == "scar" else mmeb_example
    collector.open(name)
    for row_id, row in rows:
        if collector.full(name):
            break
        collector.add(name, row_id, partial(convert, row, context))


def _read_jsonl(path: Path, context: RowContext, collector: _Collector) -> None:
    default = collector.source.name or path.stem
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            row_id = f"{path.name}:{index}"
            try:
                record = json_record(line)
                name = record_subset(record, default)
            except BadValue as bad:
                collector.reject(BadRow(default, row_id, bad.column, bad.reason))
                continue
            collector.open(name)
            if not collector.full(name):
                collector.add(name, row_id, partial(jsonl_example, record, context))


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
        except BadValue as bad:
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
# Where a source's images are


def _context(source: DataSource, folder: Path) -> RowContext:
    if source.image_root is not None:
        base = ImageBase(Path(source.image_root))
    else:
        images = folder / IMAGES_FOLDER
        use_images = source.kind != "jsonl" and images.is_dir()
        base = ImageBase(folder, images if use_images else None)
    return RowContext(base, source.hard_negatives, source.masks)
