"""Behaviour of `VirtueModel.encode`: batch invariance, prompt sensitivity, per-image feature reuse, and
the errors promised for bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from virtue import ImageError, InputError, PromptError
from virtue.errors import VirtueError

TEXTS = ["A cat", "a horse below a potted plant on a sports field", "cat", "一只猫正看着镜头。"]
QUERY = "Find the caption that best describes the segmented object."


def random_inputs(images: list[Path], rng: random.Random, n: int) -> list:  # noqa: F821
    """A random mix of every input kind and prompt type."""
    out = []
    for _ in range(n):
        kind = rng.choice(["text", "image", "image_text", "box", "points", "mask", "box_points"])
        if kind == "text":
            out.append(rng.choice(TEXTS))
            continue
        path = rng.choice(images)
        w, h = Image.open(path).size
        item = {"image": path}
        if kind != "image":
            item["text"] = QUERY
        if kind in ("box", "box_points"):
            x1, y1 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            item["box"] = [x1, y1, rng.uniform(x1 + 2, w), rng.uniform(y1 + 2, h)]
        if kind in ("points", "box_points"):
            item["points"] = [[rng.uniform(0, w), rng.uniform(0, h)] for _ in range(rng.randint(1, 3))]
            item["labels"] = [rng.choice([0, 1]) for _ in item["points"]]
        if kind == "mask":
            mask = np.zeros((h, w), bool)
            mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
            item["mask"] = mask
        out.append(item)
    return out


def test_batch_invariance_random_mixes(_official_model, fixture_images):
    images = [fixture_images[n] for n in ("rocket.png", "astronaut.png", "coffee.png", "chelsea_tiny.png")]
    rng = random.Random(0)
    inputs = random_inputs(images, rng, 14)
    together = _official_model.encode(inputs, batch_size=5)
    alone = np.stack([_official_model.encode(x) for x in inputs])
    assert together.shape == (14, _official_model.config.hidden_size)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    shuffled = list(range(len(inputs)))
    rng.shuffle(shuffled)
    again = _official_model.encode([inputs[i] for i in shuffled], batch_size=3)
    np.testing.assert_allclose(again, together[shuffled], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_prompts_change_the_embedding(_official_model, fixture_images):
    path = fixture_images["astronaut.png"]
    w, h = Image.open(path).size
    mask = np.zeros((h, w), bool)
    mask[20:120, 40:160] = True
    variants = {
        "grid": {"image": path, "text": QUERY},
        "box_a": {"image": path, "text": QUERY, "box": [66, 6, 128, 74]},
        "box_b": {"image": path, "text": QUERY, "box": [10, 100, 200, 220]},
        "point_a": {"image": path, "text": QUERY, "points": [[60, 60]]},
        "point_b": {"image": path, "text": QUERY, "points": [[180, 180]]},
        "negative": {"image": path, "text": QUERY, "points": [[60, 60]], "labels": [0]},
        "two_points": {"image": path, "text": QUERY, "points": [[60, 60], [180, 180]]},
        "mask": {"image": path, "text": QUERY, "mask": mask},
        "mask_shifted": {"image": path, "text": QUERY, "mask": np.roll(mask, 80, axis=1)},
    }
    emb = _official_model.encode(list(variants.values()))
    names = list(variants)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            diff = np.abs(emb[i] - emb[j]).max()
            assert diff > 1e-4, f"{names[i]} and {names[j]} give the same embedding"


def test_image_features_computed_once_per_image(_official_model, fixture_images, monkeypatch):
    model = _official_model
    calls = {"sam": 0, "vit": 0}
    encode_images, vision = model.sam.encode_images, model._vision_tower

    def count_sam(pixels):
        calls["sam"] += pixels.shape[0]
        return encode_images(pixels)

    def count_vit(prepared):
        calls["vit"] += len(prepared)
        return vision(prepared)

    monkeypatch.setattr(model.sam, "encode_images", count_sam)
    monkeypatch.setattr(model, "_vision_tower", count_vit)
    path_a, path_b = fixture_images["rocket.png"], fixture_images["coffee.png"]
    boxes = [[10 + i, 10, 100 + 5 * i, 120] for i in range(6)]
    inputs = [{"image": p, "text": QUERY, "box": b} for b in boxes for p in (path_a, path_b)]
    cached = model.encode(inputs, batch_size=4)
    assert calls == {"sam": 2, "vit": 2}
    calls.update(sam=0, vit=0)
    uncached = model.encode(inputs, batch_size=4, reuse_image_features=False)
    assert calls == {"sam": 12, "vit": 12}
    np.testing.assert_allclose(cached, uncached, atol=1e-5, rtol=0)


def test_same_picture_from_path_array_and_pil(_official_model, fixture_images):
    path = fixture_images["coffee.png"]
    img = Image.open(path)
    a = _official_model.encode([{"image": path, "text": QUERY}, {"image": img, "text": QUERY},
                                {"image": np.asarray(img), "text": QUERY}, {"image": str(path), "text": QUERY}])
    np.testing.assert_allclose(a, np.repeat(a[:1], 4, axis=0), atol=1e-6, rtol=0)


def test_text_without_placeholder_gets_one(_official_model, fixture_images):
    path = fixture_images["rocket.png"]
    a = _official_model.encode({"image": path, "text": "What is this?"})
    b = _official_model.encode({"image": path, "text": "<|image_pad|>\nWhat is this?"})
    c = _official_model.encode({"image": path, "text": "<|image_1|>\nWhat is this?"})
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


BAD_INPUTS = [
    ("missing_file", lambda d: {"image": d / "nope.png"}, ImageError, "file not found"),
    ("not_an_image", lambda d: {"image": d / "cases.json"}, ImageError, "cannot read"),
    ("empty_text", lambda d: "   ", InputError, "empty input"),
    ("empty_dict", lambda d: {}, InputError, "empty input"),
    ("prompt_without_image", lambda d: {"text": "x", "box": [1, 2, 3, 4]}, PromptError, "needs an image"),
    ("box_outside", lambda d: {"image": d / "images/rocket.png", "box": [10, 10, 300, 50]}, PromptError,
     "outside the 240x160 image"),
    ("box_zero_width", lambda d: {"image": d / "images/rocket.png", "box": [10, 10, 10, 40]}, PromptError,
     "zero or negative width"),
    ("box_zero_height", lambda d: {"image": d / "images/rocket.png", "box": [10, 40, 50, 40]}, PromptError,
     "zero or negative height"),
    ("box_wrong_length", lambda d: {"image": d / "images/rocket.png", "box": [1, 2, 3]}, PromptError,
     "expected [x1, y1, x2, y2]"),
    ("point_outside", lambda d: {"image": d / "images/rocket.png", "points": [[-5, 10]]}, PromptError,
     "outside the 240x160 image"),
    ("bad_label", lambda d: {"image": d / "images/rocket.png", "points": [[5, 10]], "labels": [2]}, PromptError,
     "labels must be 1"),
    ("mask_wrong_size", lambda d: {"image": d / "images/rocket.png", "mask": np.ones((10, 10), bool)},
     PromptError, "does not match the 240x160 image"),
    ("mask_not_binary", lambda d: {"image": d / "images/rocket.png", "mask": np.full((160, 240), 7)},
     PromptError, "binary"),
    ("mask_empty", lambda d: {"image": d / "images/rocket.png", "mask": np.zeros((160, 240), bool)},
     PromptError, "empty"),
    ("unknown_key", lambda d: {"image": d / "images/rocket.png", "bx": [1, 2, 3, 4]}, InputError, "unknown key"),
    ("placeholder_without_image", lambda d: "<|image_pad|> hello", InputError, "no image was given"),
    ("two_placeholders", lambda d: {"image": d / "images/rocket.png", "text": "<|image_pad|><|image_pad|>"},
     InputError, "2 image placeholders"),
    ("wrong_type", lambda d: 42, InputError, "expected a string"),
    ("bad_array", lambda d: {"image": np.zeros((4, 4, 2), np.uint8)}, ImageError, "H x W x 3/4"),
]


@pytest.mark.parametrize("name,make,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_named_error(_official_model, fixture_dir, name, make, error, message):
    good = "A cat"
    with pytest.raises(error) as info:
        _official_model.encode([good, make(fixture_dir)])
    assert message in str(info.value)
    assert "input 1" in str(info.value), "the error must name which input is wrong"


def test_empty_list_and_bad_batch_size(_official_model):
    with pytest.raises(InputError, match="empty list"):
        _official_model.encode([])
    with pytest.raises(InputError, match="batch_size"):
        _official_model.encode(["a"], batch_size=0)
    assert issubclass(InputError, VirtueError) and issubclass(InputError, ValueError)
