"""Reading images safely: a path, PIL image or array opened with its size checked from the header before the
pixels are decoded, EXIF orientation, RGB conversion. Everything below `inputs` that touches an image file goes
through here, so one set of limits and one error type (`ImageError`, naming the input) apply everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from virtue.errors import ImageError

# File suffixes read as images when a folder is scanned (search index, demo gallery, CLI arguments).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Largest image read, in pixels, checked from the header before decoding (a 100-megapixel photo is ~300 MB
# decoded). Per call (`load_image(max_pixels=...)`, `VirtueProcessor.max_image_pixels`); PIL's own process-wide
# `Image.MAX_IMAGE_PIXELS` is left alone: above it PIL refuses by itself, which is reported as an ImageError too.
MAX_IMAGE_PIXELS = 100_000_000
# EXIF orientation tag; values 5-8 turn the picture by 90 degrees (width and height swap).
EXIF_ORIENTATION = 0x0112
# Everything PIL raises for a file it cannot read: unknown formats, truncated or corrupt data, bombs.
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_image(image, where: str = "image", *, max_pixels: int | None = MAX_IMAGE_PIXELS,
               exif_transpose: bool = False) -> Image.Image:
    """Open a path, PIL image or numpy array (H x W, H x W x 3/4; uint8, or float in [0, 1]).

    Returns the image in its own mode; `to_rgb` converts. `exif_transpose` turns it upright as its EXIF
    orientation says (how viewers display photos). Raises `ImageError` naming `where` for every failure, including
    images above `max_pixels` (checked from the header, before decoding).
    """
    if isinstance(image, Image.Image):
        img = image
        check_pixels(img.size, max_pixels, where)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{where}: file not found: {path}")
        try:
            with Image.open(path) as opened:
                check_pixels(opened.size, max_pixels, where)
                opened.load()
                img = opened.copy()
        except ImageError:
            raise
        except _READ_ERRORS as exc:
            raise ImageError(f"{where}: cannot read {path} as an image ({type(exc).__name__}: {exc})") from exc
    elif isinstance(image, np.ndarray):
        img = _from_array(image, where)
        check_pixels(img.size, max_pixels, where)
    else:
        raise ImageError(f"{where}: expected a path, PIL image or numpy array, got {type(image).__name__}")
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{where}: image is empty ({img.width}x{img.height})")
    if exif_transpose and exif_orientation(img) not in (None, 1):
        try:
            img = ImageOps.exif_transpose(img)
        except _READ_ERRORS as exc:
            raise ImageError(f"{where}: cannot apply the EXIF orientation ({exc})") from exc
    return img


def check_pixels(size_wh: tuple[int, int], max_pixels: int | None, where: str) -> None:
    """ImageError naming `where` when width x height is above `max_pixels` (None: no limit)."""
    w, h = size_wh
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{where}: image of {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                         "(max_image_pixels)")


def exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except _READ_ERRORS:
        return None


def header_size(image: Image.Image | str | Path, where: str, exif_transpose: bool = False) -> tuple[int, int]:
    """(width, height) of a PIL image or an image file from its header alone, as displayed when
    `exif_transpose`; ImageError naming `where` when the file is missing or its header unreadable."""
    if isinstance(image, Image.Image):
        return _upright(image.size, image, exif_transpose)
    path = Path(image)
    if not path.is_file():
        raise ImageError(f"{where}: file not found: {path}")
    try:
        with Image.open(path) as opened:
            return _upright(opened.size, opened, exif_transpose)
    except _READ_ERRORS as exc:
        raise ImageError(f"{where}: cannot read {path} as an image ({type(exc).__name__}: {exc})") from exc


def read_image_size(path: Path) -> tuple[int, int] | str:
    """The (width, height) of an image file, from its header only, or why the file cannot be used.

    Returns the reason instead of raising: the dataset readers check a million rows and report every bad one.
    """
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        return f"cannot read {path} as an image ({exc})"
    if width == 0 or height == 0:
        return f"image {path} is empty ({width}x{height})"
    return width, height


def _upright(size: tuple[int, int], img: Image.Image, exif_transpose: bool) -> tuple[int, int]:
    if exif_transpose and exif_orientation(img) in (5, 6, 7, 8):
        return size[1], size[0]
    return size


def _from_array(arr: np.ndarray, where: str) -> Image.Image:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{where}: expected an H x W or H x W x 3/4 array, got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.size == 0:  # before any reduction over the pixels
        raise ImageError(f"{where}: image is empty (shape {arr.shape})")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ImageError(f"{where}: expected uint8 or float pixels, got {arr.dtype}")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{where}: float pixels must lie in [0, 1]")
        arr = np.rint(arr * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """RGB as transformers' `convert_to_rgb`: transparent pixels are composited onto white."""
    if img.mode == "RGB":
        return img
    try:
        rgba = img.convert("RGBA")
    except _READ_ERRORS as exc:  # modes PIL cannot convert (e.g. some 16-bit or float ones)
        raise ImageError(f"{where}: cannot convert a {img.mode} image to RGB ({exc})") from exc
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
