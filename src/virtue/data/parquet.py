"""Reading the rows of dataset files: parquet, the published datasets' format, and the arrow files of Hugging Face
`datasets`. Training, evaluation and `virtue data check` read through here, so that all three see the same rows
under the same row ids, `<label>:<index>` with the index counted per file from 0 (`SCaR_eval_RefCOCOg.parquet:12`,
`ImageNet_1K/original-00000-of-00001.parquet:3`).

Rows are read in batches of a few hundred: with a limit, a 400k-row file is only read up to its first N rows.
pyarrow and `datasets` are imported when a file is opened, so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtue.data.layouts import MMEB_SPLIT
from virtue.errors import ConfigError, DataError

__all__ = ["ParquetSource", "check_columns", "hf_rows", "is_hf_dataset", "iter_rows", "open_parquet", "row_values",
           "unique_paths"]

# Files that mark a folder written by `datasets.Dataset.save_to_disk`.
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

Row = dict[str, Any]


@dataclass(frozen=True)
class ParquetSource:
    """One opened parquet file, the columns to read from it, and the label its row ids start with."""

    path: Path
    file: Any  # pyarrow.parquet.ParquetFile
    columns: tuple[str, ...]
    label: str


def check_columns(where: Path, found: Sequence[str], required: Sequence[str], *, name_found: bool = False) -> None:
    """`DataError` naming `where` and the required columns it lacks; `name_found` also lists the ones it has."""
    missing = [c for c in required if c not in set(found)]
    if missing:
        has = f"; the file has {list(found)}" if name_found else ""
        raise DataError(f"{where}: missing required column(s) {missing}{has}")


def open_parquet(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    label: str | None = None,
    name_found: bool = True,
) -> ParquetSource:
    """Open `path` and check its columns; it reads `required` and those of `optional` the file has, in that order.

    label: the prefix of its row ids; default the file name.
    name_found: a missing-column error also lists the file's columns (the evaluation reader's message).

    Raises:
        ConfigError: no such file, or pyarrow not installed.
        DataError: not a parquet file, or a required column missing.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"path: reading {path} needs pyarrow (pip install pyarrow)") from None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"path: file not found: {path}")
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as parquet ({exc})") from exc
    found = file.schema_arrow.names
    check_columns(path, found, required, name_found=name_found)
    columns = tuple(c for c in dict.fromkeys((*required, *optional)) if c in found)
    return ParquetSource(path, file, columns, path.name if label is None else label)


def iter_rows(
    sources: ParquetSource | Iterable[ParquetSource], limit: int | None = None, *, batch_size: int = 256
) -> Iterator[tuple[str, Row]]:
    """(row id, row) over the files in turn; `limit` counts rows over all of them."""
    if isinstance(sources, ParquetSource):
        sources = [sources]
    count = 0
    for source in sources:
        index = 0
        for batch in source.file.iter_batches(batch_size, columns=list(source.columns)):
            for row in batch.to_pylist():
                if limit is not None and count >= limit:
                    return
                yield f"{source.label}:{index}", row
                index += 1
                count += 1


def row_values(
    files: Sequence[Path],
    columns: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    required: Sequence[str] = (),
    limit: int | None = None,
) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """Per row of the parquet files (`iter_rows`: row ids `<label>:<row>`, label default the file name; `limit`
    rows over all files; `required` columns, a `DataError` when one is missing), its id and the (column, value)
    pairs of `columns` present in the file; a list column gives one pair per item, named `column[k]`."""
    labels = [f.name for f in files] if labels is None else labels
    sources = [open_parquet(file, required, [c for c in columns if c not in required], label=label)
               for file, label in zip(files, labels, strict=True)]
    for row_id, row in iter_rows(sources, limit):
        pairs: list[tuple[str, Any]] = []
        for column in columns:
            if column not in row:
                continue
            value = row[column]
            if isinstance(value, list):
                pairs.extend((f"{column}[{k}]", item) for k, item in enumerate(value))
            else:
                pairs.append((column, value))
        yield row_id, pairs


def unique_paths(files: Iterable[Path], *columns: str) -> list[str]:
    """The distinct non-empty string values of `columns` (image paths), in row order."""
    seen: dict[str, None] = {}
    for _, pairs in row_values(list(files), columns):
        for _, value in pairs:
            if isinstance(value, str) and value.strip():
                seen.setdefault(value, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face `datasets` files


def is_hf_dataset(path: Path) -> bool:
    """A folder written by `save_to_disk`, or an `.arrow` file."""
    if path.is_file():
        return path.suffix == ".arrow"
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def hf_rows(path: Path, required: Sequence[str], label: str | None = None) -> Iterator[tuple[str, Row]]:
    """(row id, row) of a `datasets` folder (`save_to_disk`) or `.arrow` file; a `DatasetDict` gives its
    `original` split (or its only one). `datasets` is an optional dependency, imported at the first row.

    label: the prefix of the row ids; default the file or folder name.
    """
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
    check_columns(path, data.column_names, required)
    prefix = path.name if label is None else label
    for index, row in enumerate(data):
        yield f"{prefix}:{index}", row
