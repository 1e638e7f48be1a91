"""The regions sidecar of an indexed folder: one JSON object per line, one region row each.

    {"image": "rel/photo.jpg", "box": [x1, y1, x2, y2], "id": "dog", "label": "dog", "text": "instruction"}
    {"image": "rel/photo.jpg", "points": [[x, y], ...], "labels": [1, 0]}
    {"image": "rel/photo.jpg", "mask": "rel/photo-mask.png"}

A region is keyed by its line's content (and the mask's bytes), so an edited line is re-embedded and a removed
line is deleted. Every line is checked here, before the index is touched; bounds against the image's size
are checked when the image is planned (`virtue.search.planning`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtue.errors import DataError, VirtueError
from virtue.hashing import file_sha256
from virtue.inputs import parse_input
from virtue.prompts import VisualPrompt

__all__ = ["REGIONS_FILE", "REGION_KEYS", "Region", "load_regions", "row_spec"]

logger = logging.getLogger(__name__)

REGIONS_FILE = "regions.jsonl"
REGION_KEYS = ("image", "box", "points", "labels", "mask", "id", "text", "label")


@dataclass(frozen=True)
class Region:
    """One sidecar line, checked."""

    image: str  # path relative to the root
    region_id: str
    key: str
    prompt: dict[str, Any]  # JSON-able: box / points + labels / mask (relative path) / text
    label: str | None
    where: str  # file:line, for messages
    parsed: VisualPrompt | None = field(compare=False, default=None)


def load_regions(root: str | Path, regions: str | Path | None = None) -> list[Region]:
    """Parse and check the sidecar (default `<root>/regions.jsonl`, none if absent); image bounds are checked
    later, against each image's size."""
    root = Path(root).resolve()
    path = Path(regions) if regions is not None else root / REGIONS_FILE
    if not path.is_file():
        if regions is not None:
            raise DataError(f"regions file not found: {path}")
        return []
    out: dict[str, Region] = {}
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


def _parse_region(line: str, root: Path, where: str) -> Region:
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
        parsed = parse_input(row_spec(root, image, prompt)).prompt
    except (VirtueError, ValueError) as exc:
        raise DataError(f"{where}: {exc}") from None
    key = _region_key(root, image, prompt, obj.get("id"), obj.get("label"))
    region_id = str(obj["id"]) if obj.get("id") is not None else key[:12]
    label = None if obj.get("label") is None else str(obj["label"])
    return Region(image, region_id, key, prompt, label, where, parsed)


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
        h.update(file_sha256(root / prompt["mask"]).encode())
    return h.hexdigest()


def row_spec(root: Path, image: str, prompt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The encode() input for an image row (no prompt) or a region row, with absolute paths."""
    spec: dict[str, Any] = {"image": str(root / image)}
    for name, value in (prompt or {}).items():
        spec[name] = str(root / value) if name == "mask" else value
    return spec
