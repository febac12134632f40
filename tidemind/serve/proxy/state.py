"""The proxy's settings and run-time state, and the helpers its routes share."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse

from . import DEFAULT_MAX_REQUEST_BYTES
from .nodes import HostAllowList, Node, NodeTable, normalize_url
from .routing import DEFAULT_ROUTING_STRATEGY, ROUTING_STRATEGIES


@dataclass(frozen=True)
class ProxySettings:
    routing_strategy: str = DEFAULT_ROUTING_STRATEGY
    api_keys: Tuple[str, ...] = ()  # keys the proxy's clients must present; empty: no check
    node_api_key: Optional[str] = None  # sent to trusted nodes instead of the client's Authorization
    # Needed on /nodes/add and /nodes/remove; None: those are accepted from loopback clients only.
    registration_key: Optional[str] = None
    allowed_node_hosts: Tuple[str, ...] = ()  # HostAllowList entries; empty: nodes on any host
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    health_check_interval: float = 10.0
    max_failed_checks: int = 3  # failed health checks in a row before a node is dropped
    connect_timeout: float = 3.0
    request_timeout: Optional[float] = 600.0  # longest silence from a node mid-request; None: no limit
    max_attempts: int = 3  # nodes tried for one request whose start failed
    nodes: Tuple[str, ...] = ()  # initial nodes (normalized here), trusted, probed by the first health check

    def __post_init__(self):
        if self.routing_strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"unknown routing strategy {self.routing_strategy!r}: use one of "
                             f"{', '.join(ROUTING_STRATEGIES)}")
        if self.health_check_interval <= 0:
            raise ValueError("--health-check-interval must be a positive number of seconds")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("--api-keys got an empty key: give non-empty keys")
        if self.registration_key is not None and not self.registration_key.strip():
            raise ValueError("--registration-key is empty: give a non-empty key, or leave it out to accept "
                             "node registration from this machine only")
        if self.registration_key is not None and self.registration_key in self.api_keys:
            raise ValueError("--registration-key is also one of the --api-keys: every client could then add "
                             "and remove nodes; give it a key of its own")
        if self.max_request_bytes < 1:
            raise ValueError("--max-request-bytes must be a positive number of bytes")
        allowed = HostAllowList(self.allowed_node_hosts)
        object.__setattr__(self, "nodes", tuple(normalize_url(url) for url in self.nodes))
        for url in self.nodes:
            if not allowed.allows(url):
                raise ValueError(f"--nodes entry {url} is not on --allowed-node-hosts "
                                 f"({' '.join(allowed.entries)}): add its host there")

    @property
    def health_check_timeout(self) -> float:
        # A busy node can be slow to answer /health; a timeout under 2 s would drop live nodes.
        return min(max(self.health_check_interval, 2.0), 5.0)


class ProxyState:
    def __init__(self, settings: ProxySettings, client: httpx.AsyncClient):
        self.settings = settings
        self.client = client
        self.table = NodeTable(settings.max_failed_checks, settings.node_api_key)
        self.allowed_hosts = HostAllowList(settings.allowed_node_hosts)
        self.rng = random.Random()
        self.retried = 0  # requests that were sent to another node after a failed start


def error_response(status: int, message: str, type_: str, code: Optional[str] = None,
                   param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def json_object(body: bytes) -> Tuple[Optional[dict], Optional[JSONResponse]]:
    try:
        payload = json.loads(body) if body else None
    except ValueError as exc:
        return None, error_response(400, f"the request body is not valid JSON ({exc}): send a JSON object",
                                    "invalid_request_error", code="invalid_json")
    if not isinstance(payload, dict):
        return None, error_response(400, "the request body must be a JSON object",
                                    "invalid_request_error", code="invalid_json")
    return payload, None


def node_auth(state: ProxyState, node: Node, request: Request) -> Optional[str]:
    """The Authorization header a request forwarded to `node` carries: --node-api-key for a trusted
    node; else the client's own header, unless the proxy has --api-keys (the header then holds one
    of them, the proxy's own credential, which is never passed on)."""
    own_key = state.table.key_header(node.trusted)
    if own_key or state.settings.api_keys:
        return own_key
    return request.headers.get("authorization")
