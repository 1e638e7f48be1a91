"""OpenAI-compatible embeddings on `virtue serve`: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`.

The request and response follow OpenAI's embeddings API, so the official clients work with `base_url` pointed
here:

    {"input": "a dog" | ["a dog", {"image": "data:image/png;base64,...", "box": [x1, y1, x2, y2]}, ...],
     "model": "<the served name>", "encoding_format": "float" | "base64", "dimensions": D, "user": "..."}
    -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "<base64>"}],
        "model": "<the served name>", "usage": {"prompt_tokens": n, "total_tokens": n}}

* Texts are strings, as usual. Images and visual prompts are objects inside `input` (not in OpenAI's API): the
  items of `POST /embed`, `{"image": <data: URL or base64 PNG/JPEG>, "text", "box", "points", "labels",
  "mask"}`. Token-id inputs (a list of ints, or of lists of ints) are refused with a message saying to send
  the text: ids of another tokenizer cannot be embedded faithfully.
* `model` must be the served name (`virtue serve --name`, by default `--model`); another name answers 404
  `model_not_found`, as OpenAI does, rather than silently embedding with a different model than asked for.
* `dimensions` is accepted only when equal to the model's size (no truncated embeddings); `user` is ignored.
* `base64` is the row's little-endian float32 bytes, base64-encoded (what the official clients ask for by
  default and decode themselves); `float` (the default of a raw request) a JSON list.
* `usage.prompt_tokens` (= `total_tokens`) counts what the language model reads for each input: the tokens
  of its text as the model formats it (the image placeholder and the default instruction of an image
  included) with the placeholder expanded to the image's visual tokens, plus the segmentation tokens of the
  SAM2 branch for every image input. Counted with a private copy of the model's tokenizer, off the model's
  thread; 0 for a model without a tokenizer.
* The limits, validation and batching queue are those of `POST /embed` (the same code): 413 for too many
  items, oversized bodies, images or texts, 422 for malformed input (the message names the input, `param` the
  field, e.g. `input[1].box`), 503 with `Retry-After` when the queue is full. Every error under `/v1`, also
  404/405 and the body-size check, is answered in OpenAI's shape:
  `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from virtue.apps.batching import BatcherClosedError, EmbedBatcher, QueueFullError, ServeConfig
from virtue.apps.server import (
    ApiError,
    EmbedItem,
    _add_component_schemas,
    _input_error,
    _prepare_json,
    _refuse_if_busy,
    _validation_error,
    busy_error,
    upright_photos,
)
from virtue.errors import ImageError, InputError
from virtue.inputs import EmbedInput
from virtue.processing.batch import VirtueProcessor
from virtue.processing.images import header_size

__all__ = [
    "PREFIX",
    "EmbeddingData",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorBody",
    "OpenAIErrorResponse",
    "TokenCounter",
    "Usage",
    "add_openai_routes",
]

logger = logging.getLogger(__name__)

PREFIX = "/v1"
REQUEST_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
TOKEN_IDS_REFUSED = (
    "token ids are not accepted: they would be ids of another tokenizer than this model's. Send the text itself, "
    "`input` as a string or a list of strings (LangChain's OpenAIEmbeddings sends token ids unless "
    "check_embedding_ctx_length=False)"
)

# --------------------------------------------------------------------------------------------------- schemas
_INPUT_SCHEMA: dict[str, Any] = {
    "description": "a string, or a list of up to `--max-batch-size` items, each a string (a text) or an object "
    "with `image` (data: URL or base64 PNG/JPEG), `text`, `box`, `points` + `labels`, `mask` (an image or an "
    "image region; not in OpenAI's API). Token ids are refused.",
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1,
         "items": {"anyOf": [{"type": "string"}, EmbedItem.model_json_schema()]}},
    ],
    "examples": [
        "a dog on a sofa",
        ["a dog on a sofa", {"image": "data:image/png;base64,iVBORw0KGgo...", "box": [120, 40, 380, 300],
                             "text": "Find the caption that best describes the segmented object."}],
    ],
}


class EmbeddingsRequest(BaseModel):
    """`POST /v1/embeddings` body: OpenAI's embeddings request; `input` may also hold image objects."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"input": ["a dog on a sofa", "a red car"], "model": "virtue"}]},
    )

    input: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)] = Field(...)
    model: str = Field(..., description="the served model's name (GET /v1/models); another name answers 404")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a JSON list; base64: the little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(None, description="accepted only when equal to the model's embedding size")
    user: str | None = Field(None, description="ignored")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(..., description="L2-normalised; base64 of float32 LE if asked for")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="tokens the language model read (text, visual and SAM tokens)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str = Field(..., examples=["input 1: box [10, 10, 100, 30] lies outside the 60x40 image"])
    type: str = Field(..., examples=["invalid_request_error"])
    param: str | None = Field(None, examples=["input[1]"])
    code: str | None = Field(None, examples=["invalid_prompt"])


