"""What one `index_directory` call must do: the folder's images compared with the rows stored for it.

An image whose (size, mtime) is unchanged is skipped without reading it; one whose bytes hash the same is only
re-stamped; a new or changed one gets all its rows (image and regions) embedded, except that an image row whose
bytes some stored image row has (a renamed or copied photo) takes that row's vector: same bytes, same model and
settings (one table), same vector. The rows of a deleted image are removed. Nothing is written here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from virtue.errors import DataError, VirtueError
from virtue.hashing import file_sha256
from virtue.images import IMAGE_SUFFIXES
from virtue.search.sidecar import Region, row_spec
from virtue.search.store import IndexStore

__all__ = ["ImageFile", "IndexStats", "Plan", "plan_index", "reuse_stored_vectors", "scan_images"]

logger = logging.getLogger(__name__)


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
    reused: int = 0  # of the added and updated images, those given the stored vector of an image with equal bytes
    skipped_files: list[str] = field(default_factory=list)  # "path: why" for each skipped file

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "skipped_files"}

    def summary(self) -> str:
        return (
            f"images: {self.added} added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.removed} removed, {self.skipped} skipped; regions: {self.regions_added} added, "
            f"{self.regions_updated} updated, {self.regions_unchanged} unchanged, {self.regions_removed} removed; "
            f"{self.embedded} vectors embedded, {self.reused} reused from images with the same bytes"
        )


@dataclass(frozen=True)
class ImageFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class Plan:
    """The writes of one call, and its counts; `rows[i]` is embedded from `specs[i]`."""

    stats: IndexStats = field(default_factory=IndexStats)
    delete_images: list[str] = field(default_factory=list)
    delete_regions: list[str] = field(default_factory=list)
    touched: list[ImageFile] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # table rows to embed, without the vector
    specs: list[dict[str, Any]] = field(default_factory=list)  # the matching encode() inputs
    counted: list[str] = field(default_factory=list)  # the `IndexStats` counter each row is counted in
    reused_rows: list[dict[str, Any]] = field(default_factory=list)  # rows whose vector is known already
    reused_vectors: list[np.ndarray] = field(default_factory=list)

    def drop_failed(self, failed: Mapping[int, str]) -> None:
        """Count the rows that could not be embedded (`failed`: row index -> why), which were not written: an
        image row's file is skipped, like one whose header cannot be read."""
        stats = self.stats
        for i in sorted(failed):
            row, counter = self.rows[i], self.counted[i]
            setattr(stats, counter, getattr(stats, counter) - 1)
            if counter == "regions_updated":
                stats.regions_removed += 1  # its stored row went with the image's old rows
            if row["kind"] == "image":
                stats.skipped += 1
                stats.skipped_files.append(f"{Path(row['root']) / row['path']}: {failed[i]}")


def scan_images(root: Path, exclude: set[str]) -> dict[str, ImageFile]:
    """Image files under root by relative path; hidden files and folders, and mask files, are left out."""
    found: dict[str, ImageFile] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES or rel in exclude or not path.is_file():
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stat = path.stat()
        found[rel] = ImageFile(rel, path, stat.st_size, stat.st_mtime_ns)
    return found


def plan_index(store: IndexStore, root: str, files: dict[str, ImageFile], regions: Sequence[Region]) -> Plan:
    """Compare the scanned files and sidecar regions with the rows stored under `root`; DataError for a region
    outside its image (before anything is written)."""
    stored_images, stored_regions = _existing(store.state(root))
    by_image: dict[str, list[Region]] = {}
    for region in regions:
        if region.image not in files:
            raise DataError(f"{region.where}: image {region.image!r} is not an indexable image under {root}")
        by_image.setdefault(region.image, []).append(region)
    plan = Plan()
    for rel, file in files.items():
        _plan_file(plan, root, file, stored_images.get(rel), stored_regions.get(rel, set()), by_image.get(rel, []))
    for rel in sorted((stored_images.keys() | stored_regions.keys()) - files.keys()):
        plan.delete_images.append(rel)
        plan.stats.removed += int(rel in stored_images)
        plan.stats.regions_removed += len(stored_regions.get(rel, ()))
    return plan


