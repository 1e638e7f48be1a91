"""The HTTP service behind `virtue serve`: `POST /embed`, `POST /search`, `GET /health` (FastAPI), and the
OpenAI-compatible `POST /v1/embeddings`, `GET /v1/models` (`virtue.apps.openai_api`).

Needs the `serve` extra (fastapi, uvicorn, python-multipart). Every item of a request is decoded and validated
before it is queued, so bad input gets a 4xx naming the input (`input 3: box [...] lies outside the 64x48
image`) and never reaches, or fails, another client's batch.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from virtue.apps.batching import BatcherClosedError, EmbedBatcher, QueueFullError, ServeConfig
from virtue.errors import InputError, PromptError
from virtue.inputs import EmbedInput, parse_input
from virtue.processing.images import header_size
from virtue.processing.text import with_image_token

__all__ = [
    "ApiError",
    "EmbedItem",
    "EmbedRequest",
    "EmbedResponse",
    "ErrorBody",
    "SearchRequest",
    "ServeConfig",
    "create_app",
    "decode_image",
]

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("PNG", "JPEG")
# Pixel modes the model's RGB conversion handles; 16-bit and float images would be silently mangled.
IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
FORM_FIELDS = ("image", "mask", "text", "box", "points", "labels")
_INPUT_INDEX = re.compile(r"^input (\d+):")
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


class EmbedRequest(BaseModel):
    """`POST /embed` JSON body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": [
                    {"image": "iVBORw0KGgo...", "text": "Find the caption that best describes the segmented object.",
                     "box": [120, 40, 380, 300]},
                    "a dog on a sofa",
                ]}
            ]
        },
    )

    inputs: list[ItemOrText] = Field(..., min_length=1, description="items to embed; a string is a text")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] = Field(..., description="one L2-normalised row per input, in order")
    dim: int
    model: str


