"""The resizes the official pipeline applies before Qwen's, and the content hash that keys cached features.
Reading and decoding images is `virtue.images`."""

from __future__ import annotations

import hashlib

from PIL import Image

from virtue.images import to_rgb

# Qwen2_VL_process_fn enlarges images with a side under 28 px to 56x56 (virtue-spec §2.1).
MIN_SIDE = 28
SMALL_IMAGE_SIZE = (56, 56)


def prepare_image(img: Image.Image, resize_to: tuple[int, int] | None = None, where: str = "image") -> Image.Image:
    """The official pre-processing before Qwen's resize: the optional squash of the eval config (W, H),
    then the enlargement of tiny images, then RGB."""
    if resize_to is not None:
        img = img.resize(tuple(resize_to))  # PIL default filter (bicubic), as the eval collator
    if min(img.size) < MIN_SIDE:
        img = img.resize(SMALL_IMAGE_SIZE)
    return to_rgb(img, where)


def prepared_size(size_wh: tuple[int, int], resize_to: tuple[int, int] | None = None) -> tuple[int, int]:
    """(W, H) of what `prepare_image` makes of an image of `size_wh`, without the image."""
    w, h = resize_to or size_wh
    return SMALL_IMAGE_SIZE if min(w, h) < MIN_SIDE else (w, h)


def image_digest(img: Image.Image) -> str:
    """Content hash of the decoded pixels (not the file), so the same picture from a path or an array
    shares cached features."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()
