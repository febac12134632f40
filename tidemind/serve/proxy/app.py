"""The proxy's HTTP app: node management, the model list, and the forwarded OpenAI endpoints
(forward.py), behind the access checks and the body size limit of security.py."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional, Tuple

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .forward import FORWARDED_PATHS, forward
from .nodes import NodeProbeError, check_all, health_check_loop, normalize_url, probe_node
from .security import REGISTRATION_PATHS, ApiKeyCheck, BodySizeLimit, authorize_registration
from .state import ProxySettings, ProxyState, error_response, json_object

__all__ = ["ProxySettings", "create_app"]

logger = logging.getLogger("tidemind.proxy")


def _node_url(payload: dict) -> Tuple[Optional[str], Optional[JSONResponse]]:
    """The node URL of a /nodes/add or /nodes/remove payload, or the 400 answer to a bad one."""
    try:
        return normalize_url(payload.get("url")), None
    except ValueError as exc:
        return None, error_response(400, str(exc), "invalid_request_error", code="invalid_url", param="url")


def _could_not_add(url: str) -> JSONResponse:
    # One answer whatever went wrong: telling a closed port from an open one, or an HTTP service from
    # another, would make /nodes/add a port scanner. The reason is in the proxy's log.
    return error_response(400, f"node {url} could not be added: the proxy found no working tidemind "
                          "api_server there (GET /health, then GET /v1/models); the proxy's log says why",
                          "invalid_request_error", code="node_unreachable", param="url")


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request):
        table = request.app.state.proxy.table
        return {"status": "ok", "nodes": len(table.nodes), "healthy_nodes": len(table.candidates(None))}

    @app.get("/nodes/status")
    async def nodes_status(request: Request):
        state: ProxyState = request.app.state.proxy
        return {"routing_strategy": state.settings.routing_strategy, "retried_requests": state.retried,
                "nodes": state.table.status()}

    @app.post("/nodes/add")
    async def add_node(request: Request):
        state: ProxyState = request.app.state.proxy
        key_presented, refusal = authorize_registration(state.settings, request)
        if refusal is not None:
            return refusal
        payload, error = json_object(await request.body())
        url, error = (None, error) if error is not None else _node_url(payload)
        if error is not None:
            return error
        if not state.allowed_hosts.allows(url):
            return error_response(403, f"node {url} is not on the proxy's --allowed-node-hosts: add its host "
                                  "there to route to it", "invalid_request_error", code="node_host_not_allowed",
                                  param="url")
        trusted = key_presented or url in state.settings.nodes
        try:
            # The caller's own Authorization is its registration credential: never sent to the node.
            cards = await probe_node(state.client, url, state.table.key_header(trusted),
                                     state.settings.health_check_timeout)
        except NodeProbeError as exc:
            logger.warning("refused to add node %s: %s", url, exc)
            return _could_not_add(url)
        node = state.table.add(url, cards, trusted)
        logger.warning("added node %s (%s), serving %s", url, "trusted" if node.trusted else "not trusted with "
                       "--node-api-key", ", ".join(node.models))
        return {"url": url, "models": node.models}

    @app.post("/nodes/remove")
    async def remove_node(request: Request):
        state: ProxyState = request.app.state.proxy
        _, refusal = authorize_registration(state.settings, request)
        if refusal is not None:
            return refusal
        if "node_url" in request.query_params:  # LMDeploy's clients send ?node_url=...; ours send {"url": ...}
            payload, error = {"url": request.query_params["node_url"]}, None
        else:
            payload, error = json_object(await request.body())
        url, error = (None, error) if error is not None else _node_url(payload)
        if error is not None:
            return error
        if not state.table.remove(url):
            return error_response(404, f"node {url} is not in the proxy's table: GET /nodes/status lists "
                                  "the nodes", "invalid_request_error", code="node_not_found", param="url")
        logger.warning("removed node %s", url)
        return {"url": url, "removed": True}

    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": request.app.state.proxy.table.model_cards()}

    for path in FORWARDED_PATHS:
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=True)


def create_app(settings: ProxySettings, transport: Optional[httpx.AsyncBaseTransport] = None) -> FastAPI:
    """The proxy app; `transport` replaces the network to the nodes (tests pass a fake one)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # trust_env=False: nodes are reached directly, never through the HTTP(S)_PROXY of the shell.
        client = httpx.AsyncClient(
            transport=transport, trust_env=False,
            timeout=httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout, write=30.0,
                                  pool=settings.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        state = app.state.proxy = ProxyState(settings, client)
        for url in settings.nodes:
            state.table.add_pending(url)
        await check_all(state.table, client, settings.health_check_timeout)
        checker = asyncio.create_task(health_check_loop(state.table, client, settings.health_check_interval,
                                                        settings.health_check_timeout))
        try:
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            await client.aclose()

    app = FastAPI(title="tidemind proxy", lifespan=lifespan)
    # The last middleware added runs first: keys are checked before a body is read.
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.api_keys:
        # With a registration key, that key alone guards node registration (authorize_registration).
        exempt = ("/health",) + (REGISTRATION_PATHS if settings.registration_key else ())
        app.add_middleware(ApiKeyCheck, keys=tuple(settings.api_keys), exempt=exempt)
    _add_routes(app)
    return app