class SearchRequest(BaseModel):
    """`POST /search` body: rank the indexed regions for one query."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"query": "a red car parked by the road", "top_k": 5, "kind": "all"}]},
    )

    query: ItemOrText
    top_k: int = Field(10, ge=1, le=1000)
    kind: Literal["all", "image", "region"] = Field("all", description="rank whole images, regions, or both")


class SearchResponse(BaseModel):
    hits: list[dict[str, Any]]
    model: str


class HealthResponse(BaseModel):
    status: str
    model: str
    dim: int | None
    device: str
    queue_depth: int = Field(..., description="requests waiting for the model")
    queued_items: int
    queue_size: int
    search: bool = Field(..., description="whether POST /search has an index")
    stats: dict[str, int]


class ErrorBody(BaseModel):
    """Every error answer: a code, a message naming the input, and (where known) the input and field."""

    error: str = Field(..., examples=["invalid_image"])
    detail: str = Field(..., examples=["input 1: image: not a PNG or JPEG image"])
    input: int | None = None
    field: str | None = None


_MULTIPART_SCHEMA: dict[str, Any] = {
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

_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "a size limit was exceeded (request, image bytes or pixels, items, text)"},
    415: {"model": ErrorBody, "description": "unsupported Content-Type"},
    422: {"model": ErrorBody, "description": "malformed input; the message names the input and the problem"},
    503: {"model": ErrorBody, "description": "server busy (queue full); retry after `Retry-After` seconds"},
}


# --------------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A refused request: status, machine-readable code and a message naming the input."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        index: int | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.index, self.field, self.headers = index, field, headers

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.code, detail=self.message, input=self.index, field=self.field)
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def _where(index: int | None) -> str:
    return "query" if index is None else f"input {index}"


def _validation_error(errors: Sequence[Any], prefix: Sequence[str | int] = ()) -> ApiError:
    """pydantic errors -> one 422 whose message names the input and field. The rejected values are not
    echoed (FastAPI's default does): they may be megabytes of base64."""
    parts: list[str] = []
    first_index: int | None = None
    first_field: str | None = None
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        if loc and loc[0] == "body":  # FastAPI's marker for the request body
            loc = loc[1:]
        index: int | None = None
        if len(loc) >= 2 and loc[0] == "inputs" and isinstance(loc[1], int):
            index, rest, where = loc[1], loc[2:], f"input {loc[1]}"
        elif loc and loc[0] == "query":
            rest, where = loc[1:], "query"
        else:
            rest, where = loc, "request"
        if where != "request" and rest and rest[0] in ("item", "text"):
            rest = rest[1:]  # the discriminator's branch tag means nothing to a client
        field = ".".join(str(p) for p in rest) or None
        if first_index is None and first_field is None:
            first_index, first_field = index, field
        parts.append(f"{where}: {field}: {err.get('msg')}" if field else f"{where}: {err.get('msg')}")
    if len(parts) > 5:
        parts = [*parts[:5], f"... and {len(parts) - 5} more"]
    return ApiError(422, "invalid_request", "; ".join(parts), index=first_index, field=first_field)


def _input_error(exc: InputError) -> ApiError:
    match = _INPUT_INDEX.match(str(exc))
    code = {"ImageError": "invalid_image", "PromptError": "invalid_prompt"}.get(type(exc).__name__, "invalid_input")
    return ApiError(422, code, str(exc), index=int(match.group(1)) if match else None)


# --------------------------------------------------------------------------------------------------- decoding
@dataclasses.dataclass
class _RawItem:
    """One item as received, before decoding: image and mask as encoded bytes."""

    text: str | None = None
    image: bytes | None = None
    mask: bytes | None = None
    box: list[float] | None = None
    points: list[list[float]] | None = None
    labels: list[int] | None = None


def _b64(value: str, index: int | None, field: str, config: ServeConfig) -> bytes:
    where = f"{_where(index)}: {field}"
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(422, "invalid_base64", f"{where}: a data: URL must be 'data:<type>;base64,<data>'",
                           index=index, field=field)
    if _SPACE.search(value):
        value = _SPACE.sub("", value)  # `base64` on the command line wraps lines at 76 characters
    # Refuse oversized payloads from their length alone, before allocating the decoded bytes.
    decoded_size = len(value) * 3 // 4  # within 2 bytes (padding)
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
    where = f"{_where(index)}: {field}"
    if len(data) > config.max_image_bytes:
        raise ApiError(413, "image_too_large",
                       f"{where}: {len(data)} bytes exceeds the limit of {config.max_image_bytes} bytes",
                       index=index, field=field)
    try:
        # `open` parses the header only; the pixels are decoded by `load` below, after the size check.
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"{where}: {exc}", index=index, field=field) from None
    except Exception as exc:  # whatever PIL raises on hostile bytes is the client's error, never a 500
        raise ApiError(422, "invalid_image", f"{where}: not a PNG or JPEG image ({type(exc).__name__}: {exc})",
                       index=index, field=field) from None
    w, h = img.size
    if w * h > config.max_image_pixels:
        raise ApiError(413, "image_too_large",
                       f"{where}: {w}x{h} = {w * h} pixels exceeds the limit of {config.max_image_pixels} pixels",
                       index=index, field=field)
    if w == 0 or h == 0:
        raise ApiError(422, "invalid_image", f"{where}: image is empty ({w}x{h})", index=index, field=field)
    if img.mode not in IMAGE_MODES:
        raise ApiError(422, "invalid_image",
                       f"{where}: unsupported pixel mode {img.mode!r}; send 8-bit greyscale, RGB or RGBA",
                       index=index, field=field)
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt data
        raise ApiError(422, "invalid_image", f"{where}: cannot decode the {img.format} data ({exc})",
                       index=index, field=field) from None
    return img


def upright_photos(model: Any) -> bool:
    """Whether `model` turns photos upright by their EXIF orientation (its compatibility setting): prompts are
    then checked against the displayed size, as `encode` checks them."""
    compat = getattr(getattr(model, "config", None), "compat", None)
    return bool(getattr(compat, "exif_orientation", False))


def _prepare(raw: _RawItem, index: int | None, config: ServeConfig, upright: bool) -> EmbedInput:
    """Decode and validate one item completely, so that what is queued cannot fail for bad input. `upright`:
    see `upright_photos`."""
    where = _where(index)
    if raw.text is not None and len(raw.text) > config.max_text_chars:
        raise ApiError(413, "text_too_long",
                       f"{where}: text has {len(raw.text)} characters; the limit is {config.max_text_chars}",
                       index=index, field="text")
    d: dict[str, Any] = {}
    if raw.text is not None:
        d["text"] = raw.text
    image = None if raw.image is None else decode_image(raw.image, config, index, "image")
    if image is not None:
        d["image"] = image
    if raw.mask is not None:
        d["mask"] = np.asarray(decode_image(raw.mask, config, index, "mask").convert("L"))
    for key in ("box", "points", "labels"):
        if getattr(raw, key) is not None:
            d[key] = getattr(raw, key)
    item = parse_input(d, where=where)  # InputError: "input i: ..." (-> 422)
    if image is not None and item.prompt is not None:
        try:
            item.prompt.validate(header_size(image, where, upright))
        except PromptError as exc:
            raise PromptError(f"{where}: {exc}") from None
    with_image_token(item.text, item.has_image, where)  # placeholder count, as encode will check it
    return item


