"""`predict_mask`: SAM2's mask for a prompt, decoded from exactly the inputs the embedding's SAM branch reads.

The tiny model's weights are random, so a mask's content means nothing; these tests check the plumbing:
the two-way transformer receives the same tokens and image embeddings as `SamBranch.fuse`, the decoder
matches transformers' own `Sam2Model.forward`, and the output has the image's frame.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import MINI_SCAR
from virtue import PromptError
from virtue.config import CompatConfig
from virtue.inputs import EmbedInput
from virtue.model.mask_preview import predict_mask, predict_mask_logits, sam_image_features
from virtue.prompts import Box, Mask, Points, VisualPrompt

PHOTO = MINI_SCAR / "images" / "000000000049.jpg"  # 381 x 500, portrait: catches swapped axes
OTHER = MINI_SCAR / "images" / "000000000064.jpg"


def _prompts(w: int, h: int) -> dict[str, VisualPrompt | None]:
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2, w // 3 : 2 * w // 3] = True
    return {
        "grid": None,
        "point": VisualPrompt(points=Points([[w * 0.3, h * 0.6]])),
        "points": VisualPrompt(points=Points([[w * 0.7, h * 0.2], [w * 0.1, h * 0.9]], [1, 0])),
        "box": VisualPrompt(box=Box(w * 0.1, h * 0.2, w * 0.6, h * 0.7)),
        "mask": VisualPrompt(mask=Mask(mask)),
        "box_points_mask": VisualPrompt(
            points=Points([[w * 0.5, h * 0.5]]), box=Box(2, 3, w - 5, h - 7), mask=Mask(mask)
        ),
    }


@pytest.fixture
def photo() -> Image.Image:
    return Image.open(PHOTO)


def test_mask_has_the_image_frame_and_is_deterministic(tiny_model, photo):
    w, h = photo.size
    for name, prompt in _prompts(w, h).items():
        mask = predict_mask(tiny_model, photo, prompt)
        assert mask.shape == (h, w), name
        assert mask.dtype == np.bool_, name
        np.testing.assert_array_equal(mask, predict_mask(tiny_model, PHOTO, prompt), err_msg=name)  # path == PIL


def test_different_prompts_give_different_masks(tiny_model, photo):
    w, h = photo.size
    logits = {name: predict_mask_logits(tiny_model, photo, p) for name, p in _prompts(w, h).items()}
    masks = {name: (v > 0).numpy() for name, v in logits.items()}
    names = list(logits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.equal(logits[a], logits[b]), (a, b)
    # Thresholded random-weight masks may coincide for some pairs, but not for all of them.
    assert len({m.tobytes() for m in masks.values()}) > 1


class _TransformerSpy:
    """Records the inputs and the image-side output of the mask decoder's two-way transformer."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.sam.model.mask_decoder.transformer.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls.append({
            "tokens": kwargs["point_embeddings"].detach().clone(),
            "image": kwargs["image_embeddings"].detach().clone(),
            "pos": kwargs["image_positional_embeddings"].detach().clone(),
            "keys": output[1].detach().clone(),
        })

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("compat", ["clean", "official"])
def test_decoder_sees_what_fuse_sees(tiny_model, tokenizer, photo, compat):
    """Same SAM pixels (compat frame), same prompt tensors + padding point, same sparse/dense embeddings."""
    model = tiny_model
    if compat == "official":  # SAM reads the Qwen-normalised pixels; boxes are read as raw SAM-frame pixels
        from virtue import VirtueModel
        from virtue.model.presets import tiny_config

        torch.manual_seed(0)
        model = VirtueModel(tiny_config(compat=CompatConfig.official()), tokenizer).eval()
    w, h = photo.size
    proc = model.processor
    loaded = proc.load(EmbedInput(image=photo), "image", None)
    pixels = proc.sam_input(proc.prepare_image(loaded))[None]
    with torch.inference_mode():
        image_embeds = model.sam.encode_images(pixels)
    feats = sam_image_features(model, photo)
    torch.testing.assert_close(feats.image_embeddings, image_embeds, rtol=0, atol=0)

    spy = _TransformerSpy(model)
    try:
        for name, prompt in _prompts(w, h).items():
            spy.calls.clear()
            sam_prompt = proc.sam_prompt(EmbedInput(image=photo, prompt=prompt), (w, h), model.sam.mask_input_size)
            with torch.inference_mode():
                fused = model.sam.fuse(image_embeds, [sam_prompt])
            predict_mask(model, photo, prompt, features=feats)
            assert len(spy.calls) == 2, name
            ref, ours = spy.calls
            for key in ("tokens", "image", "pos"):
                torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=f"{name}: {key}")
            # The transformer's image-side output is the map the embedding uses: identical here.
            n, c, gh, gw = fused.shape
            torch.testing.assert_close(ours["keys"][:, 0].transpose(1, 2).reshape(n, c, gh, gw), fused)
    finally:
        spy.close()


