"""The demo's gallery: every image of a folder embedded once and kept in a `virtue.search` index in the demo's
cache (one per gallery folder and model fingerprint), refreshed incrementally on each start.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from virtue.errors import InputError
from virtue.hashing import model_fingerprint
from virtue.images import IMAGE_SUFFIXES
from virtue.model.embedder import VirtueModel
from virtue.search.index import index_directory, open_index
from virtue.search.planning import IndexStats
from virtue.search.store import IndexMismatchError

__all__ = ["GalleryIndex", "build_gallery_index", "default_cache_dir", "fingerprint_of"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "virtue" / "demo"


def fingerprint_of(model: VirtueModel) -> str:
    """The model fingerprint (config + every weight), so a changed model never hits the cache."""
    return model_fingerprint(model)


@dataclass
class GalleryIndex:
    """Gallery images and their embeddings, row i for paths[i]."""

    root: Path
    paths: list[Path]
    embeddings: np.ndarray  # float32 [N, D], L2-normalised
    cache_dir: Path  # the search index (LanceDB) the embeddings are kept in
    reused: int = 0  # rows served from the cache
    embedded: int = 0  # rows computed by this build
    skipped: list[str] = field(default_factory=list)  # unreadable files, with the reason

    def top_k(self, query: np.ndarray, k: int) -> list[tuple[Path, float]]:
        scores = self.embeddings @ np.asarray(query, np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.paths[i], float(scores[i])) for i in order]


def _cache_folder(cache_dir: Path, root: Path, fingerprint: str) -> Path:
    # One index per (gallery, model): several galleries or models do not evict each other.
    where = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return cache_dir / f"gallery-{where}-{fingerprint[:12]}.lancedb"


def build_gallery_index(
    model: VirtueModel,
    gallery_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    fingerprint: str | None = None,
) -> GalleryIndex:
    """Embed every image under `gallery_dir`, reusing the on-disk cache for files that did not change.

    The cache is a `virtue.search` index of the folder (image rows only, no pre-resize), one per gallery
    folder and model fingerprint, refreshed incrementally by `index_directory`: a file whose size and mtime
    are unchanged, or whose bytes an indexed image has (a touched, renamed or copied file), is not embedded
    again; files removed from the folder leave it; unreadable files are reported in `skipped`.

    Args:
        cache_dir: where the cache lives (default `$XDG_CACHE_HOME/virtue/demo`).
        fingerprint: `fingerprint_of(model)`, if already computed (it hashes every weight).
    Raises:
        InputError: the folder does not exist or holds no readable image.
    """
    root = Path(gallery_dir).resolve()
    if not root.is_dir():
        raise InputError(f"gallery: not a directory: {root}")
    fingerprint = fingerprint or fingerprint_of(model)
    folder = _cache_folder(Path(cache_dir) if cache_dir is not None else default_cache_dir(), root, fingerprint)

    def index(rebuild: bool) -> IndexStats:
        return index_directory(model, root, folder, regions=False, batch_size=batch_size, rebuild=rebuild,
                               image_resize="native", show_progress_bar=show_progress, fingerprint=fingerprint)

    try:
        stats = index(rebuild=False)
    except IndexMismatchError as exc:  # written by another version's settings: a cache, so start it over
        logger.warning("gallery cache %s is stale (%s); rebuilding it", folder, exc)
        stats = index(rebuild=True)
    seen = stats.added + stats.updated + stats.unchanged + stats.skipped
    if not seen:
        raise InputError(f"gallery: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    table = open_index(folder).to_arrow(["path", "vector"], where="kind = 'image'")
    if table.num_rows == 0:
        raise InputError(f"gallery: none of the {seen} images in {root} could be read")
    rel = table.column("path").to_pylist()
    order = sorted(range(len(rel)), key=lambda i: PurePosixPath(rel[i]).parts)  # the folder's order, as scanned
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)[order]
    reused = stats.unchanged + stats.reused
    logger.info("gallery: %d images, %d from the cache, %d embedded", len(rel), reused, stats.embedded)
    return GalleryIndex(root, [root / rel[i] for i in order], vectors, folder, reused, stats.embedded,
                        list(stats.skipped_files))
