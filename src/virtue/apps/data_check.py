"""`virtue data check DATASET DEST`: every image the rows of a downloaded dataset name, checked before a long run.

`check(kind, dest)` resolves every image path of every row as the reader does (`virtue.train.data.load_source` for
the training sets, which it runs without opening an image; for the evaluation sets the task files `virtue eval`
finds, `image_root / path` under the image root it would use) and reports, per subset, the rows, the images named,
and each image that is missing or whose header cannot be read (`decode=True`: that cannot be decoded fully), with
the first row and column naming it and how many other rows name it. Row ids are the readers' (`SCaR_eval_RefCOCOg
.parquet:12`, `ImageNet_1K/original-00000-of-00001.parquet:3`). For the training sets it also lists the rows the
reader drops for other reasons (empty texts, bad boxes); negatives' images are checked when `hard_negatives` asks
for negatives, as training reads them only then.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from virtue.apps.data_fetch import check_kind, resolve_subsets
from virtue.data.layouts import DATASETS
from virtue.data.parquet import row_values
from virtue.errors import ConfigError, ImageError
from virtue.images import load_image, read_image_size

__all__ = ["CheckReport", "Problem", "SubsetCheck", "check"]


@dataclass(frozen=True)
class Problem:
    """An image that a row names and that cannot be used.

    kind: "missing" (no such file), "unreadable" (its header, or with `decode` its pixels, cannot be read) or
        "bad path" (the row's value is not an image path).
    row_id / column: the first row naming it; `other_rows`: how many more references name it.
    """

    kind: str
    subset: str
    row_id: str
    column: str
    path: str
    reason: str
    other_rows: int = 0

    def __str__(self) -> str:
        more = f" (and {self.other_rows} more reference{'s' if self.other_rows > 1 else ''})" if self.other_rows else ""
        return f"{self.kind}: {self.subset} row {self.row_id}, column {self.column!r}: {self.reason}{more}"


@dataclass
class SubsetCheck:
    """One subset's rows and images, and what is wrong with them."""

    name: str
    rows: int = 0
    references: int = 0
    images: int = 0
    problems: list[Problem] = field(default_factory=list)
    missing_folders: dict[str, int] = field(default_factory=dict)  # folder not found -> images named in it
    dropped_rows: list[Any] = field(default_factory=list)  # `BadRow`s a training reader drops for other reasons

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.problems)