def _raw_from_json(value: EmbedItem | str, index: int | None, config: ServeConfig) -> _RawItem:
    if isinstance(value, str):
        return _RawItem(text=value)
    return _RawItem(
        text=value.text,
        image=None if value.image is None else _b64(value.image, index, "image", config),
        mask=None if value.mask is None else _b64(value.mask, index, "mask", config),
        box=value.box,
        points=value.points,
        labels=value.labels,
    )


def _prepare_json(
    values: Sequence[EmbedItem | str], config: ServeConfig, upright: bool, indexed: bool = True
) -> list[EmbedInput]:
    out = []
    for i, value in enumerate(values):
        index = i if indexed else None
        out.append(_prepare(_raw_from_json(value, index, config), index, config, upright))
    return out


async def _read_form(request: Request, config: ServeConfig) -> _RawItem:
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
            if not values:
                continue
            value = values[0]
            if key in ("image", "mask"):
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", f"input 0: {key}: send it as a file part", index=0,
                                   field=key)
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
    finally:
        await form.close()
    try:
        checked = EmbedItem.model_validate(fields)  # the same shape rules as JSON items
    except ValidationError as exc:
        raise _validation_error(exc.errors(), ("inputs", 0)) from None
    return _RawItem(text=checked.text, image=files.get("image"), mask=files.get("mask"), box=checked.box,
                    points=checked.points, labels=checked.labels)


