"""SAM2 inputs: the 1024x1024 image tensor and the prompt tensors, in SAM's frame (virtue-spec §2.1-2.2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from virtue.config import IMAGENET_MEAN, IMAGENET_STD, CompatConfig
from virtue.processing.qwen import QwenImage
from virtue.prompts import MaskLogits, VisualPrompt

# SAM label codes: 1 positive point, 0 negative point, 2/3 box corners, -1 "not a point" (padding).
BOX_LABELS = (2, 3)
PAD_LABEL = -1


def sam_source(img: Image.Image, compat: CompatConfig) -> torch.Tensor | None:
    """What SAM's input is made from, on the CPU: the RGB image as uint8 [3, H, W] (clean), or None when the
    released weights' quirk takes it from the Qwen-normalised image instead (virtue-spec §10.1)."""
    if compat.sam_input_from_qwen_pixels:
        return None
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def sam_pixels(
    source: torch.Tensor | None, qwen: QwenImage, size: int, compat: CompatConfig, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The [3, size, size] tensor SAM's image encoder reads, computed on `device`.

    compat (virtue-spec §10.1): the released weights saw the Qwen-resized, CLIP-normalised image, resized
    and ImageNet-normalised again. Clean: the RGB image (`source`) scaled to [0, 1], resized, ImageNet-normalised.
    The 1024² resize is the costliest preprocessing step: it runs where the model runs, from a small source.
    """
    if compat.sam_input_from_qwen_pixels:
        x = qwen.normalized[None].to(device, non_blocking=True)
    else:
        x = source[None].to(device, non_blocking=True).float() / 255
    # torchvision's tensor Resize (bilinear, antialias) without torchvision.
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


@dataclass
class SamPrompt:
    """Prompt tensors for one image, before SAM's own padding point is appended.

    Attributes:
        coords: [n, 2] float32, (x, y) in the SAM input frame.
        labels: [n] int64 SAM label codes.
        mask: [1, m, m] float32 dense mask prompt (m = 4 x the embedding side), or None.
    """

    coords: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None = None


def grid_points(points_per_side: int, size: int) -> np.ndarray:
    """k x k grid at cell centres, x varying fastest, in the SAM frame (SAM's `build_point_grid`)."""
    offset = 1 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs = np.tile(side[None, :], (points_per_side, 1))
    ys = np.tile(side[:, None], (1, points_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2) * size


def sam_prompt(
    prompt: VisualPrompt | None,
    size_wh: tuple[int, int],
    *,
    sam_size: int,
    mask_size: int,
    points_per_side: int,
    compat: CompatConfig,
) -> SamPrompt:
    """Map a prompt in original-image pixels to SAM's frame. No prompt -> the k x k grid as one prompt."""
    w, h = size_wh
    scale = np.array([sam_size / w, sam_size / h])
    coords: list[np.ndarray] = []
    labels: list[int] = []
    if prompt is None or prompt.is_empty:
        grid = grid_points(points_per_side, sam_size)
        return SamPrompt(
            torch.from_numpy(grid).float(), torch.ones(len(grid), dtype=torch.long)
        )
    if prompt.box is not None:
        corners = np.array(prompt.box.xyxy, dtype=np.float64).reshape(2, 2)
        # compat (virtue-spec §10.2): SCaR-trained weights read raw pixels as SAM-frame coordinates.
        coords.append(corners if compat.boxes_in_raw_pixels else corners * scale)
        labels.extend(BOX_LABELS)
    if prompt.points is not None:
        coords.append(np.array(prompt.points.xy, dtype=np.float64) * scale)
        labels.extend(prompt.points.labels)
    mask = None
    if prompt.mask is not None:
        m = torch.from_numpy(prompt.mask.array.astype(np.float32))[None, None]
        if isinstance(prompt.mask, MaskLogits):
            # SAM2's image-predictor convention: low-resolution logits, used as given.
            if m.shape[-2:] != (mask_size, mask_size):
                m = F.interpolate(m, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
            mask = m[0]
        else:
            # SAM2's convention for a binary mask prompt (SAM2Base._forward_sam_heads): 0/1, resized.
            mask = F.interpolate(m, size=(mask_size, mask_size), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
        if not coords:
            coords.append(np.zeros((1, 2)))
            labels.append(PAD_LABEL)
    return SamPrompt(
        torch.from_numpy(np.concatenate(coords)).float(), torch.tensor(labels, dtype=torch.long), mask
    )
