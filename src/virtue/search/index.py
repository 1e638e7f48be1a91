"""`index_directory` and `search`: a folder of images, and regions of them, as a searchable vector index.

Every image under the folder becomes one row, embedded image-only (the model's default image text and grid
prompt). A JSON-lines sidecar (default `<folder>/regions.jsonl`) adds one row per region:

    {"image": "rel/photo.jpg", "box": [x1, y1, x2, y2], "id": "dog", "label": "dog", "text": "instruction"}
    {"image": "rel/photo.jpg", "points": [[x, y], ...], "labels": [1, 0]}
    {"image": "rel/photo.jpg", "mask": "rel/photo-mask.png"}

Re-indexing is incremental: an image whose (size, mtime) is unchanged is skipped without reading it, one
whose bytes hash the same is only re-stamped, a changed one is re-embedded with its regions, and the rows of
a deleted one are removed. Regions are keyed by their line's content (and the mask's bytes), so an edited
line is re-embedded and a removed line is deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from virtue.errors import DataError, InputError, VirtueError
from virtue.inputs import parse_input
from virtue.processing.text import DEFAULT_IMAGE_TEXT
from virtue.prompts import VisualPrompt
from virtue.search.store import IndexMeta, IndexMismatchError, IndexStore

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
REGIONS_FILE = "regions.jsonl"
REGION_KEYS = ("image", "box", "points", "labels", "mask", "id", "text", "label")
KINDS = ("image", "region", "all")
# Rows are embedded and written in chunks of this many batches: an interrupted run keeps finished chunks,
# and the next run (seeing them unchanged) resumes after them.
CHUNK_BATCHES = 8
Kind = Literal["image", "region", "all"]
ImageResize = tuple[int, int] | Literal["model", "native"] | None


@dataclass
class IndexStats:
    """What one `index_directory` call did. Image counts are files; region counts are sidecar lines."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0  # files with an image suffix that cannot be read as images
    regions_added: int = 0
    regions_updated: int = 0  # re-embedded because their image changed
    regions_unchanged: int = 0
    regions_removed: int = 0
    embedded: int = 0  # vectors computed by this call

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"images: {self.added} added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.removed} removed, {self.skipped} skipped; regions: {self.regions_added} added, "
            f"{self.regions_updated} updated, {self.regions_unchanged} unchanged, {self.regions_removed} removed; "
            f"{self.embedded} vectors embedded"
        )


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


@dataclass(frozen=True)
class RayOptions:
    """How `index_directory(..., ray_address=...)` runs its Ray Data job.

    `model_dir` must be readable by every worker (shared storage on a multi-node cluster): the model is saved
    there with `save_pretrained` unless it already holds a saved model. Without it, a temporary folder on the
    driver is used, which only works when the workers share the driver's filesystem (one machine).
    """

    concurrency: int = 2  # actors, each holding one model
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor; > 0 puts the model on CUDA
    model_dir: str | Path | None = None


@dataclass(frozen=True)
class _Region:
    image: str  # path relative to the root
    region_id: str
    key: str
    prompt: dict[str, Any]  # JSON-able: box / points + labels / mask (relative path) / text
    label: str | None
    where: str  # file:line, for messages
    parsed: VisualPrompt | None = field(compare=False, default=None)


@dataclass(frozen=True)
class _File:
    rel: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class _Plan:
    stats: IndexStats = field(default_factory=IndexStats)
    delete_images: list[str] = field(default_factory=list)
    delete_regions: list[str] = field(default_factory=list)
    touched: list[_File] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # table rows without the vector
    specs: list[dict[str, Any]] = field(default_factory=list)  # the matching encode() inputs


# --------------------------------------------------------------------------------------------- public API
def model_fingerprint_of(model) -> str:
    """The model's identity as the index records it: config and a hash of every weight."""
    from virtue.eval.embed_cache import model_fingerprint

    return model_fingerprint(model, json.dumps(model.config.to_dict(), sort_keys=True))


