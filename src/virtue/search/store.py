"""The on-disk index: one LanceDB table of image and region rows, and a JSON file naming the model.

The table lives in `<db>/items.lance`; `<db>/virtue_index.json` records the model fingerprint and the
embedding settings. Vectors from another model (or another pre-resize) live in another space, so mixing
them would return meaningless neighbours: writing or searching with a different model is refused.

Search is exact: a flat scan of every vector (LanceDB's `bypass_vector_index`) with the dot-product metric,
so results equal a brute-force numpy ranking. No ANN index is built; a flat scan of 10^6 vectors of the
2B model (1536-d) reads about 6 GB, which is the point to add one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from virtue.errors import VirtueError

logger = logging.getLogger(__name__)

TABLE = "items"
META_FILE = "virtue_index.json"
FORMAT_VERSION = 1
# Deletions are written as `IN (...)` predicates; bounded so one SQL string stays small.
_IN_CHUNK = 500
# Columns returned with search hits (the vector is left out: callers have the score).
HIT_COLUMNS = ["kind", "root", "path", "region_id", "prompt", "label", "width", "height", "sha256"]
_STATE_COLUMNS = ["kind", "path", "region_key", "size", "mtime_ns", "sha256", "width", "height"]


class IndexMismatchError(VirtueError):
    """The index was built with another model or other embedding settings than the ones given."""


class IndexNotFoundError(VirtueError):
    """No index at the given path (or a folder that is not one)."""


class MissingDependencyError(VirtueError, ImportError):
    """An optional package (lancedb, ray) that this feature needs is not installed."""


def require(module: str, feature: str, pip_name: str):
    """Import an optional dependency, or fail with the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{feature} needs `{module}`: pip install \"{pip_name}\" ({exc})") from exc


def sql_str(value: str) -> str:
    """A SQL string literal (LanceDB filters are DataFusion SQL: a quote is escaped by doubling it)."""
    return "'" + value.replace("'", "''") + "'"


