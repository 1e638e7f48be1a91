"""`index_directory` and `search`: a folder of images, and regions of them, as a searchable vector index.

Every image under the folder becomes one row, embedded image-only (the model's default image text and grid
prompt). A JSON-lines sidecar (default `<folder>/regions.jsonl`, see `virtue.search.sidecar`) adds one row per
region.

Re-indexing is incremental (`virtue.search.planning`): an image whose (size, mtime) is unchanged is skipped
without reading it, one whose bytes hash the same is only re-stamped, one whose bytes a stored image has (a
renamed or copied file) takes that image's vector, a changed one is re-embedded with its regions, and the rows
of a deleted one are removed. Regions are keyed by their line's content (and the mask's bytes), so an edited
line is re-embedded and a removed line is deleted. A file that cannot be read as an image is skipped and
reported (`IndexStats.skipped_files`), not fatal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from virtue.errors import InputError
from virtue.hashing import model_fingerprint
from virtue.processing.text import DEFAULT_IMAGE_TEXT
from virtue.search.planning import IndexStats, Plan, plan_index, reuse_stored_vectors, scan_images
from virtue.search.ray_options import RayOptions
from virtue.search.sidecar import load_regions
from virtue.search.store import IndexMeta, IndexMismatchError, IndexStore

__all__ = ["KINDS", "IndexStats", "RayOptions", "SearchHit", "index_directory", "open_index", "search",
           "search_vector"]

logger = logging.getLogger(__name__)

KINDS = ("image", "region", "all")
# Rows are embedded and written in chunks of this many batches: an interrupted run keeps finished chunks,
# and the next run (seeing them unchanged) resumes after them.
CHUNK_BATCHES = 8
Kind = Literal["image", "region", "all"]
ImageResize = tuple[int, int] | Literal["model", "native"] | None


@dataclass(frozen=True)
class SearchHit:
    """One result: `path` is absolute (`root` / `rel_path`); region hits carry their id, label and prompt."""

    rank: int
    score: float
    kind: str
    path: str
    rel_path: str
    root: str
    region_id: str | None = None
    label: str | None = None
    prompt: dict[str, Any] | None = None
    width: int = 0
    height: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- public API
def index_directory(
    model,
    root: str | Path,
    db_path: str | Path,
    *,
    regions: str | Path | Literal[False] | None = None,
    batch_size: int = 8,
    rebuild: bool = False,
    image_resize: ImageResize = "model",
    ray_address: str | None = None,
    ray_options: RayOptions | None = None,
    show_progress_bar: bool = True,
    fingerprint: str | None = None,
) -> IndexStats:
    """Index every image under `root` (and the regions of a JSON-lines sidecar) into the LanceDB at `db_path`.

    Args:
        model: a `VirtueModel`; its fingerprint is stored, and a later call with another model is refused.
        regions: the sidecar; default `<root>/regions.jsonl` if present; False: image rows only.
        rebuild: drop an index built with another model or settings instead of refusing.
        image_resize: "model" (the model's `compat.eval_image_resize`, as in evaluation), "native"/None, or
            (width, height); stored with the index and applied to image queries too.
        ray_address: run the embedding as a Ray Data job on this cluster ("auto", "host:port", "local").
        fingerprint: `virtue.hashing.model_fingerprint(model)` when already known (it hashes every weight).
    Returns:
        counts of what was added, updated, left unchanged, reused, skipped and removed.
    Raises:
        IndexMismatchError: the index holds vectors of another model / settings (and not `rebuild`).
        DataError: a bad sidecar line (named by file and line), before anything is written.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError(f"index: {root} is not a folder")
    if batch_size < 1:
        raise InputError(f"batch_size: must be >= 1, got {batch_size}")
    meta = IndexMeta(
        fingerprint=fingerprint or model_fingerprint(model),
        dim=int(model.config.hidden_size),
        image_resize=_resolve_resize(image_resize, model),
        image_text=DEFAULT_IMAGE_TEXT,
    )
    region_list = [] if regions is False else load_regions(root, regions)  # a bad sidecar fails before writing
    masks = {r.prompt["mask"] for r in region_list if "mask" in r.prompt}
    files = scan_images(root, exclude=masks)
    store = IndexStore.open_for_writing(db_path, meta, rebuild=rebuild)
    plan = plan_index(store, str(root), files, region_list)  # bounds are checked here, still before any write
    reuse_stored_vectors(store, plan)  # before the removals, which may delete the row it copies
    _apply_plan(store, str(root), plan)
    failed: dict[int, str] = {}
    if plan.specs:
        chunks = _embed_chunks(model, plan.specs, batch_size, meta, ray_address, ray_options, failed)
        _write(store, plan.rows, chunks, batch_size * CHUNK_BATCHES, show_progress_bar)
    plan.drop_failed(failed)
    plan.stats.embedded = len(plan.specs) - len(failed)
    logger.info("%s -> %s: %s", root, db_path, plan.stats.summary())
    return plan.stats


def search(model, db_path: str | Path, query: Any, *, top_k: int = 10, kind: Kind = "all") -> list[SearchHit]:
    """The `top_k` rows most similar to `query` (a text, or an encode() dict with image and prompt), best first.

    Raises:
        IndexMismatchError: `model` is not the model the index was built with.
    """
    store = IndexStore.open(db_path)
    fingerprint = model_fingerprint(model)
    if fingerprint != store.meta.fingerprint:
        raise IndexMismatchError(
            f"{db_path}: the index was built with model fingerprint {store.meta.fingerprint}, this model's is "
            f"{fingerprint}; search with that model, or re-index with --rebuild"
        )
    vector = model.encode(query, image_resize=store.meta.image_resize, show_progress_bar=False)
    return _nearest(store, vector, top_k, kind)


def search_vector(db_path: str | Path, vector: np.ndarray, *, top_k: int = 10, kind: Kind = "all") -> list[SearchHit]:
    """Like `search`, for a query vector already embedded with the index's model (not checked)."""
    return _nearest(IndexStore.open(db_path), vector, top_k, kind)


def open_index(db_path: str | Path) -> IndexStore:
    """The index for reading: `.meta`, `.count()`, `.to_arrow(columns)` (e.g. the vectors, for analysis)."""
    return IndexStore.open(db_path)


# --------------------------------------------------------------------------------------------- writing
def _apply_plan(store: IndexStore, root: str, plan: Plan) -> None:
    """What the plan writes without the model: removals, re-stamps, and the rows whose vector is known."""
    store.delete_images(root, plan.delete_images)
    store.delete_regions(root, plan.delete_regions)
    for file in plan.touched:
        store.touch(root, file.rel, file.size, file.mtime_ns)
    if plan.reused_rows:
        store.add(plan.reused_rows, np.stack(plan.reused_vectors))


def _embed_chunks(
    model, specs: list[dict], batch_size: int, meta: IndexMeta, ray_address: str | None,
    ray_options: RayOptions | None, failed: dict[int, str],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, vectors) chunks, in process or on Ray; the Ray path may return chunks out of order. Rows
    whose input the model refuses in process are left out, with why, in `failed`."""
    if ray_address is not None:
        from virtue.search.ray_job import embed_with_ray

        return embed_with_ray(model, specs, address=ray_address, options=ray_options or RayOptions(),
                              batch_size=batch_size, fingerprint=meta.fingerprint, image_resize=meta.image_resize)
    return _embed_local(model, specs, batch_size, meta.image_resize, failed)


def _embed_local(model, specs: list[dict], batch_size: int, image_resize,
                 failed: dict[int, str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    step = batch_size * CHUNK_BATCHES
    for start in range(0, len(specs), step):
        yield from _embed_rows(model, specs, list(range(start, min(start + step, len(specs)))), batch_size,
                               image_resize, failed)


def _embed_rows(model, specs: list[dict], indices: list[int], batch_size: int, image_resize,
                failed: dict[int, str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    try:
        vectors = model.encode([specs[i] for i in indices], batch_size=batch_size, image_resize=image_resize,
                               show_progress_bar=False)
    except InputError as exc:
        if len(indices) == 1:
            logger.warning("%s: cannot be embedded, left out (%s)", specs[indices[0]]["image"], exc)
            failed[indices[0]] = str(exc)
            return
        # A file whose header reads but whose pixels do not must not cost its chunk: embed its rows one by one.
        for i in indices:
            yield from _embed_rows(model, specs, [i], batch_size, image_resize, failed)
        return
    yield np.asarray(indices), np.asarray(vectors, np.float32)


def _write(store: IndexStore, rows: list[dict], chunks: Iterator[tuple[np.ndarray, np.ndarray]], flush: int,
           show: bool) -> None:
    """Append rows as their vectors arrive, `flush` rows per table write (few, large Lance fragments)."""
    pending: list[int] = []
    vectors: list[np.ndarray] = []
    with tqdm(total=len(rows), desc="Embedding", unit="row", disable=not show) as bar:
        for indices, part in chunks:
            pending += [int(i) for i in indices]
            vectors.append(part)
            bar.update(len(indices))
            if len(pending) >= flush:
                store.add([rows[i] for i in pending], np.concatenate(vectors))
                pending, vectors = [], []
        if pending:
            store.add([rows[i] for i in pending], np.concatenate(vectors))


# --------------------------------------------------------------------------------------------- searching
def _nearest(store: IndexStore, vector: np.ndarray, top_k: int, kind: str) -> list[SearchHit]:
    if kind not in KINDS:
        raise InputError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    if top_k < 1:
        raise InputError(f"top_k: must be >= 1, got {top_k}")
    rows = store.nearest(vector, top_k, kind).to_pylist()
    return [_hit(rank, row) for rank, row in enumerate(rows, start=1)]


def _hit(rank: int, row: dict[str, Any]) -> SearchHit:
    return SearchHit(
        rank=rank,
        score=float(row["score"]),
        kind=row["kind"],
        path=str(Path(row["root"]) / row["path"]),
        rel_path=row["path"],
        root=row["root"],
        region_id=row["region_id"],
        label=row["label"],
        prompt=None if row["prompt"] is None else json.loads(row["prompt"]),
        width=int(row["width"]),
        height=int(row["height"]),
    )


def _resolve_resize(value: ImageResize, model) -> tuple[int, int] | None:
    if value == "model":
        return model.config.compat.eval_image_resize
    if value is None or value == "native":
        return None
    width, height = (int(v) for v in value)
    return (width, height)
