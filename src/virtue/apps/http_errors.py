"""How the HTTP service refuses a request: `ApiError` and its JSON body (`ErrorBody`), the mapping of pydantic
errors and `InputError`s onto it, the busy answer (503), and the body-size limit (413), shared by `POST /embed`,
`POST /search` and the OpenAI-compatible routes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from virtue.apps.batching import EmbedBatcher, QueueFullError, ServeConfig
from virtue.errors import InputError

__all__ = [
    "ApiError",
    "BodyLimit",
    "ErrorBody",
    "busy_error",
    "input_error",
    "input_name",
    "refuse_if_busy",
    "validation_error",
]

# The first input an error names: "input 3: ..." or "2 bad inputs: input 0: ...; input 2: ...".
_INPUT_INDEX = re.compile(r"^(?:\d+ bad inputs: )?input (\d+):")
_CODES = {"ImageError": "invalid_image", "PromptError": "invalid_prompt"}


class ErrorBody(BaseModel):
    """Every error answer: a code, a message naming the input, and (where known) the input and field."""

    error: str = Field(..., examples=["invalid_image"])
    detail: str = Field(..., examples=["input 1: image: not a PNG or JPEG image"])
    input: int | None = None
    field: str | None = None


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


def input_name(index: int | None) -> str:
    """How messages name an item: "input 3", or "query" for the one item of `POST /search`."""
    return "query" if index is None else f"input {index}"


def validation_error(errors: Sequence[Any], prefix: Sequence[str | int] = ()) -> ApiError:
    """pydantic errors -> one 422 whose message names the input and field. The rejected values are not
    echoed (FastAPI's default does): they may be megabytes of base64."""
    parts: list[str] = []
    first: tuple[int | None, str | None] = (None, None)  # the first error that names an input or a field
    for err in errors:
        index, where, field = _located([*prefix, *err.get("loc", ())])
        if first == (None, None):
            first = (index, field)
        parts.append(f"{where}: {field}: {err.get('msg')}" if field else f"{where}: {err.get('msg')}")
    if len(parts) > 5:
        parts = [*parts[:5], f"... and {len(parts) - 5} more"]
    index, field = first
    return ApiError(422, "invalid_request", "; ".join(parts), index=index, field=field)


def _located(loc: list[Any]) -> tuple[int | None, str, str | None]:
    """A pydantic error location -> (item index, how the message names it, the field inside it)."""
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
    return index, where, ".".join(str(p) for p in rest) or None


def input_error(exc: InputError) -> ApiError:
    """An input the model's checks refused -> 422 with the code of its kind, naming the (first) input when one is."""
    match = _INPUT_INDEX.match(str(exc))
    code = _CODES.get(type(exc).__name__, "invalid_input")
    return ApiError(422, code, str(exc), index=int(match.group(1)) if match else None)


def busy_error(exc: Exception, config: ServeConfig) -> ApiError:
    """A full queue (QueueFullError) or a stopped worker (BatcherClosedError) -> 503 with `Retry-After`."""
    if isinstance(exc, QueueFullError):
        message = f"server busy: {exc}; retry in {config.retry_after_s} s"
    else:
        message = f"server unavailable: {exc}"
    return ApiError(503, "server_busy", message, headers={"Retry-After": str(config.retry_after_s)})


def refuse_if_busy(batcher: EmbedBatcher, config: ServeConfig) -> None:
    """QueueFullError (-> 503) when the queue is full. Called before decoding images too, so an overloaded
    server does not spend CPU on requests it refuses."""
    if batcher.is_full:
        batcher.stats.rejected += 1
        raise QueueFullError(f"{batcher.queue_depth} requests are already waiting")


class BodyLimit:
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