def row_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("kind", pa.string()),  # "image" or "region"
            pa.field("root", pa.string()),  # absolute indexed folder
            pa.field("path", pa.string()),  # image path relative to root, POSIX separators
            pa.field("region_id", pa.string()),  # null for image rows
            pa.field("region_key", pa.string()),  # content hash of the region's sidecar line (+ mask bytes)
            pa.field("prompt", pa.string()),  # region prompt as JSON; null for image rows
            pa.field("label", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("sha256", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


@dataclass(frozen=True)
class IndexMeta:
    """What the stored vectors depend on besides the files: the model and the embedding settings."""

    fingerprint: str
    dim: int
    image_resize: tuple[int, int] | None
    image_text: str
    metric: str = "dot"
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["image_resize"] = list(self.image_resize) if self.image_resize else None
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> IndexMeta:
        data = json.loads(text)
        resize = data.get("image_resize")
        data["image_resize"] = tuple(resize) if resize else None
        return cls(**data)

    def mismatch(self, other: IndexMeta) -> str | None:
        """Why vectors made under `other` cannot share a table with these, or None."""
        for name in ("fingerprint", "dim", "image_resize", "image_text", "format"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} {theirs!r} differs from the index's {mine!r}"
        return None


class IndexStore:
    """A LanceDB table of image/region rows plus its `IndexMeta`; see the module docstring."""

    def __init__(self, db_path: Path, table: Any, meta: IndexMeta):
        self.db_path, self.table, self.meta = db_path, table, meta

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, db_path: str | Path) -> IndexStore:
        """Open an existing index for reading."""
        db_path = Path(db_path)
        meta_file = db_path / META_FILE
        if not meta_file.is_file():
            raise IndexNotFoundError(f"{db_path}: no index here (missing {META_FILE}); build one with `virtue index`")
        meta = IndexMeta.from_json(meta_file.read_text())
        db = _connect(db_path)
        if TABLE not in db:
            raise IndexNotFoundError(f"{db_path}: {META_FILE} present but the {TABLE!r} table is missing")
        return cls(db_path, db.open_table(TABLE), meta)

    @classmethod
    def open_for_writing(cls, db_path: str | Path, meta: IndexMeta, *, rebuild: bool = False) -> IndexStore:
        """Open or create the index; refuse one built under another `IndexMeta` unless `rebuild` (drop it)."""
        db_path = Path(db_path)
        if db_path.exists() and not db_path.is_dir():
            raise IndexNotFoundError(f"{db_path}: exists and is not a folder")
        meta_file = db_path / META_FILE
        db = _connect(db_path)
        exists = TABLE in db
        if exists and not meta_file.is_file() and not rebuild:
            raise IndexMismatchError(f"{db_path}: holds a {TABLE!r} table without {META_FILE}; not a virtue index")
        if exists and meta_file.is_file() and not rebuild:
            why = IndexMeta.from_json(meta_file.read_text()).mismatch(meta)
            if why:
                raise IndexMismatchError(
                    f"{db_path}: the index was built with another model or settings ({why}); use the same model "
                    "and settings, or rebuild the index with --rebuild (index_directory(..., rebuild=True))"
                )
            return cls(db_path, db.open_table(TABLE), meta)
        if exists:
            logger.info("%s: rebuilding, dropping the existing table", db_path)
            db.drop_table(TABLE)
        table = db.create_table(TABLE, schema=row_schema(meta.dim))
        meta_file.write_text(meta.to_json())  # after the table: a crash in between leaves no stale meta behind
        return cls(db_path, table, meta)

    # ----------------------------------------------------------------- reading
    def count(self, kind: str | None = None) -> int:
        return self.table.count_rows(None if kind is None else f"kind = {sql_str(kind)}")

    def to_arrow(self, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table:
        """Rows of the table (all columns unless `columns`), optionally filtered by a SQL predicate."""
        query = self.table.search()
        if columns is not None:
            query = query.select(list(columns))
        if where is not None:
            query = query.where(where)
        return query.limit(None).to_arrow()

    def state(self, root: str) -> pa.Table:
        """The columns incremental indexing compares against, for every row under `root`."""
        return self.to_arrow(_STATE_COLUMNS, where=f"root = {sql_str(root)}")

    def image_vectors(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vector of an image row for each of these file sha256s that one has (any root: one table
        holds one model's vectors under one set of settings, so equal bytes have equal vectors)."""
        values = sorted(set(shas))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(values), _IN_CHUNK):
            part = ", ".join(sql_str(v) for v in values[start : start + _IN_CHUNK])
            table = self.to_arrow(["sha256", "vector"], where=f"kind = 'image' AND sha256 IN ({part})")
            if table.num_rows == 0:
                continue
            flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors = flat.reshape(table.num_rows, -1)
            for sha, vector in zip(table.column("sha256").to_pylist(), vectors, strict=True):
                found.setdefault(sha, np.asarray(vector, np.float32))
        return found

    def nearest(self, vector: np.ndarray, top_k: int, kind: str = "all") -> pa.Table:
        """The `top_k` rows with the largest dot product with `vector`, best first; adds a `score` column."""
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape[0] != self.meta.dim:
            raise IndexMismatchError(f"query vector has {vector.shape[0]} dims, the index {self.meta.dim}")
        query = (
            self.table.search(vector, vector_column_name="vector")
            .distance_type("dot")
            .bypass_vector_index()  # exact, even if someone has added an ANN index to the table
            .select([*HIT_COLUMNS, "_distance"])  # named: an implicit _distance is deprecated
            .limit(top_k)
        )
        if kind != "all":
            query = query.where(f"kind = {sql_str(kind)}", prefilter=True)  # prefilter: k hits of that kind
        result = query.to_arrow()
        # LanceDB's dot distance is 1 - dot product.
        score = pc.subtract(pa.scalar(1.0, pa.float32()), result.column("_distance"))
        return result.append_column("score", score)

    # ----------------------------------------------------------------- writing
    def add(self, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        """Append rows (dicts of the non-vector columns) with their vectors [N, dim]."""
        if not rows:
            return
        schema = row_schema(self.meta.dim)
        columns = pa.Table.from_pylist(list(rows), schema=pa.schema(list(schema)[:-1]))
        flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
        vec = pa.FixedSizeListArray.from_arrays(flat, self.meta.dim)
        self.table.add(columns.append_column(schema.field("vector"), vec))

    def delete_images(self, root: str, paths: Iterable[str]) -> None:
        """Delete the rows (image and regions) of these images."""
        self._delete_in(f"root = {sql_str(root)}", "path", paths)

    def delete_regions(self, root: str, keys: Iterable[str]) -> None:
        self._delete_in(f"root = {sql_str(root)} AND kind = 'region'", "region_key", keys)

    def touch(self, root: str, path: str, size: int, mtime_ns: int) -> None:
        """Record a new size/mtime for an image whose bytes did not change (so it is not re-hashed next time)."""
        self.table.update(
            where=f"root = {sql_str(root)} AND path = {sql_str(path)}", values={"size": size, "mtime_ns": mtime_ns}
        )

    def _delete_in(self, base: str, column: str, values: Iterable[str]) -> None:
        values = sorted(set(values))
        for start in range(0, len(values), _IN_CHUNK):
            part = ", ".join(sql_str(v) for v in values[start : start + _IN_CHUNK])
            self.table.delete(f"{base} AND {column} IN ({part})")


def _connect(db_path: Path):
    lancedb = require("lancedb", "the search index", "lancedb")
    return lancedb.connect(str(db_path))
