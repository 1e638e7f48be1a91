"""The items of `POST /embed`, `POST /search` and `POST /v1/embeddings`, from the wire to checked model inputs:
their schema (`EmbedItem`), base64, multipart and image decoding within the service's limits, and preparation.

Preparation decodes every item of a request, then hands them all to the model's own processor
(`VirtueProcessor.check_inputs`) once: the image as displayed, the prompt inside it, placeholders and length
are checked by the code `encode` runs, and the returned `CheckedInput`s carry their token ids, so what is
queued cannot fail for bad input and is not tokenised again.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from virtue.apps.batching import ServeConfig
from virtue.apps.http_errors import ApiError, input_name, validation_error
from virtue.inputs import EmbedInput, parse_input

__all__ = [
    "FORM_FIELDS",
    "MULTIPART_SCHEMA",
    "EmbedItem",
    "ItemOrText",
    "RawItem",
    "add_component_schemas",
    "check_items",
    "decode_base64",
    "decode_image",
    "decode_item",
    "decode_items",
    "prepare_items",
    "read_form",
]

IMAGE_FORMATS = ("PNG", "JPEG")
# Pixel modes the model's RGB conversion handles; 16-bit and float images would be silently mangled.
IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
FORM_FIELDS = ("image", "mask", "text", "box", "points", "labels")
_SPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------------- schemas
class EmbedItem(BaseModel):
    """One thing to embed: text, an image, or both, with an optional visual prompt on the image."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": "iVBORw0KGgo...", "text": "Find the caption that best describes the segmented object.",
                 "box": [120, 40, 380, 300]},
                {"image": "iVBORw0KGgo...", "points": [[200, 150], [90, 60]], "labels": [1, 0]},
                {"text": "a dog on a sofa"},
            ]
        },
    )

    text: str | None = Field(None, description="instruction / caption; may hold the image placeholder <|image_pad|>")
    image: str | None = Field(
        None, description="PNG or JPEG bytes, base64 (standard alphabet; a data: URL is accepted)"
    )
    box: Annotated[list[float], Field(min_length=4, max_length=4)] | None = Field(
        None, description="x1, y1, x2, y2 in pixels of the image", examples=[[120, 40, 380, 300]]
    )
    points: Annotated[list[Annotated[list[float], Field(min_length=2, max_length=2)]], Field(min_length=1)] | None = (
        Field(None, description="[[x, y], ...] in pixels of the image", examples=[[[200, 150], [90, 60]]])
    )
    labels: list[int] | None = Field(None, description="one per point: 1 positive, 0 negative (default: all 1)")
    mask: str | None = Field(
        None, description="binary mask PNG (0/255 or 0/1), base64, the same size as the image"
    )


def _item_kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "item"


# A bare string is a text. The callable discriminator picks one branch, so a bad item gets the errors of
# that branch only (not "not a string" as well).
ItemOrText = Annotated[
    Annotated[EmbedItem, Tag("item")] | Annotated[str, Tag("text")],
    Discriminator(_item_kind),
]

MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "one item; box, points and labels are JSON strings",
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG or JPEG file"},
        "mask": {"type": "string", "format": "binary", "description": "binary mask PNG, same size as the image"},
        "text": {"type": "string"},
        "box": {"type": "string", "description": "JSON [x1, y1, x2, y2]", "examples": ["[120, 40, 380, 300]"]},
        "points": {"type": "string", "description": "JSON [[x, y], ...]", "examples": ["[[200, 150]]"]},
        "labels": {"type": "string", "description": "JSON [1, 0, ...]", "examples": ["[1]"]},
    },
}


def add_component_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Routes that read their body themselves (JSON or multipart) leave FastAPI without their JSON model; add
    the models to the OpenAPI components that the request bodies refer to."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            if model.__name__ in components:
                continue
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[model.__name__] = js
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------- decoding
@dataclasses.dataclass
class RawItem:
    """One item as received, before decoding: image and mask as encoded bytes."""

    text: str | None = None
    image: bytes | None = None
    mask: bytes | None = None
    box: list[float] | None = None
    points: list[list[float]] | None = None
    labels: list[int] | None = None


