"""Helpers for the search tests: list the photos, count embedded rows, read an index back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def image_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


class EncodeCounter:
    """Wraps `model.encode` to count the rows it is asked to embed (the model still does the work)."""

    def __init__(self, model):
        self.rows = 0
        self._encode = model.encode
        model.encode = self

    def __call__(self, inputs, **kwargs):
        self.rows += len(inputs) if isinstance(inputs, list) else 1
        return self._encode(inputs, **kwargs)


def stored(db: Path, where: str | None = None) -> tuple[list[dict], np.ndarray]:
    """Rows (without the vector) and the [N, D] vectors of the index."""
    from virtue.search import open_index

    table = open_index(db).to_arrow(where=where)
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)
    return table.drop_columns(["vector"]).to_pylist(), vectors


def write_regions(photos, lines) -> None:
    (photos / "regions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def region_lines(photos) -> list[dict]:
    first, second = image_paths(photos)[0], image_paths(photos)[5]
    w, h = image_size(photos / first)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    (photos / "masks").mkdir()
    Image.fromarray(mask).save(photos / "masks" / "first.png")  # a PNG under the root: not an image row
    return [
        {"image": first, "box": [10, 20, w // 2, h // 2], "id": "box1", "label": "thing", "text": "Find the object."},
        {"image": second, "points": [[30, 40], [5, 5]], "labels": [1, 0]},
        {"image": first, "mask": "masks/first.png", "label": "masked"},
    ]