def _upsampled(logits: torch.Tensor, sam_size: int, hw: tuple[int, int]) -> torch.Tensor:
    x = F.interpolate(logits.float(), size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("name", ["point", "points", "mask"])
def test_matches_transformers_sam2_forward(tiny_model, photo, name):
    """Our decoder call equals Sam2Model.forward on the same pixels and prompt (single-mask output)."""
    w, h = photo.size
    prompt = _prompts(w, h)[name]
    proc = tiny_model.processor
    loaded = proc.load(EmbedInput(image=photo), "image", None)
    pixels = proc.sam_input(proc.prepare_image(loaded))[None]
    sp = proc.sam_prompt(EmbedInput(image=photo, prompt=prompt), (w, h), tiny_model.sam.mask_input_size)
    with torch.inference_mode():
        out = tiny_model.sam.model(
            pixel_values=pixels,
            input_points=sp.coords[None, None],
            input_labels=sp.labels[None, None],
            input_masks=None if sp.mask is None else sp.mask[None],
            multimask_output=False,
        )
    expected = _upsampled(out.pred_masks[:, 0], tiny_model.config.sam.image_size, (h, w))
    torch.testing.assert_close(predict_mask_logits(tiny_model, photo, prompt), expected, rtol=1e-5, atol=1e-5)


def test_multimask_picks_the_best_predicted_iou(tiny_model, photo):
    w, h = photo.size
    prompt = _prompts(w, h)["point"]
    mask = predict_mask(tiny_model, photo, prompt, multimask_output=True)
    assert mask.shape == (h, w) and mask.dtype == np.bool_
    proc = tiny_model.processor
    loaded = proc.load(EmbedInput(image=photo), "image", None)
    pixels = proc.sam_input(proc.prepare_image(loaded))[None]
    sp = proc.sam_prompt(EmbedInput(image=photo, prompt=prompt), (w, h), tiny_model.sam.mask_input_size)
    with torch.inference_mode():
        out = tiny_model.sam.model(pixel_values=pixels, input_points=sp.coords[None, None],
                                   input_labels=sp.labels[None, None], multimask_output=True)
    best = int(out.iou_scores[0, 0].argmax())
    expected = _upsampled(out.pred_masks[:, 0, best : best + 1], tiny_model.config.sam.image_size, (h, w)) > 0
    np.testing.assert_array_equal(mask, expected.numpy())


def test_one_image_at_a_time_and_feature_reuse(tiny_model, photo):
    """Batch-of-one consistency: cached features, interleaved images and repeated calls change nothing."""
    w, h = photo.size
    prompt = _prompts(w, h)["points"]
    alone = predict_mask_logits(tiny_model, photo, prompt)
    other = Image.open(OTHER)
    predict_mask(tiny_model, other, VisualPrompt(points=Points([[10, 10]])))
    feats = sam_image_features(tiny_model, photo)
    torch.testing.assert_close(predict_mask_logits(tiny_model, photo, prompt, features=feats), alone, rtol=0, atol=0)
    torch.testing.assert_close(predict_mask_logits(tiny_model, photo, prompt), alone, rtol=0, atol=0)
    # The 1-row decoder call equals that row of a batched transformers forward over two prompts.
    proc = tiny_model.processor
    prompts = [prompt, VisualPrompt(points=Points([[w * 0.5, h * 0.5], [3, 4]], [0, 1]))]
    sps = [proc.sam_prompt(EmbedInput(image=photo, prompt=p), (w, h), tiny_model.sam.mask_input_size) for p in prompts]
    pixels = proc.sam_input(proc.prepare_image(proc.load(EmbedInput(image=photo), "image", None)))[None]
    with torch.inference_mode():
        out = tiny_model.sam.model(
            pixel_values=pixels.expand(2, -1, -1, -1),
            input_points=torch.stack([s.coords for s in sps])[:, None],
            input_labels=torch.stack([s.labels for s in sps])[:, None],
            multimask_output=False,
        )
    expected = _upsampled(out.pred_masks[:1, 0], tiny_model.config.sam.image_size, (h, w))
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-5)


def test_errors(tiny_model, tokenizer, photo):
    w, h = photo.size
    with pytest.raises(PromptError, match="outside"):
        predict_mask(tiny_model, photo, VisualPrompt(points=Points([[w + 10, 5]])))
    with pytest.raises(PromptError, match="does not match"):
        predict_mask(tiny_model, photo, VisualPrompt(mask=Mask(np.ones((h + 1, w), bool))))
    from virtue import VirtueModel
    from virtue.model.presets import tiny_config

    no_sam = VirtueModel(tiny_config(sam_enabled=False), tokenizer).eval()
    with pytest.raises(PromptError, match="no SAM branch"):
        predict_mask(no_sam, photo, None)