def decode_base64(value: str, index: int | None, field: str, config: ServeConfig) -> bytes:
    """Base64 (or a base64 data: URL) -> bytes, refusing an oversized payload from its length alone."""
    where = f"{input_name(index)}: {field}"
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(422, "invalid_base64", f"{where}: a data: URL must be 'data:<type>;base64,<data>'",
                           index=index, field=field)
    if _SPACE.search(value):
        value = _SPACE.sub("", value)  # `base64` on the command line wraps lines at 76 characters
    decoded_size = len(value) * 3 // 4  # within 2 bytes (padding); checked before allocating the bytes
    if decoded_size - 2 > config.max_image_bytes:
        raise ApiError(413, "image_too_large",
                       f"{where}: about {decoded_size} bytes exceeds the limit of {config.max_image_bytes} bytes",
                       index=index, field=field)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_base64", f"{where}: invalid base64 ({exc})", index=index, field=field) from None
    if not data:
        raise ApiError(422, "invalid_image", f"{where}: empty", index=index, field=field)
    return data


def decode_image(data: bytes, config: ServeConfig, index: int | None = None, field: str = "image") -> Image.Image:
    """PNG/JPEG bytes -> a decoded PIL image, checking bytes, then the header's size, before decoding pixels."""
    where = f"{input_name(index)}: {field}"

    def refuse(status: int, code: str, message: str) -> ApiError:
        return ApiError(status, code, f"{where}: {message}", index=index, field=field)

    if len(data) > config.max_image_bytes:
        raise refuse(413, "image_too_large", f"{len(data)} bytes exceeds the limit of {config.max_image_bytes} bytes")
    try:
        # `open` parses the header only; the pixels are decoded by `load` below, after the size check.
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise refuse(413, "image_too_large", str(exc)) from None
    except Exception as exc:  # whatever PIL raises on hostile bytes is the client's error, never a 500
        raise refuse(422, "invalid_image", f"not a PNG or JPEG image ({type(exc).__name__}: {exc})") from None
    w, h = img.size
    if w * h > config.max_image_pixels:
        raise refuse(413, "image_too_large",
                     f"{w}x{h} = {w * h} pixels exceeds the limit of {config.max_image_pixels} pixels")
    if w == 0 or h == 0:
        raise refuse(422, "invalid_image", f"image is empty ({w}x{h})")
    if img.mode not in IMAGE_MODES:
        raise refuse(422, "invalid_image", f"unsupported pixel mode {img.mode!r}; send 8-bit greyscale, RGB or RGBA")
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt data
        raise refuse(422, "invalid_image", f"cannot decode the {img.format} data ({exc})") from None
    return img


def decode_item(raw: RawItem, index: int | None, config: ServeConfig) -> EmbedInput:
    """One item decoded (images and mask) and parsed; the checks that need the model come in `check_items`."""
    where = input_name(index)
    if raw.text is not None and len(raw.text) > config.max_text_chars:
        raise ApiError(413, "text_too_long",
                       f"{where}: text has {len(raw.text)} characters; the limit is {config.max_text_chars}",
                       index=index, field="text")
    d: dict[str, Any] = {key: getattr(raw, key) for key in ("text", "box", "points", "labels")
                         if getattr(raw, key) is not None}
    if raw.image is not None:
        d["image"] = decode_image(raw.image, config, index, "image")
    if raw.mask is not None:
        d["mask"] = np.asarray(decode_image(raw.mask, config, index, "mask").convert("L"))
    return parse_input(d, where=where)  # InputError: "input i: ..." (-> 422)


def _raw_from_json(value: EmbedItem | str, index: int | None, config: ServeConfig) -> RawItem:
    if isinstance(value, str):
        return RawItem(text=value)
    return RawItem(
        text=value.text,
        image=None if value.image is None else decode_base64(value.image, index, "image", config),
        mask=None if value.mask is None else decode_base64(value.mask, index, "mask", config),
        box=value.box,
        points=value.points,
        labels=value.labels,
    )


