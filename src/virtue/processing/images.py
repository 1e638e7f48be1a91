"""Reading images into RGB PIL images, and the resizes the official pipeline applies before Qwen's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from virtue.errors import ImageError

# Qwen2_VL_process_fn enlarges images with a side under 28 px to 56x56 (virtue-spec §2.1).
MIN_SIDE = 28
SMALL_IMAGE_SIZE = (56, 56)


def load_image(image, where: str = "image") -> Image.Image:
    """Open a path, PIL image or numpy array (H x W, H x W x 3/4; uint8, or float in [0, 1]).

    Returns the image in its own mode; `to_rgb` converts. Raises `ImageError` naming `where`.
    """
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{where}: file not found: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                img = opened.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"{where}: cannot read {path} as an image ({exc})") from exc
    elif isinstance(image, np.ndarray):
        img = _from_array(image, where)
    else:
        raise ImageError(f"{where}: expected a path, PIL image or numpy array, got {type(image).__name__}")
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{where}: image is empty ({img.width}x{img.height})")
    return img


def image_size_hint(image) -> tuple[int, int] | None:
    """(width, height) without decoding (a file's header), or None when it cannot be told cheaply."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return image.shape[1], image.shape[0]
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                return opened.size
        except (OSError, UnidentifiedImageError, ValueError):
            return None
    size_wh = getattr(image, "size_wh", None)  # an image preprocessed ahead of time
    return tuple(size_wh) if size_wh is not None else None


def _from_array(arr: np.ndarray, where: str) -> Image.Image:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{where}: expected an H x W or H x W x 3/4 array, got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ImageError(f"{where}: expected uint8 or float pixels, got {arr.dtype}")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{where}: float pixels must lie in [0, 1]")
        arr = np.rint(arr * 255).astype(np.uint8)
    if arr.size == 0:
        raise ImageError(f"{where}: image is empty (shape {arr.shape})")
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb`: transparent pixels are composited onto white."""
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def prepare_image(img: Image.Image, resize_to: tuple[int, int] | None = None) -> Image.Image:
    """The official pre-processing before Qwen's resize: the optional squash of the eval config (W, H),
    then the enlargement of tiny images, then RGB."""
    if resize_to is not None:
        img = img.resize(tuple(resize_to))  # PIL default filter (bicubic), as the eval collator
    if min(img.size) < MIN_SIDE:
        img = img.resize(SMALL_IMAGE_SIZE)
    return to_rgb(img)


def image_digest(img: Image.Image) -> str:
    """Content hash of the decoded pixels (not the file), so the same picture from a path or an array
    shares cached features."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()
