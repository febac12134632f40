"""OpenAI-style errors, API keys and the in-flight request limit.

Every error the server answers has OpenAI's body: {"error": {"message", "type", "param", "code"}}.
FastAPI's own 422 validation answer becomes a 400 with that body.
"""
from __future__ import annotations

import hmac
import logging
from typing import Iterable, List, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("tidemind")

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 429: "rate_limit_exceeded"}


class OpenAIError(Exception):
    """An error answered to the client as is (status and OpenAI body)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# What a field with several accepted forms takes, for one readable message instead of one per form.
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids (non-empty)",
    "stop": "a non-empty string or a list of non-empty strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts (text only)",
    "input": "a string or a non-empty list of strings",
}


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int") or part.startswith(("list[", "constrained-", "function-")))


def _path(loc: Sequence) -> list:
    return list(loc[1:]) if loc and loc[0] == "body" else list(loc)


def _describe(error: dict) -> str:
    kind, loc = error.get("type"), error.get("loc", ())
    path = _path(loc)
    where = ".".join(str(p) for p in path)
    for i, part in enumerate(path):
        if _is_union_tag(part) and i > 0 and path[i - 1] in _UNION_FIELDS:
            return f"{'.'.join(str(p) for p in path[:i])}: must be {_UNION_FIELDS[path[i - 1]]}"
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        position = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the request body is not valid JSON ({reason}{position}): send a JSON object"
    if not path and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    if kind == "extra_forbidden":
        return f"unknown field '{where}': remove it (GET /openapi.json lists the accepted fields)"
    if kind == "missing":
        return f"field '{where}' is required" if where else "the request needs a JSON object body"
    message = error.get("msg", "invalid value")
    if kind == "value_error":  # our validators' own messages, without pydantic's prefix
        message = message.removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors: List[dict] = list(exc.errors())
    if not errors:
        return OpenAIError(400, "invalid request")
    messages: List[str] = []
    for error in errors:
        text = _describe(error)
        if text not in messages:
            messages.append(text)
    # One error per accepted form of a field can make a long list: the first few say enough.
    message = "; ".join(messages[:3]) + (f" (and {len(messages) - 3} more)" if len(messages) > 3 else "")
    loc = errors[0].get("loc", ())
    param = str(loc[1]) if len(loc) > 1 and loc[0] == "body" and errors[0].get("type") != "json_invalid" else None
    return OpenAIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /openapi.json for the endpoints"
        return OpenAIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("internal error answering %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal server error: {exc!r}; the server log has the traceback").response()


class ApiKeyMiddleware:
    """Refuses /v1/* requests without `Authorization: Bearer KEY` (KEY one of the keys) with 401.

    /health, /metrics and the API docs stay open. Pure ASGI, so streaming is untouched."""

    def __init__(self, app, api_keys: Iterable[str], prefix: str = "/v1/"):
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        auth = headers.get(b"authorization", b"")
        scheme, _, key = auth.partition(b" ")
        key = key.strip()
        # compare_digest against every key: the time taken does not tell which prefix matched
        ok = scheme.lower() == b"bearer" and any([hmac.compare_digest(key, k) for k in self.api_keys])
        if ok:
            return await self.app(scope, receive, send)
        message = ("wrong API key: send one of the server's --api-keys as 'Authorization: Bearer KEY'" if auth
                   else "missing API key: send 'Authorization: Bearer KEY' with one of the server's --api-keys")
        response = OpenAIError(401, message, code="invalid_api_key").response()
        await response(scope, receive, send)


class ConcurrencyLimit:
    """Counts generation HTTP requests in flight; over the limit, a new one is refused at once (429).

    Only the event loop's thread touches the counter."""

    def __init__(self, limit: Optional[int], on_reject=None):
        self.limit = limit
        self.in_flight = 0
        self._on_reject = on_reject

    def acquire(self) -> "Slot":
        if self.limit is not None and self.in_flight >= self.limit:
            if self._on_reject is not None:
                self._on_reject()
            raise OpenAIError(429, f"the server is answering {self.in_flight} requests, its limit "
                                   f"(--max-concurrent-requests {self.limit}): retry later",
                              code="rate_limit_exceeded")
        self.in_flight += 1
        return Slot(self)


class Slot:
    __slots__ = ("_limit",)

    def __init__(self, limit: ConcurrencyLimit):
        self._limit: Optional[ConcurrencyLimit] = limit

    def release(self) -> None:
        """Idempotent: the stream's close and the handler's error path may both call it."""
        if self._limit is not None:
            self._limit.in_flight -= 1
            self._limit = None