def decode_items(values: Sequence[EmbedItem | str], config: ServeConfig, indexed: bool = True) -> list[EmbedInput]:
    """JSON items decoded in order, named "input i" (or "query" when not `indexed`)."""
    out = []
    for i, value in enumerate(values):
        index = i if indexed else None
        out.append(decode_item(_raw_from_json(value, index, config), index, config))
    return out


# --------------------------------------------------------------------------------------------------- checking
def check_items(
    model: Any, items: Sequence[EmbedInput], *, indexed: bool = True, image_resize: tuple[int, int] | None = None
) -> list[EmbedInput]:
    """Every check `encode` makes, run once before queueing by the model's processor (see the module docstring).

    `image_resize` must be what the items will be encoded with, or `encode` tokenises them again. A model
    without a processor (anything with `encode`, in tests) gets the items unchecked: its `encode` checks them.
    Raises the processor's InputError (ImageError, PromptError) naming the input(s).
    """
    processor = getattr(model, "processor", None)
    if processor is None or not hasattr(processor, "check_inputs"):
        return list(items)
    names = [input_name(i if indexed else None) for i in range(len(items))]
    return processor.check_inputs(items, image_resize=image_resize, names=names)


def prepare_items(
    values: Sequence[EmbedItem | str], config: ServeConfig, model: Any, *, indexed: bool = True
) -> list[EmbedInput]:
    """JSON items decoded and checked (`decode_items`, then `check_items`): ready to queue."""
    return check_items(model, decode_items(values, config, indexed), indexed=indexed)


async def read_form(request: Request, config: ServeConfig) -> RawItem:
    """A multipart upload: one item, files `image` / `mask`, fields text and JSON-encoded box / points / labels."""
    try:
        form = await request.form(max_files=2, max_fields=len(FORM_FIELDS),
                                  max_part_size=4 * config.max_text_chars + 4096)  # UTF-8: <= 4 bytes a char
    except StarletteHTTPException as exc:  # python-multipart's complaint, e.g. too many fields
        status = 413 if "maximum size" in str(exc.detail) else 422
        raise ApiError(status, "invalid_multipart", f"input 0: multipart: {exc.detail}", index=0) from None
    try:
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(422, "invalid_request", f"input 0: unknown form field(s) {unknown}; allowed: "
                           f"{list(FORM_FIELDS)}", index=0, field=unknown[0])
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for key in FORM_FIELDS:
            values = form.getlist(key)
            if len(values) > 1:
                raise ApiError(422, "invalid_request", f"input 0: {key}: given {len(values)} times", index=0, field=key)
            if values:
                await _read_form_value(key, values[0], config, fields, files)
    finally:
        await form.close()
    try:
        checked = EmbedItem.model_validate(fields)  # the same shape rules as JSON items
    except ValidationError as exc:
        raise validation_error(exc.errors(), ("inputs", 0)) from None
    return RawItem(text=checked.text, image=files.get("image"), mask=files.get("mask"), box=checked.box,
                   points=checked.points, labels=checked.labels)


async def _read_form_value(key: str, value: Any, config: ServeConfig, fields: dict[str, Any],
                           files: dict[str, bytes]) -> None:
    """One form part into `files` (image, mask) or `fields` (text, JSON box / points / labels)."""
    if key in ("image", "mask"):
        if not isinstance(value, UploadFile):
            raise ApiError(422, "invalid_request", f"input 0: {key}: send it as a file part", index=0, field=key)
        if value.size is not None and value.size > config.max_image_bytes:
            raise ApiError(413, "image_too_large", f"input 0: {key}: {value.size} bytes exceeds the limit "
                           f"of {config.max_image_bytes} bytes", index=0, field=key)
        files[key] = await value.read()
    elif isinstance(value, UploadFile):
        raise ApiError(422, "invalid_request", f"input 0: {key}: expected a form field, got a file", index=0,
                       field=key)
    elif key == "text":
        fields[key] = value
    else:
        try:
            fields[key] = json.loads(value)
        except ValueError:
            raise ApiError(422, "invalid_request", f"input 0: {key}: expected JSON, got {value[:40]!r}",
                           index=0, field=key) from None
