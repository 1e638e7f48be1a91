"""A small photo folder: real COCO JPEGs from mini-SCaR, copied so tests may edit and delete them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MINI_SCAR = Path(__file__).resolve().parents[2].parent / "shared/data/mini-scar"  # as in tests/conftest.py


@pytest.fixture
def photos(tmp_path) -> Path:
    """6 images: 4 at the top, 2 in a subfolder (recursion), copied so tests may edit and delete them."""
    source = sorted((MINI_SCAR / "images").glob("*.jpg"))[:6]
    assert len(source) == 6, f"mini-SCaR images not found under {MINI_SCAR}"
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for n, src in enumerate(source):
        shutil.copyfile(src, root / ("sub" if n >= 4 else ".") / src.name)
    return root
