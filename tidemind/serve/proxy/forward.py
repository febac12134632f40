"""Forwarding OpenAI requests to a node: choosing it, retrying a request that could not start,
keeping interactive sessions on their node, and relaying the node's response as it streams.

Forwarded bodies are relayed chunk by chunk as the node sends them (SSE and newline-delimited JSON
streams included); status codes, content types and error bodies of the node reach the client
unchanged. A request that could not start on a node (no response byte came back) is retried on
another one; once a response has started, nothing is retried.

Request bodies, unlike responses, are read whole before a node is chosen (bounded by
--max-request-bytes, security.BodySizeLimit): routing needs the body's `model` and `session_id`,
and a request that could not start on one node is sent again, whole, to another.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, List, Optional

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from .nodes import NodeTable
from .routing import choose_node
from .state import ProxyState, error_response, json_object, node_auth

logger = logging.getLogger("tidemind.proxy")

FORWARDED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/encode")
INTERACTIVE_PATH = "/v1/chat/interactive"


class NodeGone(Exception):
    """The node left the table (failed health checks, or removed) before it answered."""


# Failures that happen before the node sent any response byte: the request did not start there.
# A read timeout is not one of them (the node may be working on it), so it is never retried.
_NOT_STARTED = (NodeGone, httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.WriteError, httpx.WriteTimeout, httpx.PoolTimeout)

# Headers that describe one hop, not the content: the proxy's server sets its own.
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


class _RelayResponse(Response):
    """Sends a node's streamed response on as it arrives, then settles the node's accounting.

    `on_finish(completed)` runs exactly once, whether the stream ended, broke, or the client went
    away; a client that goes away closes the node's connection too, so the node can stop."""

    def __init__(self, upstream: httpx.Response, on_finish: Callable[[bool], None]):
        self.upstream = upstream
        self.on_finish = on_finish
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in upstream.headers.multi_items() if k.lower() not in _HOP_HEADERS]

    async def __call__(self, scope, receive, send) -> None:
        completed, broken = False, None
        try:
            async with anyio.create_task_group() as tasks:
                async def cancel_on_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(cancel_on_disconnect)
                try:
                    completed = await self._relay(send)
                except Exception as exc:  # raised below, outside the task group's exception group
                    broken = exc
                tasks.cancel_scope.cancel()
            if broken is not None:
                raise broken
        finally:
            self.on_finish(completed)
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()

    async def _relay(self, send) -> bool:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError as exc:
            url = self.upstream.request.url
            logger.warning("node %s://%s broke off a response: %r", url.scheme, url.netloc.decode(), exc)
            if not self.upstream.headers.get("content-type", "").startswith("text/event-stream"):
                raise  # the client sees a cut-off body, as it would from the node itself
            # An SSE client parses events: end with an error event it can show (OpenAI's convention).
            error = {"error": {"message": f"the node serving this request broke off its response "
                                          f"({exc!r}); send the request again",
                               "type": "server_error", "param": None, "code": "node_disconnected"}}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(),
                        "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


def _session_of(path: str, payload: dict) -> Optional[int]:
    """The session an interactive request belongs to; None for one-off requests."""
    session_id = payload.get("session_id")
    if path != INTERACTIVE_PATH or isinstance(session_id, bool) or not isinstance(session_id, int):
        return None
    return session_id if session_id >= 0 else None  # LMDeploy's -1 means "no session"


def _no_node(table: NodeTable, model: Optional[str]) -> JSONResponse:
    if model is not None and not any(model in (n.models or ()) for n in table.nodes.values()):
        served = ", ".join(table.models()) or "none"
        return error_response(404, f"model {model!r} is not served by any node (served now: {served}): "
                              "ask for one of those, or add a node that serves it with POST /nodes/add",
                              "invalid_request_error", code="model_not_found", param="model")
    what = f"serving {model!r} " if model is not None else ""
    return error_response(503, f"no healthy node {what}right now: GET /nodes/status shows the nodes; add "
                          "one with POST /nodes/add {\"url\": \"http://HOST:PORT\"} or start an api_server "
                          "with --proxy-url pointing here", "server_error", code="no_healthy_node")


def _session_lost(session_id: int, url: str, what_happened: str) -> JSONResponse:
    return error_response(410, f"session {session_id} lived on node {url}, which {what_happened}; its "
                          "conversation history is lost: send the request again to start the session "
                          "afresh on another node", "invalid_request_error", code="session_lost",
                          param="session_id")