class OpenAIErrorResponse(BaseModel):
    """Every error under /v1, in OpenAI's shape."""

    error: OpenAIErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": OpenAIErrorResponse, "description": "unknown model name (`model_not_found`) or route"},
    413: {"model": OpenAIErrorResponse, "description": "a size limit was exceeded (body, image, items, text)"},
    422: {"model": OpenAIErrorResponse, "description": "malformed input; the message names the input"},
    503: {"model": OpenAIErrorResponse, "description": "server busy (queue full); retry after `Retry-After` s"},
}


# --------------------------------------------------------------------------------------------------- errors
def error_type(status: int) -> str:
    """OpenAI's `type` for a status code."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """A refused /v1 request, answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(index: int | None, field: str | None) -> str | None:
    """`input[3].box` for a field of an item, `input[3]` for the item, the field alone for the request."""
    if index is not None:
        return f"input[{index}]" + (f".{field}" if field else "")
    return "input" if field == "inputs" else field


def _from_api_error(exc: ApiError) -> OpenAIError:
    return OpenAIError(exc.status, exc.message, param=_param(exc.index, exc.field), code=exc.code,
                       headers=exc.headers)


def _body_error(errors: Sequence[Any]) -> OpenAIError:
    """pydantic errors of the request body -> one 422 naming the parameter(s), without echoing the values."""
    parts: list[str] = []
    first: str | None = None
    code = "invalid_request"
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        param = ".".join(str(p) for p in loc) or None
        first = first or param
        if err.get("type") == "json_invalid":
            code = "invalid_json"
            parts.append(f"request body: invalid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"{param}: unknown parameter; accepted: {', '.join(REQUEST_FIELDS)}")
        else:
            parts.append(f"{param or 'request body'}: {err.get('msg')}")
    if len(parts) > 5:
        parts = [*parts[:5], f"... and {len(parts) - 5} more"]
    return OpenAIError(422, "; ".join(parts), param=first, code=code)


def to_openai_error(exc: Exception, config: ServeConfig) -> OpenAIError:
    """Whatever a /v1 route raised -> the OpenAI-shaped answer (a bug: 500, logged)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ApiError):
        return _from_api_error(exc)
    if isinstance(exc, InputError):  # also what the model raised for one request's item
        return _from_api_error(_input_error(exc))
    if isinstance(exc, RequestValidationError):
        return _body_error(exc.errors())
    if isinstance(exc, (QueueFullError, BatcherClosedError)):
        return _from_api_error(busy_error(exc, config))
    logger.error("/v1 request failed", exc_info=exc)
    return OpenAIError(500, f"internal error ({type(exc).__name__}); see the server's log", code="internal_error")


def _openai_route_class(config: ServeConfig) -> type[APIRoute]:
    class OpenAIRoute(APIRoute):
        """Answers every exception of its endpoint in OpenAI's error shape (before the app's handlers)."""

        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    return to_openai_error(exc, config).response()

            return route

    return OpenAIRoute


class _OpenAIErrorShape:
    """ASGI middleware: error answers under /v1 that no /v1 endpoint wrote (the body-size limit, unknown routes,
    wrong methods) are rewritten into OpenAI's shape; answers already in that shape pass untouched."""

    def __init__(self, app: ASGIApp, prefix: str = PREFIX):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_shaped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            headers = list(start.get("headers", []))
            shaped = _shape_error(start["status"], body, scope.get("method", ""), path)
            if shaped is not None:
                body = shaped
                drop = (b"content-length", b"content-type")
                headers = [(k, v) for k, v in headers if k.lower() not in drop]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_shaped)