def _jsonable(value: Any) -> Any:
    """Search hits (dataclasses, numpy scalars and arrays, paths) -> JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------- request size
class _BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, from Content-Length or while it streams in.

    The body is read here (the endpoints read it whole anyway) and replayed to the app, so an oversized upload
    is refused before anything parses it, whatever the framework version does.
    """

    # An oversized body up to this many times the limit is read and dropped before answering: closing a
    # connection with unread data makes the kernel reset it, and the client may then never see the 413.
    DRAIN_FACTOR = 4

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.DRAIN_FACTOR * self.limit:
                await self._drain(receive, 0)
            await self._refuse(send, f"request body of {int(declared)} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.limit:
                if more:
                    await self._drain(receive, size)
                await self._refuse(send, f"request body of more than {self.limit} bytes")
                return
            chunks.append(body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the client to disconnect, as without us

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, size: int) -> None:
        more = True
        while more and size <= self.DRAIN_FACTOR * self.limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _refuse(self, send: Send, what: str) -> None:
        response = ApiError(413, "request_too_large", f"{what}: the limit is {self.limit} bytes").response()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [*response.raw_headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": response.body})


# --------------------------------------------------------------------------------------------------- app
def create_app(model: Any, config: ServeConfig | None = None, search_db: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a `VirtueModel`, or anything with its `encode`).

    Args:
        model: used through `encode(items, batch_size=..., show_progress_bar=False, ...)` (and, for search,
            `virtue.search.model_fingerprint_of`), always from one thread at a time.
        config: limits and batching; `ServeConfig()` by default.
        search_db: region-search index (`virtue index`) for `POST /search`; without it the endpoint answers 409.
    """
    config = config or ServeConfig()
    db = None if search_db is None else str(search_db)
    upright = upright_photos(model)

    def encode(items: list[Any], **options: Any) -> np.ndarray:
        return np.asarray(
            model.encode(items, batch_size=config.encode_batch_size, show_progress_bar=False, **options)
        )

    fingerprint: list[str] = []  # the model's, computed once: it hashes every weight

    batcher = EmbedBatcher.from_config(encode, config)
    model_config = getattr(model, "config", None)
    dim = getattr(model_config, "hidden_size", None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="VIRTUE embedding service",
        version=_version(),
        description="Embeddings of texts, images and image regions (box / points / mask prompts) with VIRTUE, "
        "and region search over a prebuilt index.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = config
    app.add_middleware(_BodyLimit, limit=config.max_request_bytes)

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def input_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InputError)
        return _input_error(exc).response()

    async def request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc.errors()).response()

    async def busy(request: Request, exc: Exception) -> JSONResponse:
        return busy_error(exc, config).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(InputError, input_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(QueueFullError, busy)
    app.add_exception_handler(BatcherClosedError, busy)

    @app.get("/health", response_model=HealthResponse, summary="liveness, model and queue state")
    async def health() -> HealthResponse:
        return HealthResponse(
            status="ok" if batcher.running else "stopped",
            model=config.model_name,
            dim=dim,
            device=str(getattr(model, "device", "unknown")),
            queue_depth=batcher.queue_depth,
            queued_items=batcher.queued_items,
            queue_size=config.queue_size,
            search=db is not None,
            stats=dataclasses.asdict(batcher.stats),
        )

    @app.post(
        "/embed",
        response_model=EmbedResponse,
        responses=_ERRORS,
        summary="embed texts, images and image regions",
        description="JSON: `{\"inputs\": [item, ...]}`, an item being a string (a text) or an object with "
        "`text`, `image` (base64 PNG/JPEG), `box`, `points` + `labels`, `mask` (base64 PNG). multipart/form-data: "
        "one item, files `image` and `mask`, fields `text`, `box`, `points`, `labels` (JSON strings).",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}},
                    "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
                },
            }
        },
    )
    async def embed(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            raw = await _read_form(request, config)
            _refuse_if_busy(batcher, config)
            inputs = await run_in_threadpool(lambda: [_prepare(raw, 0, config, upright)])
        elif content_type == "application/json" or content_type.endswith("+json"):
            try:
                body = EmbedRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise _validation_error(exc.errors()) from None
            if len(body.inputs) > config.max_batch_size:
                raise ApiError(413, "too_many_inputs", f"inputs: {len(body.inputs)} items; the limit is "
                               f"{config.max_batch_size} per request", field="inputs")
            _refuse_if_busy(batcher, config)
            # Base64 and image decoding take CPU time: off the event loop, which keeps serving other requests.
            inputs = await run_in_threadpool(_prepare_json, body.inputs, config, upright)
        else:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {content_type!r}: send application/json or multipart/form-data")
        rows = await batcher.submit(inputs)
        return JSONResponse({"embeddings": rows.tolist(), "dim": int(rows.shape[1]), "model": config.model_name})

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses={**_ERRORS, 409: {"model": ErrorBody, "description": "no search index configured (--db)"},
                   501: {"model": ErrorBody, "description": "this install has no region-search module"}},
        summary="rank the indexed regions for a query",
    )
    async def search(body: SearchRequest) -> JSONResponse:
        if db is None:
            raise ApiError(409, "no_search_index", "this server has no search index: start it with --db PATH")
        try:
            from virtue.search import (
                IndexMismatchError,
                IndexNotFoundError,
                MissingDependencyError,
                model_fingerprint_of,
                open_index,
                search_vector,
            )
        except ImportError as exc:
            raise ApiError(501, "search_unavailable", f"region search is not available in this install ({exc})") \
                from None
        _refuse_if_busy(batcher, config)
        (query,) = await run_in_threadpool(_prepare_json, [body.query], config, upright, False)
        try:
            # What `virtue.search.search` does, split so that the weights are hashed once per server rather
            # than once per query, and the query is embedded through the shared queue and model thread.
            meta = await run_in_threadpool(lambda: open_index(db).meta)  # re-read: the index may be rebuilt
            if not fingerprint:
                fingerprint.append(await batcher.run_exclusive(model_fingerprint_of, model))
            if fingerprint[0] != meta.fingerprint:
                raise ApiError(409, "index_mismatch", f"{db}: the index was built with model fingerprint "
                               f"{meta.fingerprint}, this server's model is {fingerprint[0]}; re-index with it")
            rows = await batcher.submit([query], image_resize=meta.image_resize)
            hits = await run_in_threadpool(search_vector, db, rows[0], top_k=body.top_k, kind=body.kind)
        except (IndexNotFoundError, IndexMismatchError) as exc:
            raise ApiError(409, "index_mismatch" if isinstance(exc, IndexMismatchError) else "no_search_index",
                           str(exc)) from None
        except MissingDependencyError as exc:
            raise ApiError(501, "search_unavailable", str(exc)) from None
        return JSONResponse({"hits": _jsonable(list(hits)), "model": config.model_name})

    from virtue.apps.openai_api import add_openai_routes  # imported here: it imports this module

    add_openai_routes(app, model, batcher, config)
    _add_component_schemas(app, [EmbedRequest])
    return app


def busy_error(exc: Exception, config: ServeConfig) -> ApiError:
    """A full queue (QueueFullError) or a stopped worker (BatcherClosedError) -> 503 with `Retry-After`."""
    if isinstance(exc, QueueFullError):
        message = f"server busy: {exc}; retry in {config.retry_after_s} s"
    else:
        message = f"server unavailable: {exc}"
    return ApiError(503, "server_busy", message, headers={"Retry-After": str(config.retry_after_s)})


def _refuse_if_busy(batcher: EmbedBatcher, config: ServeConfig) -> None:
    # Checked before decoding images too, so an overloaded server does not spend CPU on requests it refuses.
    if batcher.is_full:
        batcher.stats.rejected += 1
        raise QueueFullError(f"{batcher.queue_depth} requests are already waiting")


def _add_component_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """`/embed` reads its body itself (JSON or multipart), so FastAPI does not know its JSON model; add the
    model to the OpenAPI components that the request body refers to."""
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


def _version() -> str:
    from virtue import __version__

    return __version__