@dataclass
class CheckReport:
    kind: str
    dest: Path
    image_root: Path | None
    decode: bool
    subsets: list[SubsetCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(s.problems for s in self.subsets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.kind, "dest": str(self.dest),
            "image_root": None if self.image_root is None else str(self.image_root), "decode": self.decode,
            "ok": self.ok,
            "subsets": [{
                "name": s.name, "rows": s.rows, "image_references": s.references, "images": s.images,
                "missing": s.count("missing"), "unreadable": s.count("unreadable"), "bad_paths": s.count("bad path"),
                "missing_folders": s.missing_folders,
                "problems": [p.__dict__ for p in s.problems],
                "dropped_rows": [b.__dict__ for b in s.dropped_rows],
            } for s in self.subsets],
        }  # fmt: skip


# A reference: (row id, column, resolved image path, or None with the reason the value is not a path).
_Ref = tuple[str, str, Path | None, str]


def check(
    kind: str,
    dest: str | Path,
    *,
    image_root: str | Path | None = None,
    subsets: Sequence[str] | None = None,
    decode: bool = False,
    hard_negatives: int = 0,
    limit: int | None = None,
    workers: int = 8,
    progress: bool = True,
) -> CheckReport:
    """Every image the rows of dataset `kind` under `dest` name, checked as the readers would find it (module
    docstring).

    image_root: as the reader's (`--image-root`, `image_root:`); default the reader's default.
    subsets: the subsets to check (`resolve_subsets`); default every one found under `dest`.
    decode: decode every image fully instead of reading its header (slower; finds truncated files).
    hard_negatives: training sets: also check the first N negatives' images, as training with N negatives reads.
    limit: the first N rows of each subset (training sets: N good rows, as the reader's `limit`).
    workers: threads reading images.
    """
    check_kind(kind)
    dest = Path(dest)
    if not dest.is_dir():
        raise ConfigError(f"{kind}: folder not found: {dest}")
    if workers < 1:
        raise ConfigError(f"workers: expected an integer >= 1, got {workers}")
    named = resolve_subsets(kind, subsets)
    root = Path(image_root) if image_root is not None else None
    report = CheckReport(kind, dest, root, decode)
    if kind in ("scar-train", "mmeb-train"):
        parts = _train_references(kind, dest, root, named, hard_negatives, limit)
    else:
        parts = _eval_references(kind, dest, root, named, limit)
    for subset, refs in parts:
        _check_subset(subset, refs, decode, workers, progress)
        report.subsets.append(subset)
    return report


def _train_references(
    kind: str, dest: Path, image_root: Path | None, subsets: tuple[str, ...] | None, hard_negatives: int,
    limit: int | None,
) -> Iterator[tuple[SubsetCheck, Iterator[_Ref]]]:
    """The training reader's own rows and resolved paths: `load_source(..., check_images=False)` opens no image and
    leaves each row's image checks on the example (`DeferredCheck`s without a prompt part: the files)."""
    from virtue.train.data import DataSource, load_source

    if kind == "scar-train" and subsets is not None:
        subsets = tuple(f"SCAR_{s}" for s in subsets)
    source = DataSource(kind="scar" if kind == "scar-train" else "mmeb", path=str(dest),
                        image_root=None if image_root is None else str(image_root), subsets=subsets,
                        hard_negatives=hard_negatives, limit=limit)
    for subset in load_source(source, on_bad_row="skip", check_images=False):
        refs = ((e.row_id, c.column, c.image, "") for e in subset.examples for c in e.deferred if c.part is None)
        rows = len(subset.examples) + len(subset.bad_rows)
        yield SubsetCheck(subset.name, rows=rows, dropped_rows=list(subset.bad_rows)), refs


def _eval_references(
    kind: str, dest: Path, image_root: Path | None, subsets: tuple[str, ...] | None, limit: int | None
) -> Iterator[tuple[SubsetCheck, Iterator[_Ref]]]:
    """The task files `virtue eval` finds under `dest` (`available_tasks`) and its image root (`--image-root`, else
    SCaR: the data root; MMEB: `mmeb_image_root`), each row's path joined to it as the evaluation reader does."""
    from virtue.eval.runner import EvalConfig, available_tasks, task_files

    benchmark = "scar" if kind == "scar-eval" else "mmeb"
    cfg = EvalConfig(benchmark=benchmark, data_root=str(dest), tasks=subsets,
                     image_root=None if image_root is None else str(image_root))
    for task in available_tasks(cfg):
        files, root = task_files(task, cfg)
        labels = [files[0].name] if benchmark == "scar" else [f.relative_to(dest).as_posix() for f in files]
        subset = SubsetCheck(task.name)
        yield subset, _eval_refs(subset, files, labels, root, benchmark, limit)


def _eval_refs(
    subset: SubsetCheck, files: Sequence[Path], labels: Sequence[str], root: Path, benchmark: str, limit: int | None
) -> Iterator[_Ref]:
    """Row ids `<label>:<row>` counted per file, `limit` over all files: the evaluation reader's own rows
    (`virtue.data.parquet`)."""
    columns = DATASETS["scar-eval" if benchmark == "scar" else "mmeb-eval"].image_columns
    for row_id, pairs in row_values(files, columns, labels=labels, required=columns[:1], limit=limit):
        subset.rows += 1
        for column, value in pairs:
            if isinstance(value, str) and value.strip():
                yield row_id, column, root / value, ""
            elif benchmark == "scar":  # a SCaR query always has an image; an empty MMEB path is a text-only side
                yield row_id, column, None, f"expected an image path, got {value!r}"
            elif value is not None and not isinstance(value, str):
                yield row_id, column, None, f"expected an image path or '', got {value!r}"


def _check_subset(subset: SubsetCheck, refs: Iterator[_Ref], decode: bool, workers: int, progress: bool) -> None:
    first: dict[Path, tuple[str, str]] = {}
    counts: Counter[Path] = Counter()
    bad_values: list[Problem] = []
    for row_id, column, path, reason in refs:
        subset.references += 1
        if path is None:
            bad_values.append(Problem("bad path", subset.name, row_id, column, "", reason))
            continue
        first.setdefault(path, (row_id, column))
        counts[path] += 1
    subset.images = len(first)
    inspect = _decode_failure if decode else _header_failure
    paths = list(first)
    with ThreadPoolExecutor(workers) as pool:
        failures = list(tqdm(pool.map(inspect, paths), total=len(paths), desc=f"check {subset.name}", unit="img",
                             disable=not progress or not paths, leave=False))
    problems = list(bad_values)
    for path, failure in zip(paths, failures, strict=True):
        if failure is None:
            continue
        kind, reason = failure
        row_id, column = first[path]
        problems.append(Problem(kind, subset.name, row_id, column, str(path), reason, counts[path] - 1))
        if kind == "missing" and not path.parent.is_dir():
            subset.missing_folders[str(path.parent)] = subset.missing_folders.get(str(path.parent), 0) + 1
    subset.problems = problems


def _header_failure(path: Path) -> tuple[str, str] | None:
    """The readers' own check (`virtue.images.read_image_size`): the file exists and its header gives a size."""
    size = read_image_size(path)
    if isinstance(size, str):
        return ("missing" if not path.is_file() else "unreadable"), size
    return None


def _decode_failure(path: Path) -> tuple[str, str] | None:
    """The header check, then every pixel decoded (`virtue.images.load_image`)."""
    failure = _header_failure(path)
    if failure is not None:
        return failure
    try:
        load_image(path, str(path)).close()
    except ImageError as exc:
        return "unreadable", str(exc)
    return None