async def _start(state: ProxyState, node, request: Request, body: bytes) -> httpx.Response:
    """The node's response, once its status line and headers arrived; the body is still to come.

    A node that connects but never answers (hung, not crashed) is given up on as soon as the health
    check drops it, rather than after --request-timeout."""
    sending = asyncio.ensure_future(_send(state, node, request, body))
    gone = asyncio.ensure_future(node.gone.wait())
    try:
        await asyncio.wait((sending, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled
        sending.cancel()
        raise
    finally:
        gone.cancel()
    if sending.done():
        return sending.result()
    sending.cancel()
    sending.add_done_callback(_close_late_answer)
    raise NodeGone(f"node {node.url} left the proxy before it answered")


def _close_late_answer(sending: asyncio.Task) -> None:
    # The node may have answered just before the cancel took effect: close that response.
    if not sending.cancelled() and sending.exception() is None:
        asyncio.ensure_future(sending.result().aclose())


async def _send(state: ProxyState, node, request: Request, body: bytes) -> httpx.Response:
    headers = {"content-type": request.headers.get("content-type", "application/json"),
               "accept": request.headers.get("accept", "*/*"),
               "accept-encoding": "identity"}  # relayed bytes must be what the client can read as is
    auth = node_auth(state, node, request)
    if auth:
        headers["authorization"] = auth
    upstream = state.client.build_request("POST", f"{node.url}{request.url.path}", content=body,
                                          headers=headers, params=request.query_params)
    return await state.client.send(upstream, stream=True)


def _relay(node, upstream: httpx.Response, started_at: float) -> _RelayResponse:
    def on_finish(completed: bool) -> None:
        node.in_flight -= 1
        node.served += 1
        if completed and upstream.status_code < 400:
            node.record_latency(time.monotonic() - started_at)

    return _RelayResponse(upstream, on_finish)


def _settle_session(sessions, session_id: Optional[int], payload: dict, new_pin: bool,
                    status: Optional[int]) -> None:
    """Updates the affinity once a request started on a node (`status`) or did not (None)."""
    if session_id is None:
        return
    if new_pin and (status is None or status >= 400):
        sessions.unpin(session_id)  # the session did not open there
    elif status is not None and status < 400 and not payload.get("interactive_mode") \
            and not payload.get("cancel"):
        sessions.unpin(session_id)  # a one-off request ended the session on the node


async def forward(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    body = await request.body()
    payload, error = json_object(body)
    if error is not None:
        return error
    model = payload["model"] if isinstance(payload.get("model"), str) else None
    session_id = _session_of(request.url.path, payload)
    sessions = state.table.sessions
    pinned = None
    if session_id is not None:
        lost_on = sessions.take_lost(session_id)
        # A one-off request ends a session before it runs, so only a continuing one misses its history.
        if lost_on is not None and (payload.get("interactive_mode") or payload.get("cancel")):
            return _session_lost(session_id, lost_on, "has left the proxy")
        # Invariant: a pinned URL is in the table (removing a node moves its pins to the lost map).
        pinned = state.table.get(sessions.node_of(session_id) or "")
    tried: List[str] = []
    while len(tried) < (1 if pinned else state.settings.max_attempts):
        pool = [pinned] if pinned else [n for n in state.table.candidates(model) if n.url not in tried]
        if not pool:
            break
        node = choose_node(state.settings.routing_strategy, pool, state.rng)
        # A new session is pinned before its first turn is answered (a non-streamed turn answers
        # only at its end), so that a cancel or a second turn sent meanwhile finds its node.
        new_pin = session_id is not None and pinned is None and bool(payload.get("interactive_mode"))
        if new_pin:
            sessions.pin(session_id, node.url)
        node.in_flight += 1
        started_at = time.monotonic()
        try:
            upstream = await _start(state, node, request, body)
        except _NOT_STARTED as exc:
            node.in_flight -= 1
            node.failed_starts += 1
            node.healthy = False  # until the next passed health check
            tried.append(node.url)
            _settle_session(sessions, session_id, payload, new_pin, None)
            logger.warning("request did not start on node %s (%r)%s", node.url, exc,
                           "" if pinned else "; trying another node")
            continue
        except httpx.HTTPError as exc:
            node.in_flight -= 1
            _settle_session(sessions, session_id, payload, new_pin, None)
            return _node_failed(node.url, exc)
        state.retried += bool(tried)
        _settle_session(sessions, session_id, payload, new_pin, upstream.status_code)
        return _relay(node, upstream, started_at)
    if pinned is not None:
        sessions.unpin(session_id)
        return _session_lost(session_id, pinned.url, "did not take the request")
    if tried:
        return error_response(502, f"no node could take the request (tried {', '.join(tried)}): GET "
                              "/nodes/status shows the nodes' health", "server_error",
                              code="no_node_available")
    return _no_node(state.table, model)


def _node_failed(url: str, exc: httpx.HTTPError) -> JSONResponse:
    if isinstance(exc, httpx.TimeoutException):
        return error_response(504, f"node {url} sent nothing for --request-timeout seconds ({exc!r}): raise "
                              "--request-timeout if its requests need longer", "server_error",
                              code="node_timeout")
    return error_response(502, f"node {url} failed this request ({exc!r})", "server_error", code="node_error")
