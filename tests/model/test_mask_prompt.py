"""The mask-prompt path against transformers' own `Sam2Model` given the same mask input: the same dense prompt
embedding and the same output of the mask decoder's two-way transformer (the map the embedding uses), for
SAM2's two conventions: a binary mask (the default) and low-resolution logits (`MaskLogits`, the image
predictor's `mask_input`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import MINI_SCAR
from virtue.inputs import EmbedInput, parse_input
from virtue.prompts import Mask, MaskLogits, Points, VisualPrompt

PHOTO = MINI_SCAR / "images" / "000000000049.jpg"


def prompts(w: int, h: int, mask_size: int) -> dict[str, VisualPrompt]:
    binary = np.zeros((h, w), bool)
    binary[h // 4 : h // 2, w // 3 : 2 * w // 3] = True
    logits = np.random.default_rng(0).normal(0, 8, (mask_size, mask_size)).astype(np.float32)
    return {
        "binary": VisualPrompt(mask=Mask(binary)),
        "binary+point": VisualPrompt(points=Points([[w * 0.5, h * 0.3]]), mask=Mask(binary)),
        "logits": VisualPrompt(mask=MaskLogits(logits)),
    }


@pytest.mark.parametrize("name", ["binary", "binary+point", "logits"])
def test_mask_path_matches_sam2model(tiny_model, name):
    photo = Image.open(PHOTO)
    w, h = photo.size
    proc, sam = tiny_model.processor, tiny_model.sam
    prompt = prompts(w, h, sam.mask_input_size)[name]
    sp = proc.sam_prompt(EmbedInput(image=photo, prompt=prompt), (w, h), sam.mask_input_size)
    if name == "logits":  # the image predictor's convention: the logits reach the prompt encoder unchanged
        torch.testing.assert_close(sp.mask[0], torch.from_numpy(prompt.mask.array), rtol=0, atol=0)
    else:  # binary: 0/1 resized with antialias (SAM2Base._forward_sam_heads), values within [0, 1]
        assert sp.mask.min() >= 0 and sp.mask.max() <= 1 + 1e-6 and sp.mask.max() > 0.9
    pixels = proc.sam_input(proc.prepare_image(proc.load(EmbedInput(image=photo), "image", None)))[None]
    seen = {}
    hook = sam.model.mask_decoder.transformer.register_forward_hook(
        lambda module, args, kwargs, out: seen.update(keys=out[1]), with_kwargs=True)
    try:
        with torch.inference_mode():
            sparse_ref, dense_ref = sam.model.prompt_encoder(
                input_points=torch.cat([sp.coords, torch.zeros(1, 2)])[None, None],  # SAM's padding point
                input_labels=torch.cat([sp.labels, torch.tensor([-1])])[None, None],
                input_boxes=None, input_masks=sp.mask[None])
            sam.model(pixel_values=pixels, input_points=sp.coords[None, None], input_labels=sp.labels[None, None],
                      input_masks=sp.mask[None], multimask_output=False)
            image_embeds = sam.encode_images(pixels)
            dense_ours = sam.model.prompt_encoder.mask_embed(sp.mask[None].to(image_embeds.dtype))
            fused = sam.fuse(image_embeds, [sp])
    finally:
        hook.remove()
    torch.testing.assert_close(dense_ours, dense_ref, rtol=0, atol=0)  # the same dense prompt
    n, c, gh, gw = fused.shape
    reference_map = seen["keys"][:, 0].transpose(1, 2).reshape(n, c, gh, gw)
    torch.testing.assert_close(fused, reference_map, rtol=1e-5, atol=1e-5)  # the same decoder output


def test_logits_and_binary_are_different_prompts(tiny_model):
    photo = Image.open(PHOTO)
    w, h = photo.size
    size = tiny_model.sam.mask_input_size
    both = prompts(w, h, size)
    a = tiny_model.encode({"image": PHOTO, "mask": both["binary"].mask.array})
    b = tiny_model.encode(parse_input({"image": PHOTO, "mask_logits": both["logits"].mask.array}))
    assert np.abs(a - b).max() > 1e-4
