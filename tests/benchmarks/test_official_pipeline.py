"""The official-like baseline of the speed benchmarks computes what `encode` computes (so the speed ratio against it
compares work, not results), and does the work the official pipeline does: the image towers once per row."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from virtue import scar_query_text

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from official_pipeline import encode_like_official  # noqa: E402


@pytest.fixture
def queries(fixture_images) -> list[dict]:
    rows = []
    for name in ("rocket.png", "astronaut.png"):
        path = fixture_images[name]
        w, h = Image.open(path).size
        for j in range(2):  # two prompts per photo: the official pipeline runs the towers for each
            box = [2 + 5 * j, 3, w // 2 + j, h // 2]
            rows.append({"image": path, "text": scar_query_text(box), "box": box})
    return rows


def test_official_like_vectors_equal_encode(_official_model, queries):
    model = _official_model
    got = encode_like_official(model, queries, batch_size=3)
    np.testing.assert_allclose(got, model.encode(queries, image_resize=(1344, 1344)), atol=1e-5)
    texts = ["a rocket on a launch pad", "an astronaut", "two words here"]
    np.testing.assert_allclose(encode_like_official(model, texts), model.encode(texts), atol=1e-5)


def test_official_like_runs_the_towers_for_every_row(_official_model, queries):
    calls = {"vit": 0, "sam": 0}
    model = _official_model
    hooks = [model.qwen.visual.register_forward_hook(lambda *a: calls.__setitem__("vit", calls["vit"] + 1)),
             model.sam.model.vision_encoder.register_forward_hook(
                 lambda m, i, o: calls.__setitem__("sam", calls["sam"] + i[0].shape[0]))]
    try:
        encode_like_official(model, queries, batch_size=16)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vit": 1, "sam": len(queries)}  # one batch; SAM2 saw every row's image, duplicates included


def test_official_like_refuses_mixed_batches(_official_model, queries):
    with pytest.raises(ValueError, match="cannot mix text and image rows"):
        encode_like_official(_official_model, [queries[0], "a caption"])