def reuse_stored_vectors(store: IndexStore, plan: Plan) -> None:
    """Move the image rows to embed whose bytes a stored image row has (a renamed or copied file) to the rows
    written with that row's vector. Before the removals: a renamed file's old row is among them."""
    wanted = {row["sha256"] for row in plan.rows if row["kind"] == "image"}
    found = store.image_vectors(wanted) if wanted else {}
    if not found:
        return
    keep: list[int] = []
    for i, row in enumerate(plan.rows):
        if row["kind"] == "image" and row["sha256"] in found:
            plan.reused_rows.append(row)
            plan.reused_vectors.append(found[row["sha256"]])
        else:
            keep.append(i)
    plan.rows, plan.specs, plan.counted = ([part[i] for i in keep] for part in (plan.rows, plan.specs, plan.counted))
    plan.stats.reused += len(plan.reused_rows)


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


def _plan_file(plan: Plan, root: str, file: ImageFile, old: dict | None, old_keys: set[str], regions: list[Region]):
    """Decide one image: unchanged (maybe re-stamped; new regions only), new or changed (all rows), unreadable."""
    if old is not None and (old["size"], old["mtime_ns"]) == (file.size, file.mtime_ns):
        _plan_unchanged(plan, root, old, old_keys, regions)
        return
    sha = file_sha256(file.path)  # only hashed when size or mtime moved
    if old is not None and old["sha256"] == sha:
        plan.touched.append(file)  # same bytes, new mtime: re-stamp so the next run skips hashing
        _plan_unchanged(plan, root, {**old, "size": file.size, "mtime_ns": file.mtime_ns}, old_keys, regions)
        return
    if old is not None or old_keys:
        plan.delete_images.append(file.rel)  # the stored rows describe bytes that are gone
    info, why = _image_info(file, sha)
    if info is None:
        plan.stats.skipped += 1
        plan.stats.skipped_files.append(f"{file.path}: {why}")
        plan.stats.regions_removed += len(old_keys)
        return
    _plan_changed(plan, root, info, old is not None, old_keys, regions)


def _plan_unchanged(plan: Plan, root: str, info: dict, old_keys: set[str], regions: list[Region]) -> None:
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
            _add_row(plan, Path(root), info, region, "regions_added")
            stats.regions_added += 1


def _plan_changed(plan: Plan, root: str, info: dict, existed: bool, old_keys: set[str], regions: list[Region]):
    stats = plan.stats
    stats.updated += int(existed)
    stats.added += int(not existed)
    _add_row(plan, Path(root), info, None, "updated" if existed else "added")
    stats.regions_removed += len(old_keys - {r.key for r in regions})
    for region in regions:
        _check_bounds(region, info)
        _add_row(plan, Path(root), info, region, "regions_updated" if region.key in old_keys else "regions_added")
        stats.regions_updated += int(region.key in old_keys)
        stats.regions_added += int(region.key not in old_keys)


def _image_info(file: ImageFile, sha: str) -> tuple[dict[str, Any] | None, str]:
    """(the columns of its rows, "") or (None, why it is skipped)."""
    try:
        with Image.open(file.path) as img:  # reads the header only
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        logger.warning("%s: not readable as an image, skipped (%s)", file.path, exc)
        return None, f"not readable as an image ({exc})"
    info = {"path": file.rel, "size": file.size, "mtime_ns": file.mtime_ns, "sha256": sha,
            "width": width, "height": height}
    return info, ""


def _check_bounds(region: Region, info: dict[str, Any]) -> None:
    if region.parsed is None:
        return
    try:
        region.parsed.validate((info["width"], info["height"]))
    except VirtueError as exc:
        raise DataError(f"{region.where}: {exc}") from None


def _add_row(plan: Plan, root: Path, info: dict[str, Any], region: Region | None, counter: str) -> None:
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
    plan.specs.append(row_spec(root, info["path"], None if region is None else region.prompt))
    plan.counted.append(counter)
