"""The HTTP service behind `virtue serve`: `POST /embed`, `POST /search`, `GET /health` (FastAPI), and the
OpenAI-compatible `POST /v1/embeddings`, `GET /v1/models` (`virtue.apps.openai_api`).

Needs the `serve` extra (fastapi, uvicorn, python-multipart). Every item of a request is decoded and checked
by the model's processor before it is queued (`virtue.apps.http_inputs`), so bad input gets a 4xx naming the
input (`input 3: box [...] lies outside the 64x48 image`) and never reaches, or fails, another client's batch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from virtue.apps.batching import BatcherClosedError, EmbedBatcher, EncodeFn, QueueFullError, ServeConfig
from virtue.apps.http_errors import (
    ApiError,
    BodyLimit,
    ErrorBody,
    busy_error,
    input_error,
    refuse_if_busy,
    validation_error,
)
from virtue.apps.http_inputs import (
    MULTIPART_SCHEMA,
    EmbedItem,
    ItemOrText,
    add_component_schemas,
    check_items,
    decode_image,
    decode_item,
    decode_items,
    prepare_items,
    read_form,
)
from virtue.apps.openai_api import add_openai_routes
from virtue.errors import InputError, VirtueError
from virtue.inputs import EmbedInput

if TYPE_CHECKING:
    from virtue.search.store import IndexMeta

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


# --------------------------------------------------------------------------------------------------- schemas
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


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "a size limit was exceeded (request, image bytes or pixels, items, text)"},
    415: {"model": ErrorBody, "description": "unsupported Content-Type"},
    422: {"model": ErrorBody, "description": "malformed input; the message names the input and the problem"},
    503: {"model": ErrorBody, "description": "server busy (queue full); retry after `Retry-After` seconds"},
}
_SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    409: {"model": ErrorBody, "description": "no search index configured (--db)"},
    501: {"model": ErrorBody, "description": "this install has no region-search module"},
}
_EMBED_DESCRIPTION = (
    "JSON: `{\"inputs\": [item, ...]}`, an item being a string (a text) or an object with `text`, `image` (base64 "
    "PNG/JPEG), `box`, `points` + `labels`, `mask` (base64 PNG). multipart/form-data: one item, files `image` and "
    "`mask`, fields `text`, `box`, `points`, `labels` (JSON strings)."
)
_EMBED_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}},
            "multipart/form-data": {"schema": MULTIPART_SCHEMA},
        },
    }
}


# --------------------------------------------------------------------------------------------------- app
def create_app(model: Any, config: ServeConfig | None = None, search_db: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a `VirtueModel`, or anything with its `encode`).

    Args:
        model: used through `encode(items, batch_size=..., show_progress_bar=False, ...)` (and, for search,
            `virtue.hashing.model_fingerprint`), always from one thread at a time; its `processor`, when it
            has one, checks and tokenises each request before it is queued (`http_inputs.check_items`).
        config: limits and batching; `ServeConfig()` by default.
        search_db: region-search index (`virtue index`) for `POST /search`; without it the endpoint answers 409.
    """
    config = config or ServeConfig()
    batcher = EmbedBatcher.from_config(_encoder(model, config), config)
    app = FastAPI(
        title="VIRTUE embedding service",
        version=_version(),
        description="Embeddings of texts, images and image regions (box / points / mask prompts) with VIRTUE, "
        "and region search over a prebuilt index.",
        lifespan=_lifespan(batcher),
    )
    app.state.batcher = batcher
    app.state.config = config
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    _add_error_handlers(app, config)
    _add_health_route(app, model, batcher, config, has_search=search_db is not None)
    _add_embed_route(app, model, batcher, config)
    _add_search_route(app, model, batcher, config, None if search_db is None else str(search_db))
    add_openai_routes(app, model, batcher, config)
    add_component_schemas(app, [EmbedRequest])
    return app


def _encoder(model: Any, config: ServeConfig) -> EncodeFn:
    def encode(items: list[Any], **options: Any) -> np.ndarray:
        return np.asarray(
            model.encode(items, batch_size=config.encode_batch_size, show_progress_bar=False, **options)
        )

    return encode


def _lifespan(batcher: EmbedBatcher) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return lifespan


