"""Errors of the OpenAI-compatible routes in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
what a /v1 endpoint raised (`OpenAIError`, the service's `ApiError` and input errors, a full queue, a bug) and,
through `OpenAIErrorShape`, the error answers under /v1 that no endpoint wrote (the body-size limit, unknown
routes, wrong methods).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from virtue.apps.batching import BatcherClosedError, QueueFullError, ServeConfig
from virtue.apps.http_errors import ApiError, busy_error, input_error
from virtue.errors import InputError

__all__ = [
    "REQUEST_FIELDS",
    "OpenAIError",
    "OpenAIErrorBody",
    "OpenAIErrorResponse",
    "OpenAIErrorShape",
    "body_error",
    "error_type",
    "from_api_error",
    "openai_route_class",
    "param_of",
    "to_openai_error",
]

logger = logging.getLogger(__name__)

# The parameters of OpenAI's embeddings request (an unknown one is named with these).
REQUEST_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")


class OpenAIErrorBody(BaseModel):
    message: str = Field(..., examples=["input 1: box [10, 10, 100, 30] lies outside the 60x40 image"])
    type: str = Field(..., examples=["invalid_request_error"])
    param: str | None = Field(None, examples=["input[1]"])
    code: str | None = Field(None, examples=["invalid_prompt"])


class OpenAIErrorResponse(BaseModel):
    """Every error under /v1, in OpenAI's shape."""

    error: OpenAIErrorBody


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


def param_of(index: int | None, field: str | None) -> str | None:
    """`input[3].box` for a field of an item, `input[3]` for the item, the field alone for the request."""
    if index is not None:
        return f"input[{index}]" + (f".{field}" if field else "")
    return "input" if field == "inputs" else field


def from_api_error(exc: ApiError) -> OpenAIError:
    return OpenAIError(exc.status, exc.message, param=param_of(exc.index, exc.field), code=exc.code,
                       headers=exc.headers)


def body_error(errors: Sequence[Any]) -> OpenAIError:
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
        return from_api_error(exc)
    if isinstance(exc, InputError):  # also what the model raised for one request's item
        return from_api_error(input_error(exc))
    if isinstance(exc, RequestValidationError):
        return body_error(exc.errors())
    if isinstance(exc, (QueueFullError, BatcherClosedError)):
        return from_api_error(busy_error(exc, config))
    logger.error("/v1 request failed", exc_info=exc)
    return OpenAIError(500, f"internal error ({type(exc).__name__}); see the server's log", code="internal_error")


def openai_route_class(config: ServeConfig) -> type[APIRoute]:
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


class OpenAIErrorShape:
    """ASGI middleware: error answers under /v1 that no /v1 endpoint wrote (the body-size limit, unknown routes,
    wrong methods) are rewritten into OpenAI's shape; answers already in that shape pass untouched."""

    def __init__(self, app: ASGIApp, prefix: str):
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
            shaped = _shape_error(start["status"], body, scope.get("method", ""), path, self.prefix)
            if shaped is not None:
                body = shaped
                drop = (b"content-length", b"content-type")
                headers = [(k, v) for k, v in headers if k.lower() not in drop]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_shaped)


def _shape_error(status: int, body: bytes, method: str, path: str, prefix: str) -> bytes | None:
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
        param = param_of(data.get("input"), data.get("field"))
    elif isinstance(data, dict) and "detail" in data:  # Starlette's HTTPException
        message = f"{method} {path}: {data['detail']}"
        if status in (404, 405):
            code = "not_found" if status == 404 else "method_not_allowed"
            message += f"; the OpenAI-compatible routes are POST {prefix}/embeddings and GET {prefix}/models"
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    error = OpenAIError(status, message, param=param, code=code)
    return json.dumps(error.body()).encode()
