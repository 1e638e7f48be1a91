"""Region search: index a folder of images (and regions of them) into LanceDB, query it by text or region.

    from virtue.search import index_directory, search
    stats = index_directory(model, "photos/", "photos.lancedb")           # incremental; regions.jsonl too
    hits = search(model, "photos.lancedb", {"image": "q.jpg", "box": [10, 20, 200, 240]}, top_k=5)

LanceDB (`pip install lancedb`) and Ray (`pip install "ray[data]"`, for `ray_address=`) are imported only
when used.
"""

from virtue.hashing import model_fingerprint as model_fingerprint_of  # the name this package exported first
from virtue.search.index import SearchHit, index_directory, open_index, search, search_vector
from virtue.search.planning import IndexStats
from virtue.search.ray_options import RayOptions
from virtue.search.sidecar import load_regions
from virtue.search.store import IndexMeta, IndexMismatchError, IndexNotFoundError, IndexStore, MissingDependencyError

__all__ = [
    "IndexMeta",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexStats",
    "IndexStore",
    "MissingDependencyError",
    "RayOptions",
    "SearchHit",
    "index_directory",
    "load_regions",
    "model_fingerprint_of",
    "open_index",
    "search",
    "search_vector",
]
