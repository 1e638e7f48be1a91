"""Qwen2-VL image preprocessing without torchvision (virtue-spec §2.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from virtue.config import ImageProcessingConfig
from virtue.errors import ImageError

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, cfg: ImageProcessingConfig) -> tuple[int, int]:
    """(height, width) rounded to multiples of patch*merge with the pixel count in [min_pixels, max_pixels]."""
    factor = cfg.factor
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}, which Qwen2-VL cannot encode"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt((height * width) / cfg.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class QwenImage:
    """One image as Qwen2-VL's vision tower wants it.

    Attributes:
        normalized: [3, H', W'] float32, resized and CLIP-normalised (the official SAM input source).
        grid_thw: (1, grid_h, grid_w).
        cfg: the preprocessing settings (patch, merge and temporal sizes).

    The patches are cut where the model runs (`patches(device)`): they repeat every pixel `temporal_patch_size`
    times, so moving the image instead halves what crosses to the device (and between worker processes).
    """

    normalized: torch.Tensor
    grid_thw: tuple[int, int, int]
    cfg: ImageProcessingConfig

    @property
    def num_tokens(self) -> int:
        """Visual tokens after the 2x2 merge: copies of the image placeholder in the text."""
        t, h, w = self.grid_thw
        return t * h * w // 4

    @property
    def pixel_values(self) -> torch.Tensor:
        """[grid_h * grid_w, 3 * temporal * patch * patch] patches, on the CPU."""
        return patchify(self.normalized, self.cfg)

    def patches(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        return patchify(self.normalized.to(device, non_blocking=True), self.cfg).to(dtype)


def qwen_image(img: Image.Image, cfg: ImageProcessingConfig) -> QwenImage:
    """Resize (PIL bicubic), rescale and CLIP-normalise an RGB image (patches are cut later, see QwenImage)."""
    h, w = smart_resize(img.height, img.width, cfg)
    resized = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.uint8)
    # Same arithmetic as transformers' numpy path: rescale in float64, then normalise in float32.
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    normalized = torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())  # [3, H', W']
    return QwenImage(normalized, (1, h // cfg.patch_size, w // cfg.patch_size), cfg)


def patchify(image: torch.Tensor, cfg: ImageProcessingConfig) -> torch.Tensor:
    """[3, H, W] -> [gh * gw, 3 * T * p * p], patches ordered by 2x2 merge groups, the frame repeated T times."""
    c, height, width = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, c, p, p]
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # [..., c, t, p, p]
    return x.reshape(gh * gw, c * t * p * p).contiguous()