def index_directory(
    model,
    root: str | Path,
    db_path: str | Path,
    *,
    regions: str | Path | None = None,
    batch_size: int = 8,
    rebuild: bool = False,
    image_resize: ImageResize = "model",
    ray_address: str | None = None,
    ray_options: RayOptions | None = None,
    show_progress_bar: bool = True,
) -> IndexStats:
    """Index every image under `root` (and the regions of a JSON-lines sidecar) into the LanceDB at `db_path`.

    Args:
        model: a `VirtueModel`; its fingerprint is stored, and a later call with another model is refused.
        regions: the sidecar; default `<root>/regions.jsonl` if present.
        rebuild: drop an index built with another model or settings instead of refusing.
        image_resize: "model" (the model's `compat.eval_image_resize`, as in evaluation), "native"/None, or
            (width, height); stored with the index and applied to image queries too.
        ray_address: run the embedding as a Ray Data job on this cluster ("auto", "host:port", "local").
    Returns:
        counts of what was added, updated, left unchanged and removed.
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
        fingerprint=model_fingerprint_of(model),
        dim=int(model.config.hidden_size),
        image_resize=_resolve_resize(image_resize, model),
        image_text=DEFAULT_IMAGE_TEXT,
    )
    region_list = load_regions(root, regions)  # a bad sidecar fails before the index is touched
    masks = {r.prompt["mask"] for r in region_list if "mask" in r.prompt}
    files = _scan(root, exclude=masks)
    store = IndexStore.open_for_writing(db_path, meta, rebuild=rebuild)
    plan = _plan(store, str(root), files, region_list)  # bounds are checked here, still before any write
    _apply_removals(store, str(root), plan)
    if plan.specs:
        chunks = _embed_chunks(model, plan.specs, batch_size, meta, ray_address, ray_options)
        _write(store, plan.rows, chunks, batch_size * CHUNK_BATCHES, show_progress_bar)
    plan.stats.embedded = len(plan.specs)
    logger.info("%s -> %s: %s", root, db_path, plan.stats.summary())
    return plan.stats


def search(model, db_path: str | Path, query: Any, *, top_k: int = 10, kind: Kind = "all") -> list[SearchHit]:
    """The `top_k` rows most similar to `query` (a text, or an encode() dict with image and prompt), best first.

    Raises:
        IndexMismatchError: `model` is not the model the index was built with.
    """
    store = IndexStore.open(db_path)
    fingerprint = model_fingerprint_of(model)
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


# --------------------------------------------------------------------------------------------- the sidecar
def load_regions(root: str | Path, regions: str | Path | None = None) -> list[_Region]:
    """Parse and check the sidecar (image bounds are checked later, against each image's size)."""
    root = Path(root).resolve()
    path = Path(regions) if regions is not None else root / REGIONS_FILE
    if not path.is_file():
        if regions is not None:
            raise DataError(f"regions file not found: {path}")
        return []
    out: dict[str, _Region] = {}
    ids: set[tuple[str, str]] = set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        region = _parse_region(line, root, f"{path}:{n}")
        if region.key in out:
            logger.warning("%s: same region as %s, ignored", region.where, out[region.key].where)
            continue
        if (region.image, region.region_id) in ids:
            raise DataError(f"{region.where}: region id {region.region_id!r} is used twice for {region.image}")
        ids.add((region.image, region.region_id))
        out[region.key] = region
    return list(out.values())


def _parse_region(line: str, root: Path, where: str) -> _Region:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REGION_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {list(REGION_KEYS)}")
    image = _relative(obj.get("image"), root, where, "image")
    prompt = {k: obj[k] for k in ("box", "points", "labels", "text") if obj.get(k) is not None}
    if obj.get("mask") is not None:
        prompt["mask"] = _relative(obj["mask"], root, where, "mask")
    if not any(k in prompt for k in ("box", "points", "mask")):
        raise DataError(f"{where}: a region needs a 'box', 'points' or 'mask'")
    try:
        parsed = parse_input(_spec(root, image, prompt)).prompt
    except (VirtueError, ValueError) as exc:
        raise DataError(f"{where}: {exc}") from None
    key = _region_key(root, image, prompt, obj.get("id"), obj.get("label"))
    region_id = str(obj["id"]) if obj.get("id") is not None else key[:12]
    label = None if obj.get("label") is None else str(obj["label"])
    return _Region(image, region_id, key, prompt, label, where, parsed)


def _relative(value: Any, root: Path, where: str, name: str) -> str:
    """A sidecar path as POSIX relative to root (relative to it, or absolute inside it); refuses paths leaving it.

    Normalised without following links, so a linked file under the root keeps the path the scan sees.
    """
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{name}' must be a path relative to {root}, got {value!r}")
    path = Path(os.path.normpath(root / value))
    if not path.is_relative_to(root):
        raise DataError(f"{where}: '{name}' {value!r} lies outside {root}")
    if not path.is_file():
        raise DataError(f"{where}: '{name}' file not found: {path}")
    return path.relative_to(root).as_posix()


def _region_key(root: Path, image: str, prompt: dict, region_id: Any, label: Any) -> str:
    """Changes when anything that defines the row changes, including the mask file's bytes."""
    h = hashlib.sha256(json.dumps([image, prompt, region_id, label], sort_keys=True).encode())
    if "mask" in prompt:
        h.update(_sha256(root / prompt["mask"]).encode())
    return h.hexdigest()


def _spec(root: Path, image: str, prompt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The encode() input for an image row (no prompt) or a region row, with absolute paths."""
    spec: dict[str, Any] = {"image": str(root / image)}
    for name, value in (prompt or {}).items():
        spec[name] = str(root / value) if name == "mask" else value
    return spec


# --------------------------------------------------------------------------------------------- planning
def _scan(root: Path, exclude: set[str]) -> dict[str, _File]:
    """Image files under root by relative path; hidden files and folders, and mask files, are left out."""
    found: dict[str, _File] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES or rel in exclude or not path.is_file():
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stat = path.stat()
        found[rel] = _File(rel, path, stat.st_size, stat.st_mtime_ns)
    return found


def _existing(state: pa.Table) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """(image rows by path, region keys by image path) of what is stored under one root."""
    images: dict[str, dict] = {}
    regions: dict[str, set[str]] = {}
    for row in state.to_pylist():
        if row["kind"] == "image":
            images[row["path"]] = row
        else:
            regions.setdefault(row["path"], set()).add(row["region_key"])
    return images, regions


def _plan(store: IndexStore, root: str, files: dict[str, _File], regions: Sequence[_Region]) -> _Plan:
    stored_images, stored_regions = _existing(store.state(root))
    by_image: dict[str, list[_Region]] = {}
    for region in regions:
        if region.image not in files:
            raise DataError(f"{region.where}: image {region.image!r} is not an indexable image under {root}")
        by_image.setdefault(region.image, []).append(region)
    plan = _Plan()
    for rel, file in files.items():
        _plan_file(plan, root, file, stored_images.get(rel), stored_regions.get(rel, set()), by_image.get(rel, []))
    for rel in sorted((stored_images.keys() | stored_regions.keys()) - files.keys()):
        plan.delete_images.append(rel)
        plan.stats.removed += int(rel in stored_images)
        plan.stats.regions_removed += len(stored_regions.get(rel, ()))
    return plan


def _plan_file(plan: _Plan, root: str, file: _File, old: dict | None, old_keys: set[str], regions: list[_Region]):
    """Decide one image: unchanged (maybe re-stamped; new regions only), new or changed (all rows), unreadable."""
    if old is not None and (old["size"], old["mtime_ns"]) == (file.size, file.mtime_ns):
        _plan_unchanged(plan, root, old, old_keys, regions)
        return
    sha = _sha256(file.path)  # only hashed when size or mtime moved
    if old is not None and old["sha256"] == sha:
        plan.touched.append(file)  # same bytes, new mtime: re-stamp so the next run skips hashing
        _plan_unchanged(plan, root, {**old, "size": file.size, "mtime_ns": file.mtime_ns}, old_keys, regions)
        return
    if old is not None or old_keys:
        plan.delete_images.append(file.rel)  # the stored rows describe bytes that are gone
    info = _image_info(file, sha)
    if info is None:
        plan.stats.skipped += 1
        plan.stats.regions_removed += len(old_keys)
        return
    _plan_changed(plan, root, info, old is not None, old_keys, regions)


def _plan_unchanged(plan: _Plan, root: str, info: dict, old_keys: set[str], regions: list[_Region]) -> None:
    stats = plan.stats
    stats.unchanged += 1
    wanted = {r.key: r for r in regions}
    stale = sorted(old_keys - wanted.keys())
    plan.delete_regions += stale
    stats.regions_removed += len(stale)
    stats.regions_unchanged += len(old_keys & wanted.keys())
    for key, region in wanted.items():
        if key not in old_keys:
            _check_bounds(region, info)
            _add_row(plan, Path(root), info, region)
            stats.regions_added += 1


def _plan_changed(plan: _Plan, root: str, info: dict, existed: bool, old_keys: set[str], regions: list[_Region]):
    stats = plan.stats
    stats.updated += int(existed)
    stats.added += int(not existed)
    _add_row(plan, Path(root), info, None)
    stats.regions_removed += len(old_keys - {r.key for r in regions})
    for region in regions:
        _check_bounds(region, info)
        _add_row(plan, Path(root), info, region)
        stats.regions_updated += int(region.key in old_keys)
        stats.regions_added += int(region.key not in old_keys)


def _image_info(file: _File, sha: str) -> dict[str, Any] | None:
    try:
        with Image.open(file.path) as img:  # reads the header only
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        logger.warning("%s: not readable as an image, skipped (%s)", file.path, exc)
        return None
    return {"path": file.rel, "size": file.size, "mtime_ns": file.mtime_ns, "sha256": sha,
            "width": width, "height": height}


def _check_bounds(region: _Region, info: dict[str, Any]) -> None:
    if region.parsed is None:
        return
    try:
        region.parsed.validate((info["width"], info["height"]))
    except VirtueError as exc:
        raise DataError(f"{region.where}: {exc}") from None


def _add_row(plan: _Plan, root: Path, info: dict[str, Any], region: _Region | None) -> None:
    row = {
        "kind": "image" if region is None else "region",
        "root": str(root),
        "path": info["path"],
        "region_id": None if region is None else region.region_id,
        "region_key": None if region is None else region.key,
        "prompt": None if region is None else json.dumps(region.prompt, sort_keys=True),
        "label": None if region is None else region.label,
        **{k: info[k] for k in ("width", "height", "size", "mtime_ns", "sha256")},
    }
    plan.rows.append(row)
    plan.specs.append(_spec(root, info["path"], None if region is None else region.prompt))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- writing
def _apply_removals(store: IndexStore, root: str, plan: _Plan) -> None:
    store.delete_images(root, plan.delete_images)
    store.delete_regions(root, plan.delete_regions)
    for file in plan.touched:
        store.touch(root, file.rel, file.size, file.mtime_ns)


def _embed_chunks(
    model, specs: list[dict], batch_size: int, meta: IndexMeta, ray_address: str | None, ray_options: RayOptions | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, vectors) chunks, in process or on Ray; the Ray path may return chunks out of order."""
    if ray_address is not None:
        from virtue.search.ray_job import embed_with_ray

        return embed_with_ray(model, specs, address=ray_address, options=ray_options or RayOptions(),
                              batch_size=batch_size, fingerprint=meta.fingerprint, image_resize=meta.image_resize)
    return _embed_local(model, specs, batch_size, meta.image_resize)


def _embed_local(model, specs: list[dict], batch_size: int, image_resize) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    step = batch_size * CHUNK_BATCHES
    for start in range(0, len(specs), step):
        part = specs[start : start + step]
        vectors = model.encode(part, batch_size=batch_size, image_resize=image_resize, show_progress_bar=False)
        yield np.arange(start, start + len(part)), np.asarray(vectors, np.float32)


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
