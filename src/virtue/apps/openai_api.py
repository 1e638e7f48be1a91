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
  SAM2 branch for every image input (`VirtueProcessor.sequence_length`). They are the token ids of the
  request's check by the model's processor, which `encode` then reuses: each input is tokenised once. 0 for a
  model without a processor.
* The limits, validation and batching queue are those of `POST /embed` (the same code): 413 for too many
  items, oversized bodies, images or texts, 422 for malformed input (the message names the input, `param` the
  field, e.g. `input[1].box`), 503 with `Retry-After` when the queue is full. Every error under `/v1`, also
  404/405 and the body-size check, is answered in OpenAI's shape:
  `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from virtue.apps.batching import EmbedBatcher, ServeConfig
from virtue.apps.http_errors import refuse_if_busy, validation_error
from virtue.apps.http_inputs import EmbedItem, add_component_schemas, prepare_items
from virtue.apps.openai_errors import (
    OpenAIError,
    OpenAIErrorBody,
    OpenAIErrorResponse,
    OpenAIErrorShape,
    body_error,
    openai_route_class,
)
from virtue.inputs import EmbedInput

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
    "Usage",
    "add_openai_routes",
    "prompt_tokens",
]


PREFIX = "/v1"
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


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": OpenAIErrorResponse, "description": "unknown model name (`model_not_found`) or route"},
    413: {"model": OpenAIErrorResponse, "description": "a size limit was exceeded (body, image, items, text)"},
    422: {"model": OpenAIErrorResponse, "description": "malformed input; the message names the input"},
    503: {"model": OpenAIErrorResponse, "description": "server busy (queue full); retry after `Retry-After` s"},
}


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
                raise validation_error(exc.errors(), ("inputs", i)) from None
        elif _is_token_id(v) or _is_token_ids(v):
            raise OpenAIError(422, f"input {i}: {TOKEN_IDS_REFUSED}", param=f"input[{i}]",
                              code="token_ids_not_supported")
        else:
            raise OpenAIError(422, f"input {i}: expected a string or an object (image, text, box, points, labels, "
                              f"mask), got {_json_type(v)}", param=f"input[{i}]", code="invalid_input")
    return items


# --------------------------------------------------------------------------------------------------- usage
def prompt_tokens(model: Any, checked: Sequence[EmbedInput]) -> int:
    """Tokens the language model reads for these checked inputs (`http_inputs.check_items`): their token ids
    plus the SAM2 branch's segmentation tokens of each image input; 0 for a model without a processor."""
    processor = getattr(model, "processor", None)
    if processor is None or not hasattr(processor, "sequence_length"):
        return 0
    return sum(processor.sequence_length(item) for item in checked)


# --------------------------------------------------------------------------------------------------- routes
def _encoded(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.tolist()


def add_openai_routes(app: FastAPI, model: Any, batcher: EmbedBatcher, config: ServeConfig) -> None:
    """Mount the /v1 routes on the app of `create_app`, sharing its queue, limits and input checks."""
    router = APIRouter(prefix=PREFIX, tags=["OpenAI-compatible"], route_class=openai_route_class(config))
    _add_embeddings_route(router, model, batcher, config)
    _add_model_routes(router, ModelCard(id=config.model_name, created=int(time.time()), owned_by="virtue"))
    app.include_router(router)
    app.add_middleware(OpenAIErrorShape, prefix=PREFIX)
    add_component_schemas(app, [EmbeddingsRequest])


def _check_model(requested: str, served: str, param: str | None) -> None:
    if requested != served:
        raise OpenAIError(404, f"The model `{requested}` does not exist: this server serves `{served}` "
                          f"(GET {PREFIX}/models)", param=param, code="model_not_found")


def _check_dimensions(served: str, requested: int | None, actual: int | None) -> None:
    if requested is not None and actual is not None and requested != actual:
        raise OpenAIError(422, f"dimensions: {served} embeds in {actual} dimensions; {requested} cannot be "
                          "served (the embeddings are not trained to be shortened)", param="dimensions",
                          code="invalid_dimensions")


_EMBEDDINGS_DESCRIPTION = (
    "OpenAI's embeddings request and response. `input`: a string or a list of strings and objects "
    "`{\"image\": \"data:image/png;base64,...\", \"text\", \"box\", \"points\", \"labels\", \"mask\"}` (images and "
    "visual prompts, as the items of `POST /embed`). Token ids are refused. `model` must be the served name; "
    "`dimensions` only the model's size."
)
_EMBEDDINGS_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}}}}


def _add_embeddings_route(router: APIRouter, model: Any, batcher: EmbedBatcher, config: ServeConfig) -> None:
    name = config.model_name
    dim = getattr(getattr(model, "config", None), "hidden_size", None)

    @router.post("/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS,
                 summary="OpenAI-compatible embeddings (texts, images, image regions)",
                 description=_EMBEDDINGS_DESCRIPTION, openapi_extra=_EMBEDDINGS_BODY)
    async def embeddings(request: Request) -> JSONResponse:
        try:
            body = EmbeddingsRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise body_error(exc.errors()) from None
        _check_model(body.model, name, "model")
        _check_dimensions(name, body.dimensions, dim)
        items = parse_openai_input(body.input, config)
        refuse_if_busy(batcher, config)
        # Base64, image decoding and tokenising (the checks of POST /embed) take CPU time: off the event loop.
        inputs = await run_in_threadpool(prepare_items, items, config, model)
        rows = await batcher.submit(inputs)
        _check_dimensions(name, body.dimensions, int(rows.shape[1]))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(row, body.encoding_format)}
                for i, row in enumerate(rows)]
        total = prompt_tokens(model, inputs)
        return JSONResponse({"object": "list", "data": data, "model": name,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})


def _add_model_routes(router: APIRouter, card: ModelCard) -> None:
    @router.get("/models", response_model=ModelList, responses={404: _ERRORS[404]}, summary="the served model")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: _ERRORS[404]},
                summary="the served model, by name")
    async def model_card(model_id: str) -> ModelCard:
        _check_model(model_id, card.id, None)
        return card