def _shape_error(status: int, body: bytes, method: str, path: str) -> bytes | None:
    """An error body -> OpenAI's shape, or None when it is in that shape already."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return None
    param = code = None
    if isinstance(data, dict) and isinstance(data.get("error"), str) and "detail" in data:  # the server's ErrorBody
        message, code = str(data["detail"]), data["error"]
        param = _param(data.get("input"), data.get("field"))
    elif isinstance(data, dict) and "detail" in data:  # Starlette's HTTPException
        message = f"{method} {path}: {data['detail']}"
        if status in (404, 405):
            code = "not_found" if status == 404 else "method_not_allowed"
            message += f"; the OpenAI-compatible routes are POST {PREFIX}/embeddings and GET {PREFIX}/models"
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    error = OpenAIError(status, message, param=param, code=code)
    return json.dumps(error.body()).encode()


# --------------------------------------------------------------------------------------------------- input
def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_token_id(t) for t in value)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", type(None): "null", list: "a list",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)


def parse_openai_input(value: Any, config: ServeConfig) -> list[EmbedItem | str]:
    """`input` -> the items of `POST /embed` (strings and `EmbedItem`s), checking their number first."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # one object, for symmetry with one string
        value = [value]
    if not isinstance(value, list):
        raise OpenAIError(422, f"input: expected a string or a list of strings and objects, got {_json_type(value)}",
                          param="input", code="invalid_input")
    if not value:
        raise OpenAIError(422, "input: the list is empty", param="input", code="invalid_input")
    if all(_is_token_id(v) for v in value) or all(_is_token_ids(v) for v in value):
        raise OpenAIError(422, f"input: {TOKEN_IDS_REFUSED}", param="input", code="token_ids_not_supported")
    if len(value) > config.max_batch_size:
        raise OpenAIError(413, f"input: {len(value)} items; the limit is {config.max_batch_size} per request",
                          param="input", code="too_many_inputs")
    items: list[EmbedItem | str] = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            items.append(v)
        elif isinstance(v, dict):
            try:
                items.append(EmbedItem.model_validate(v))
            except ValidationError as exc:
                raise _validation_error(exc.errors(), ("inputs", i)) from None
        elif _is_token_id(v) or _is_token_ids(v):
            raise OpenAIError(422, f"input {i}: {TOKEN_IDS_REFUSED}", param=f"input[{i}]",
                              code="token_ids_not_supported")
        else:
            raise OpenAIError(422, f"input {i}: expected a string or an object (image, text, box, points, labels, "
                              f"mask), got {_json_type(v)}", param=f"input[{i}]", code="invalid_input")
    return items


# --------------------------------------------------------------------------------------------------- usage
class TokenCounter:
    """Tokens the language model reads for each input, as `VirtueModel` builds its rows: the row's token ids
    (`VirtueProcessor.row_ids`: formatted text, the image placeholder expanded to the image's visual tokens, from
    its size as displayed) plus the SAM2 branch's segmentation tokens for an image input. Counted with a private
    processor over a copy of the model's tokenizer (made on first use), never shared with the model's thread.
    """

    def __init__(self, model: Any):
        self._model = model
        self._source = getattr(getattr(model, "processor", None), "tokenizer", None)
        sam = getattr(getattr(model, "config", None), "sam", None)
        has_sam = getattr(model, "sam", None) is not None and bool(getattr(sam, "enabled", False))
        self._segmentation_tokens = int(sam.num_tokens) if has_sam else 0
        self._processor: Any = None
        self._lock = threading.Lock()

    def count(self, items: Sequence[EmbedInput]) -> list[int]:
        """Token counts of validated items (images decoded); raises `InputError` naming the input for an image
        the model cannot resize (aspect ratio) or a row longer than the model reads."""
        if self._source is None:
            return [0] * len(items)
        with self._lock:
            if self._processor is None:
                self._processor = VirtueProcessor(self._model.config, copy.deepcopy(self._source))
            counts = []
            for i, item in enumerate(items):
                where = f"input {i}"
                visual = self._visual_tokens(item, where) if item.has_image else None
                extra = self._segmentation_tokens if item.has_image else 0
                counts.append(len(self._processor.row_ids(item, where, visual)) + extra)
        return counts

    def _visual_tokens(self, item: EmbedInput, where: str) -> int:
        size = header_size(item.image, where, self._processor.exif_transpose(item))
        try:
            return self._model.visual_tokens_for_size(size)
        except ImageError as exc:
            raise ImageError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------------- routes