def _add_error_handlers(app: FastAPI, config: ServeConfig) -> None:
    """Refusals answer in the `ErrorBody` shape (the /v1 routes answer in OpenAI's, before these run)."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def model_input_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InputError)
        return input_error(exc).response()

    async def request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc.errors()).response()

    async def busy(request: Request, exc: Exception) -> JSONResponse:
        return busy_error(exc, config).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(InputError, model_input_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(QueueFullError, busy)
    app.add_exception_handler(BatcherClosedError, busy)


def _add_health_route(app: FastAPI, model: Any, batcher: EmbedBatcher, config: ServeConfig, has_search: bool) -> None:
    dim = getattr(getattr(model, "config", None), "hidden_size", None)

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
            search=has_search,
            stats=dataclasses.asdict(batcher.stats),
        )


def _add_embed_route(app: FastAPI, model: Any, batcher: EmbedBatcher, config: ServeConfig) -> None:
    @app.post("/embed", response_model=EmbedResponse, responses=_ERRORS, summary="embed texts, images and image "
              "regions", description=_EMBED_DESCRIPTION, openapi_extra=_EMBED_BODY)
    async def embed(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            raw = await read_form(request, config)
            refuse_if_busy(batcher, config)
            inputs = await run_in_threadpool(lambda: check_items(model, [decode_item(raw, 0, config)]))
        elif content_type == "application/json" or content_type.endswith("+json"):
            body = _embed_request(await request.body(), config)
            refuse_if_busy(batcher, config)
            # Base64, image decoding and tokenising take CPU time: off the event loop, which keeps serving.
            inputs = await run_in_threadpool(prepare_items, body.inputs, config, model)
        else:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {content_type!r}: send application/json or multipart/form-data")
        rows = await batcher.submit(inputs)
        return JSONResponse({"embeddings": rows.tolist(), "dim": int(rows.shape[1]), "model": config.model_name})


def _embed_request(body: bytes, config: ServeConfig) -> EmbedRequest:
    try:
        request = EmbedRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    if len(request.inputs) > config.max_batch_size:
        raise ApiError(413, "too_many_inputs", f"inputs: {len(request.inputs)} items; the limit is "
                       f"{config.max_batch_size} per request", field="inputs")
    return request


def _add_search_route(app: FastAPI, model: Any, batcher: EmbedBatcher, config: ServeConfig, db: str | None) -> None:
    fingerprint: list[str] = []  # the model's, computed once: it hashes every weight

    @app.post("/search", response_model=SearchResponse, responses=_SEARCH_ERRORS,
              summary="rank the indexed regions for a query")
    async def search(body: SearchRequest) -> JSONResponse:
        if db is None:
            raise ApiError(409, "no_search_index", "this server has no search index: start it with --db PATH")
        try:
            from virtue.hashing import model_fingerprint
            from virtue.search.index import search_vector
            from virtue.search.store import IndexMismatchError, IndexNotFoundError, MissingDependencyError
        except ImportError as exc:
            raise ApiError(501, "search_unavailable", f"region search is not available in this install ({exc})") \
                from None
        refuse_if_busy(batcher, config)
        try:
            # What `virtue.search.search` does, split so that the weights are hashed once per server rather
            # than once per query, and the query is embedded through the shared queue and model thread.
            query, meta = await run_in_threadpool(_search_query, body.query, config, model, db)
            if not fingerprint:
                fingerprint.append(await batcher.run_exclusive(model_fingerprint, model))
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


def _search_query(query: EmbedItem | str, config: ServeConfig, model: Any, db: str) -> tuple[EmbedInput, IndexMeta]:
    """The query decoded, and checked for the pre-resize it is embedded with: the index's (re-read, as the index
    may be rebuilt). A bad query is refused before a missing or unreadable index, as the check comes first."""
    from virtue.search.index import open_index

    items = decode_items([query], config, indexed=False)
    try:
        meta = open_index(db).meta
    except VirtueError:
        check_items(model, items, indexed=False)
        raise
    return check_items(model, items, indexed=False, image_resize=meta.image_resize)[0], meta


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


def _version() -> str:
    # The installed distribution's version (what `virtue.__version__` says): this module must not import the
    # top-level package.
    try:
        return importlib.metadata.version("virtue")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
