"""Preprocessing checked against independent computations: transformers' own Qwen2-VL image processor,
SAM's grid definition, and the spec's un-patchify recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from virtue import CompatConfig, ImageError
from virtue.config import ImageProcessingConfig
from virtue.processing.qwen import qwen_image, smart_resize
from virtue.processing.sam import grid_points, sam_prompt
from virtue.prompts import Box, Mask, Points, VisualPrompt

CFG = ImageProcessingConfig()


@pytest.mark.parametrize("seed", range(5))
def test_smart_resize_matches_transformers(seed):
    rng = np.random.default_rng(seed)
    for h, w in rng.integers(28, 4000, size=(40, 2)):
        ours = smart_resize(int(h), int(w), CFG)
        theirs = hf_smart_resize(int(h), int(w), 28, CFG.min_pixels, CFG.max_pixels)
        assert ours == theirs


def test_extreme_aspect_ratio_is_an_image_error():
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(30, 7000, CFG)


def test_patches_match_transformers_processor(fixture_images):
    img = Image.open(fixture_images["coffee.png"]).convert("RGB")
    ours = qwen_image(img, CFG)
    ref = Qwen2VLImageProcessorPil(min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)(img, return_tensors="pt")
    assert list(ref["image_grid_thw"][0]) == list(ours.grid_thw)
    assert (ours.pixel_values - ref["pixel_values"]).abs().max() < 1e-6


def test_unpatchify_recovers_the_normalized_image(fixture_images):
    img = Image.open(fixture_images["rocket.png"]).convert("RGB")
    q = qwen_image(img, CFG)
    gt, gh, gw = q.grid_thw
    x = q.pixel_values.reshape(gt, gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(2 * gt, 3, gh * 14, gw * 14)
    assert torch.equal(x[0], q.normalized)


def test_grid_is_one_prompt_of_k_squared_points():
    pts = grid_points(3, 1024)
    side = [1024 / 6, 512, 1024 * 5 / 6]
    np.testing.assert_allclose(pts[:3, 0], side)  # x varies fastest
    np.testing.assert_allclose(pts[::3, 1], side)
    prompt = sam_prompt(None, (100, 50), sam_size=1024, mask_size=256, points_per_side=3, compat=CompatConfig())
    assert prompt.coords.shape == (9, 2) and prompt.labels.tolist() == [1] * 9


def test_box_frame_follows_the_compat_flag():
    box = VisualPrompt(box=Box(10, 20, 110, 70))
    kwargs = dict(sam_size=1024, mask_size=256, points_per_side=3)
    raw = sam_prompt(box, (200, 100), compat=CompatConfig.official(), **kwargs)
    scaled = sam_prompt(box, (200, 100), compat=CompatConfig.clean(), **kwargs)
    assert raw.coords.tolist() == [[10, 20], [110, 70]] and raw.labels.tolist() == [2, 3]
    np.testing.assert_allclose(scaled.coords, [[51.2, 204.8], [563.2, 716.8]], rtol=1e-6)


def test_points_are_always_scaled_and_box_comes_first():
    prompt = VisualPrompt(points=Points([[50, 25]], [0]), box=Box(0, 0, 100, 50))
    p = sam_prompt(prompt, (100, 50), sam_size=1024, mask_size=256, points_per_side=3, compat=CompatConfig.official())
    assert p.labels.tolist() == [2, 3, 0]
    assert p.coords[2].tolist() == [512, 512]


def test_mask_only_prompt_is_a_dense_prompt_with_a_padding_point():
    mask = np.zeros((50, 100), bool)
    mask[:, :50] = True
    p = sam_prompt(VisualPrompt(mask=Mask(mask)), (100, 50), sam_size=1024, mask_size=256, points_per_side=3,
                   compat=CompatConfig())
    assert p.labels.tolist() == [-1] and p.mask.shape == (1, 256, 256)
    assert p.mask[0, :, :120].min() == 1 and p.mask[0, :, 136:].max() == 0
