"""OpenAI-style errors, request ids, API keys and the in-flight request limit.

Every error the server answers has OpenAI's body: {"error": {"message", "type", "param", "code"}}.
FastAPI's own 422 validation answer becomes a 400 with that body. A 5xx body never carries the
internal exception's text: it says "internal server error" with the request's id (also in the
`x-request-id` header of every response), and the details go to the server log under that id.
"""
from __future__ import annotations

import hmac
import logging
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("tidemind")

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded"}
REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a slot frees as soon as one answer ends
LIMITS_HINT = "this server's limit; GET /v1/models lists the limits under tidemind.limits"


class OpenAIError(Exception):
    """An error answered to the client as is (status and OpenAI body)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def request_id(scope) -> str:
    """The id RequestIdMiddleware gave this request (`scope`: an ASGI scope or a Request)."""
    scope = getattr(scope, "scope", scope)
    state = scope.setdefault("state", {})
    if "request_id" not in state:  # an app without the middleware (unit tests)
        state["request_id"] = uuid.uuid4().hex[:16]
    return state["request_id"]


def internal_error(rid: str, detail: str) -> OpenAIError:
    """What a client sees of an internal failure: a generic message with the request id. `detail`
    (an exception's text, which may show paths, tensor shapes or other requests' data) is logged
    under that id and never sent."""
    logger.error("request %s failed: %s", rid, detail)
    return _internal(rid)


def _internal(rid: str) -> OpenAIError:
    return OpenAIError(500, f"internal server error (request id {rid}): the server log has the details under "
                            f"that id", code="internal_error", headers={REQUEST_ID_HEADER: rid})


class RequestIdMiddleware:
    """Gives every HTTP request an id (`request_id(scope)`) and sends it back as `x-request-id`.

    Pure ASGI, outermost but for Starlette's ServerErrorMiddleware, whose 500 answers set the
    header themselves (see install_error_handlers)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = (REQUEST_ID_HEADER.encode(), request_id(scope).encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != header[0]]
                message = {**message, "headers": headers + [header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


# What a field with several accepted forms takes, for one readable message instead of one per form.
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids (non-empty)",
    "stop": "a non-empty string or a list of non-empty strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts (text only)",
    "input": "a string or a non-empty list of strings",
}


# Request fields bounded by the server's limits (GET /v1/models, tidemind.limits): pydantic error
# kind -> the message, formatted with the error's ctx ("le", "max_length").
_LIMIT_MESSAGES = {
    ("n", "less_than_equal"): "n: at most {le} choices per request",
    ("logprobs", "less_than_equal"): "logprobs: at most {le} top log-probabilities per token",
    ("top_logprobs", "less_than_equal"): "top_logprobs: at most {le} top log-probabilities per token",
    ("stop", "too_long"): "stop: at most {max_length} stop sequences",
    ("stop", "string_too_long"): "stop: a stop sequence may have at most {max_length} characters",
}
# Errors of a value that broke a bound of the form it has (as opposed to being of another form).
_BOUND_KINDS = {"too_long", "too_short", "string_too_long", "string_too_short", "less_than_equal",
                "greater_than_equal", "less_than", "greater_than"}


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int") or part.startswith(("list[", "constrained-", "function-")))


def _path(loc: Sequence) -> list:
    return list(loc[1:]) if loc and loc[0] == "body" else list(loc)


def _union_split(path: list) -> Optional[int]:
    """Index of the form tag pydantic puts after a field of _UNION_FIELDS, if the path has one."""
    for i, part in enumerate(path):
        if i > 0 and _is_union_tag(part) and path[i - 1] in _UNION_FIELDS:
            return i
    return None


def _merge_union_errors(errors: List[dict]) -> List[dict]:
    """A field of several accepted forms gets one error per form. When exactly one form matched the
    value's type and the value broke a bound of it (too many stop words, an empty one), report that
    bound, precisely; otherwise one "must be ..." line for the field."""
    out: List[dict] = []
    groups: Dict[tuple, List[dict]] = {}
    for error in errors:
        path = _path(error.get("loc", ()))
        at = _union_split(path)
        if at is None:
            out.append(error)
            continue
        field = tuple(path[:at])
        if field not in groups:
            groups[field] = []
            out.append({"type": "union_forms", "loc": ("body", *field), "field": field})
        groups[field].append({**error, "loc": ("body", *path[:at], *path[at + 1:]), "form": path[at]})
    merged: List[dict] = []
    for error in out:
        if error["type"] != "union_forms":
            merged.append(error)
            continue
        group = groups[error["field"]]
        bounds = [e for e in group if e["type"] in _BOUND_KINDS]
        mismatches = [e for e in group if e not in bounds and e["loc"] == error["loc"] and e["type"].endswith("_type")]
        if bounds and len({e["form"] for e in bounds}) == 1 and len(bounds) + len(mismatches) == len(group):
            merged.extend(bounds)
        else:
            merged.append(error)
    return merged


def _describe(error: dict) -> str:
    kind, loc = error.get("type"), error.get("loc", ())
    path = _path(loc)
    where = ".".join(str(p) for p in path)
    ctx = error.get("ctx") or {}
    names = [p for p in path if isinstance(p, str)]
    if kind == "union_forms":
        return f"{where}: must be {_UNION_FIELDS[path[-1]]}"
    if names and (names[-1], kind) in _LIMIT_MESSAGES:
        return f"{_LIMIT_MESSAGES[names[-1], kind].format(**ctx)} ({LIMITS_HINT})"
    if kind == "json_invalid":
        reason = ctx.get("error", "invalid JSON")
        position = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the request body is not valid JSON ({reason}{position}): send a JSON object"
    if not path and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    if kind == "missing":
        return f"field '{where}' is required" if where else "the request needs a JSON object body"
    message = error.get("msg", "invalid value")
    if kind == "value_error":  # our validators' own messages, without pydantic's prefix
        message = message.removeprefix("Value error, ")
    elif kind.endswith("_type") and "input" in error:  # strict types: say what came instead
        message = f"{message}, not {_json_type(error['input'])}"
    return f"{where}: {message}" if where else message


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def _param(error: dict) -> Optional[str]:
    loc = error.get("loc", ())
    if error.get("type") == "json_invalid":
        return None
    if len(loc) > 1 and loc[0] == "body":
        return str(loc[1])
    return (error.get("ctx") or {}).get("param")  # set by validators of the whole body


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors: List[dict] = _merge_union_errors(list(exc.errors()))
    if not errors:
        return OpenAIError(400, "invalid request")
    messages: List[str] = []
    for error in errors:
        text = _describe(error)
        if text not in messages:
            messages.append(text)
    # One error per accepted form of a field can make a long list: the first few say enough.
    message = "; ".join(messages[:3]) + (f" (and {len(messages) - 3} more)" if len(messages) > 3 else "")
    return OpenAIError(400, message, param=_param(errors[0]))


def install_error_handlers(app: FastAPI) -> None:
    from ...engine.async_engine import EngineDeadError

    _document_400_not_422(app)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        # A 500's message is internal detail: logged, not sent. A 503 says on purpose why the server
        # cannot answer (e.g. its engine stopped), so its message goes out.
        if exc.status == 500:
            return internal_error(request_id(request), exc.message).response()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /openapi.json for the endpoints"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}: use {allowed or 'another method'}"
        if exc.status_code >= 500:
            return internal_error(request_id(request), message).response()
        return OpenAIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError):
        # Not an internal detail: the server is going down and a supervisor or proxy should retry
        # elsewhere. /health already answers 503.
        return OpenAIError(503, "the engine stopped after a failure; this server is shutting down",
                           code="engine_dead").response()

    # Starlette's ServerErrorMiddleware, outside every other middleware, calls this one: its
    # response does not pass RequestIdMiddleware, so _internal() sets the header itself.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = request_id(request)
        logger.exception("request %s: internal error answering %s %s", rid, request.method, request.url.path)
        return _internal(rid).response()


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI's schema gives every route with a body a 422 answer that this server never sends
    (validation errors are 400s, documented per route): drop it from /openapi.json."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # FastAPI keeps it as app.openapi_schema: edited once, in place
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


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
                              code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
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
