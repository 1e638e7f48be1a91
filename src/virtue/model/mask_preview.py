"""The mask SAM2's own mask head predicts for a visual prompt: a picture of what the SAM branch attends to.

VIRTUE never decodes masks (the prompt-conditioned 64x64 map goes to the connector instead), so a user cannot
see whether a click or a box selected the region they meant. This module runs the rest of SAM2's decoder on
exactly the inputs the embedding uses: the same SAM pixels (compatibility frame included), the same prompt
tensors from `sam_prompt`, the same sparse/dense prompt embeddings as `SamBranch.fuse`. Only the mask head
(upscaling with the high-resolution FPN levels and the hypernetwork MLPs) is added on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from virtue.errors import PromptError
from virtue.inputs import EmbedInput, ImageLike
from virtue.model.embedder import VirtueModel
from virtue.processing.sam import SamPrompt
from virtue.prompts import VisualPrompt


@dataclass
class SamImageFeatures:
    """SAM2's image-side features for one image, reusable across prompts on that image.

    Attributes:
        image_embeddings: [1, C, h, w], the lowest FPN level plus `no_memory_embedding` (as `encode_images`).
        high_res: (conv_s0(level 0), conv_s1(level 1)), [1, C/8, 4h, 4w] and [1, C/4, 2h, 2w]: the skip
            connections of the mask decoder's upscaling path.
        size_wh: the original image size, the frame of prompt coordinates and of the returned mask.
        key: the processor's cache key of the decoded image (pixels digest, pre-resize).
    """

    image_embeddings: torch.Tensor
    high_res: tuple[torch.Tensor, torch.Tensor]
    size_wh: tuple[int, int]
    key: tuple


def _require_sam(model: VirtueModel):
    if model.sam is None:
        raise PromptError("this model has no SAM branch, so there is no mask to show")
    return model.sam


def _sam_dtype(model: VirtueModel) -> torch.dtype:
    return next(_require_sam(model).parameters()).dtype


@torch.inference_mode()
def sam_image_features(
    model: VirtueModel,
    image: ImageLike,
    *,
    image_resize: tuple[int, int] | None = None,
) -> SamImageFeatures:
    """Run SAM2's image encoder once on `image`, through the model's own preprocessing.

    Args:
        image: a PIL image, path or numpy array, as `VirtueModel.encode` reads it.
        image_resize: the (W, H) pre-resize `encode(..., image_resize=)` was given, so the mask is computed on
            the same pixels as the embedding.
    """
    sam = _require_sam(model).model
    proc = model.processor
    loaded = proc.load(EmbedInput(image=image), "image", image_resize)
    pixels = proc.sam_input(proc.prepare_image(loaded), model.device)  # [3, S, S], compat frame included
    pixels = pixels[None].to(model.device, _sam_dtype(model))
    fpn = sam.vision_encoder(pixels).fpn_hidden_states  # high to low resolution, [1, C, *, *] each
    # The same sum `SamBranch.encode_images` returns: single-frame SAM2 adds the "no memory" embedding.
    lowest = fpn[-1] + sam.no_memory_embedding.view(1, -1, 1, 1)
    # get_image_features projects the two finer levels once per image; the mask decoder consumes them as is.
    s0 = sam.mask_decoder.conv_s0(fpn[0])
    s1 = sam.mask_decoder.conv_s1(fpn[1])
    return SamImageFeatures(lowest, (s0, s1), loaded.size_wh, loaded.key)


def prompt_embeddings(
    model: VirtueModel, prompt: SamPrompt, grid_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse [1, 1, k+1, C] and dense [1, C, h, w] prompt embeddings, built as `SamBranch._fuse_group` does.

    Every prompt (box corners included, labels 2/3) goes through `_embed_points` with SAM's padding point
    appended, because that is what the embedding path feeds the two-way transformer; a mask prompt goes
    through `mask_embed`, otherwise the learned "no mask" embedding is broadcast.
    """
    sam = _require_sam(model).model
    dtype, device = _sam_dtype(model), model.device
    coords = prompt.coords.to(device=device, dtype=dtype)[None, None]  # [1, 1, k, 2]
    labels = prompt.labels.to(device)[None, None]  # [1, 1, k]
    sparse = sam.prompt_encoder._embed_points(coords, labels, pad=True)
    if prompt.mask is not None:
        dense = sam.prompt_encoder.mask_embed(prompt.mask.to(device=device, dtype=dtype)[None])
    else:
        h, w = grid_hw
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
    return sparse.to(dtype), dense.to(dtype)


