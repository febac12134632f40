"""The proxy's node table: which api_servers exist, what they serve, how busy and fast they are,
and the background health check that marks nodes unhealthy and drops dead ones.

All state is touched from the proxy's one event loop only, so it needs no locks.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional
from urllib.parse import urlsplit

import httpx

from .routing import SessionAffinity

logger = logging.getLogger("tidemind.proxy")

LATENCY_WINDOW = 32  # latencies kept per node for the statistics in /nodes/status
EWMA_WEIGHT = 0.2  # weight of the newest latency in the moving average the strategies use


class NodeProbeError(RuntimeError):
    pass


def normalize_url(url) -> str:
    """'http://host:port' without a trailing slash; anything else is refused with the fix."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError('give the node as {"url": "http://HOST:PORT"}')
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"node url {url!r} is not an http(s) URL: give it as http://HOST:PORT")
    if parts.path or parts.query:
        raise ValueError(f"node url {url!r} has a path: give only http://HOST:PORT, the proxy adds "
                         "/v1/... itself")
    return url


@dataclass
class Node:
    url: str
    # None until the node answered /v1/models: a node given with --nodes that is not up yet.
    models: Optional[List[str]] = None
    cards: Dict[str, dict] = field(default_factory=dict)  # the node's /v1/models entry of each model
    # The Authorization header that was accepted by the node's /v1/models (None: no key needed).
    auth: Optional[str] = None
    healthy: bool = False
    in_flight: int = 0
    served: int = 0
    failed_starts: int = 0
    failed_checks: int = 0  # consecutive failed health checks; reset by a passed one
    latency_ewma: Optional[float] = None
    latencies: Deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # Set when the node leaves the table: requests still waiting for its first byte go elsewhere.
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def set_models(self, cards: List[dict]) -> None:
        self.models = [card["id"] for card in cards]
        self.cards = {card["id"]: card for card in cards}

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        if self.latency_ewma is None:
            self.latency_ewma = seconds
        else:
            self.latency_ewma += EWMA_WEIGHT * (seconds - self.latency_ewma)

    def status(self, sessions: int) -> dict:
        recent = sorted(self.latencies)
        latency = {
            "ewma_s": self.latency_ewma,
            "mean_s": sum(recent) / len(recent) if recent else None,
            "p50_s": recent[len(recent) // 2] if recent else None,
            "max_s": recent[-1] if recent else None,
            "samples": len(recent),
        }
        return {"url": self.url, "models": list(self.models or []), "healthy": self.healthy,
                "pending": self.models is None, "in_flight": self.in_flight, "served": self.served,
                "failed_starts": self.failed_starts, "failed_checks": self.failed_checks,
                "sessions": sessions, "latency": latency}


class NodeTable:
    """Nodes by URL, plus the session affinity that depends on them.

    A node that was healthy once is dropped after `max_failed_checks` failed health checks in a
    row; a pending node (given at start, never answered) stays until it answers or is removed."""

    def __init__(self, max_failed_checks: int = 3):
        if max_failed_checks < 1:
            raise ValueError("max_failed_checks must be at least 1")
        self.max_failed_checks = max_failed_checks
        self.nodes: Dict[str, Node] = {}
        self.sessions = SessionAffinity()

    def get(self, url: str) -> Optional[Node]:
        return self.nodes.get(url)

    def add(self, url: str, cards: List[dict], auth: Optional[str]) -> Node:
        """`cards`: the node's /v1/models entries (each has an "id")."""
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = Node(url)
        # Adding a node again (say, a restarted server) refreshes what it serves; stats are kept.
        node.set_models(cards)
        node.auth, node.healthy, node.failed_checks = auth, True, 0
        return node

    def add_pending(self, url: str, auth: Optional[str]) -> Node:
        return self.nodes.setdefault(url, Node(url, auth=auth))

    def remove(self, url: str) -> bool:
        node = self.nodes.pop(url, None)
        if node is None:
            return False
        node.gone.set()
        self.sessions.node_gone(url)
        return True

    def candidates(self, model: Optional[str]) -> List[Node]:
        """Healthy nodes that serve `model` (any model when None)."""
        return [n for n in self.nodes.values()
                if n.healthy and n.models is not None and (model is None or model in n.models)]

    def models(self) -> List[str]:
        return sorted({m for n in self.nodes.values() if n.healthy for m in n.models or ()})

    def model_cards(self) -> List[dict]:
        """One /v1/models entry per model a healthy node serves (the first such node's entry)."""
        healthy = [n for n in self.nodes.values() if n.healthy]
        return [next(n.cards[m] for n in healthy if m in n.cards) for m in self.models()]

    def record_check(self, node: Node, passed: bool) -> bool:
        """Updates the node after a health check; True when it was dropped."""
        if passed:
            node.healthy, node.failed_checks = True, 0
            return False
        node.healthy = False
        node.failed_checks += 1
        if node.models is not None and node.failed_checks >= self.max_failed_checks:
            self.remove(node.url)
            logger.warning("dropped node %s after %d failed health checks in a row", node.url,
                           node.failed_checks)
            return True
        return False

    def status(self) -> List[dict]:
        return [n.status(self.sessions.count_on(n.url)) for n in self.nodes.values()]


async def probe_node(client: httpx.AsyncClient, url: str, auth: Optional[str], timeout: float) -> List[dict]:
    """The /v1/models entries of the api_server at `url`, after checking it answers /health."""
    try:
        health = await client.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise NodeProbeError(f"node {url} cannot be reached ({exc!r}): check that its api_server is "
                             "running and that the proxy can reach that host and port") from None
    if health.status_code != 200:
        raise NodeProbeError(f"node {url} answered /health with HTTP {health.status_code}: is it a "
                             "tidemind api_server that finished starting?")
    headers = {"authorization": auth} if auth else {}
    try:
        answer = await client.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise NodeProbeError(f"node {url} did not answer /v1/models ({exc!r})") from None
    if answer.status_code == 401:
        raise NodeProbeError(f"node {url} refused /v1/models without a valid API key: start the proxy "
                             "with --node-api-key KEY (one of the node's --api-keys)")
    try:
        answer.raise_for_status()
        cards = answer.json()["data"]
        if not all(isinstance(card, dict) and isinstance(card["id"], str) for card in cards):
            raise ValueError("a model entry without a string 'id'")
    except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as exc:
        raise NodeProbeError(f"node {url} gave no model list on /v1/models ({exc!r}): is it a "
                             "tidemind api_server?") from None
    if not cards:
        raise NodeProbeError(f"node {url} serves no model")
    return cards


async def _check_node(table: NodeTable, client: httpx.AsyncClient, node: Node, timeout: float) -> None:
    try:
        passed = (await client.get(f"{node.url}/health", timeout=timeout)).status_code == 200
    except httpx.HTTPError:
        passed = False
    if passed and node.models is None:
        try:
            node.set_models(await probe_node(client, node.url, node.auth, timeout))
            logger.warning("node %s is up, serving %s", node.url, ", ".join(node.models))
        except NodeProbeError as exc:
            logger.warning("%s", exc)
            passed = False
    if table.get(node.url) is node:  # it may have been removed while we waited
        table.record_check(node, passed)


async def check_all(table: NodeTable, client: httpx.AsyncClient, timeout: float) -> None:
    await asyncio.gather(*(_check_node(table, client, n, timeout) for n in list(table.nodes.values())))


async def health_check_loop(table: NodeTable, client: httpx.AsyncClient, interval: float,
                            timeout: float) -> None:
    """Every `interval` seconds, checks every node's /health; runs until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await check_all(table, client, timeout)
        except Exception:  # a bug here must not end health checking for good
            logger.exception("health check round failed")