def _encoded(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.tolist()


def add_openai_routes(app: FastAPI, model: Any, batcher: EmbedBatcher, config: ServeConfig) -> None:
    """Mount the /v1 routes on the app of `create_app`, sharing its queue, limits and input checks."""
    name = config.model_name
    dim = getattr(getattr(model, "config", None), "hidden_size", None)
    created = int(time.time())
    counter = TokenCounter(model)
    upright = upright_photos(model)
    router = APIRouter(prefix=PREFIX, tags=["OpenAI-compatible"], route_class=_openai_route_class(config))

    def check_model(requested: str, param: str | None) -> None:
        if requested != name:
            raise OpenAIError(404, f"The model `{requested}` does not exist: this server serves `{name}` "
                              f"(GET {PREFIX}/models)", param=param, code="model_not_found")

    def check_dimensions(requested: int | None, actual: int | None) -> None:
        if requested is not None and actual is not None and requested != actual:
            raise OpenAIError(422, f"dimensions: {name} embeds in {actual} dimensions; {requested} cannot be "
                              "served (the embeddings are not trained to be shortened)", param="dimensions",
                              code="invalid_dimensions")

    def prepare(items: list[EmbedItem | str]) -> tuple[list[EmbedInput], list[int]]:
        inputs = _prepare_json(items, config, upright)  # decoding and every check of POST /embed
        return inputs, counter.count(inputs)

    @router.post(
        "/embeddings",
        response_model=EmbeddingsResponse,
        responses=_ERRORS,
        summary="OpenAI-compatible embeddings (texts, images, image regions)",
        description="OpenAI's embeddings request and response. `input`: a string or a list of strings and "
        "objects `{\"image\": \"data:image/png;base64,...\", \"text\", \"box\", \"points\", \"labels\", \"mask\"}`"
        " (images and visual prompts, as the items of `POST /embed`). Token ids are refused. `model` must be "
        "the served name; `dimensions` only the model's size.",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}}}},
    )
    async def embeddings(request: Request) -> JSONResponse:
        try:
            body = EmbeddingsRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _body_error(exc.errors()) from None
        check_model(body.model, "model")
        check_dimensions(body.dimensions, dim)
        items = parse_openai_input(body.input, config)
        _refuse_if_busy(batcher, config)
        # Base64, image decoding and tokenising take CPU time: off the event loop.
        inputs, tokens = await run_in_threadpool(prepare, items)
        rows = await batcher.submit(inputs)
        check_dimensions(body.dimensions, int(rows.shape[1]))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(row, body.encoding_format)}
                for i, row in enumerate(rows)]
        total = sum(tokens)
        return JSONResponse({"object": "list", "data": data, "model": name,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})

    card = ModelCard(id=name, created=created, owned_by="virtue")

    @router.get("/models", response_model=ModelList, responses={404: _ERRORS[404]}, summary="the served model")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: _ERRORS[404]},
                summary="the served model, by name")
    async def model_card(model_id: str) -> ModelCard:
        check_model(model_id, None)
        return card

    app.include_router(router)
    app.add_middleware(_OpenAIErrorShape, prefix=PREFIX)
    _add_component_schemas(app, [EmbeddingsRequest])