@torch.inference_mode()
def predict_mask_logits(
    model: VirtueModel,
    image: ImageLike,
    prompt: VisualPrompt | None,
    *,
    features: SamImageFeatures | None = None,
    multimask_output: bool = False,
    image_resize: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Mask logits [H, W] (float32, CPU) in the original image's frame; > 0 is inside. See `predict_mask`."""
    sam = _require_sam(model).model
    if features is None:
        features = sam_image_features(model, image, image_resize=image_resize)
    w, h = features.size_wh
    if prompt is not None and not prompt.is_empty:
        try:
            prompt.validate((w, h))
        except PromptError as exc:
            raise PromptError(f"prompt: {exc}") from None
    emb = features.image_embeddings
    grid_hw = (emb.shape[-2], emb.shape[-1])
    sam_prompt = model.processor.sam_prompt(EmbedInput(image=image, prompt=prompt), (w, h), model.sam.mask_input_size)
    sparse, dense = prompt_embeddings(model, sam_prompt, grid_hw)
    pos = sam.get_image_wide_positional_embeddings().to(emb.dtype)
    masks, iou, _, _ = sam.mask_decoder(
        image_embeddings=emb,
        image_positional_embeddings=pos,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        # False: SAM2's single-mask output, which falls back to the best of the three multimask outputs when
        # it is unstable (dynamic_multimask_via_stability), as SAM2's predictor does for refined prompts.
        multimask_output=multimask_output,
        high_resolution_features=list(features.high_res),
    )  # masks [1, 1, M, 4h, 4w], iou [1, 1, M]
    best = int(iou[0, 0].argmax()) if masks.shape[2] > 1 else 0
    logits = masks[:, 0, best : best + 1].float()  # [1, 1, 4h, 4w]
    # Two steps, as SAM2's post-processing: the low-res mask lives in the square SAM input frame (the image
    # was squashed, not padded, to it), so it is first brought to that frame, then un-squashed.
    size = model.config.sam.image_size
    logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0, 0].cpu()


def predict_mask(
    model: VirtueModel,
    image: ImageLike,
    prompt: VisualPrompt | None,
    *,
    features: SamImageFeatures | None = None,
    multimask_output: bool = False,
    image_resize: tuple[int, int] | None = None,
) -> np.ndarray:
    """The binary mask SAM2's mask head selects for `prompt` on `image`: H x W bool, the image's own size.

    It is computed from the very inputs the embedding's SAM branch reads (preprocessing, compatibility frame,
    prompt mapping, padding point), so it shows what the model is looking at, quirks included: with the
    official `boxes_in_raw_pixels` setting a box is read in SAM's 1024-px frame, and the mask shows that.
    No prompt means the model's k x k point grid.

    Args:
        image: a PIL image, path or numpy array.
        prompt: points / box / mask in pixels of `image`, or None.
        features: `sam_image_features(model, image)` computed earlier, to skip the image encoder when only
            the prompt changed.
        multimask_output: True: decode SAM2's three multimask outputs and keep the one with the best predicted
            IoU, instead of the single-mask output.
        image_resize: the pre-resize the embedding used (`encode(..., image_resize=)`).
    Raises:
        PromptError: the model has no SAM branch, or the prompt does not fit the image.
    """
    logits = predict_mask_logits(
        model, image, prompt, features=features, multimask_output=multimask_output, image_resize=image_resize
    )
    return (logits > 0).numpy()
