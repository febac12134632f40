"""The proxy's node table: which api_servers exist, what they serve, how busy and fast they are,
and the background health check that marks nodes unhealthy and drops dead ones.

All state is touched from the proxy's one event loop only, so it needs no locks.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import urlsplit

import httpx

from .routing import SessionAffinity

logger = logging.getLogger("tidemind.proxy")

LATENCY_WINDOW = 32  # latencies kept per node for the statistics in /nodes/status
EWMA_WEIGHT = 0.2  # weight of the newest latency in the moving average the strategies use


class NodeProbeError(RuntimeError):
    pass


_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_.])?")  # DNS-ish names; no %-escapes, no spaces


def _ip(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if ip.version == 6 else ip  # ::ffff:10.0.0.7 is 10.0.0.7


def normalize_url(url) -> str:
    """`scheme://host:port` (scheme and host lower-cased, no trailing slash); anything that is not a
    plain http(s) URL of a host is refused with the fix. No credentials, path, query or fragment:
    the proxy adds the paths itself, and --node-api-key is the only credential nodes get."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError('give the node as {"url": "http://HOST:PORT"}')
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"node url {url!r} is not an http(s) URL: give it as http://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"node url {url!r} holds credentials: give only http://HOST:PORT, and the "
                         "nodes' key to the proxy with --node-api-key")
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"node url {url!r} has a path, query or fragment: give only http://HOST:PORT, "
                         "the proxy adds /v1/... itself")
    host = parts.hostname  # lower-cased by urlsplit
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (_ip(host) is None and not _HOSTNAME.fullmatch(host)):
        raise ValueError(f"node url {url!r} is not a valid HOST:PORT: give it as http://HOST:PORT")
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{netloc}" + (f":{port}" if port is not None else "")


class HostAllowList:
    """The hosts nodes may be on (--allowed-node-hosts); empty: any host.

    Entries: a host name (`gpu-1.internal`), `*.DOMAIN` (any name under DOMAIN), an IP address or
    a network (`10.0.0.0/8`). A node URL's host is matched as written, never resolved: a name
    matches only name entries and an IP literal only address entries, so a name cannot stand in
    for an address the list refuses (DNS answers can change between check and connect)."""

    def __init__(self, entries: Iterable[str] = ()):
        self.entries: Tuple[str, ...] = tuple(entries)
        self.names, self.domains, self.networks = set(), [], []
        for entry in self.entries:
            text = entry.strip().lower().rstrip(".")
            try:
                self.networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            name = text[2:] if text.startswith("*.") else text
            if not _HOSTNAME.fullmatch(name):
                raise ValueError(f"--allowed-node-hosts entry {entry!r} is not a host name, *.DOMAIN, an IP "
                                 "address or a network such as 10.0.0.0/8")
            (self.domains.append if text.startswith("*.") else self.names.add)(name)

    def allows(self, url: str) -> bool:
        """`url`: as normalize_url gives it."""
        if not self.entries:
            return True
        host = urlsplit(url).hostname.rstrip(".")
        ip = _ip(host)
        if ip is not None:
            return any(ip in network for network in self.networks)
        return host in self.names or any(host.endswith(f".{domain}") for domain in self.domains)


@dataclass
class Node:
    url: str
    # None until the node answered /v1/models: a node given with --nodes that is not up yet.
    models: Optional[List[str]] = None
    cards: Dict[str, dict] = field(default_factory=dict)  # the node's /v1/models entry of each model
    # Vouched for by the operator (--nodes, or registered with the --registration-key): only such
    # nodes are sent --node-api-key.
    trusted: bool = False
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
        return {"url": self.url, "models": list(self.models or []), "healthy": self.healthy, "trusted": self.trusted,
                "pending": self.models is None, "in_flight": self.in_flight, "served": self.served,
                "failed_starts": self.failed_starts, "failed_checks": self.failed_checks,
                "sessions": sessions, "latency": latency}


class NodeTable:
    """Nodes by URL, plus the session affinity that depends on them.

    A node that was healthy once is dropped after `max_failed_checks` failed health checks in a
    row; a pending node (given at start, never answered) stays until it answers or is removed."""

    def __init__(self, max_failed_checks: int = 3, node_api_key: Optional[str] = None):
        if max_failed_checks < 1:
            raise ValueError("max_failed_checks must be at least 1")
        self.max_failed_checks = max_failed_checks
        self._node_api_key = node_api_key
        self.nodes: Dict[str, Node] = {}
        self.sessions = SessionAffinity()

    def get(self, url: str) -> Optional[Node]:
        return self.nodes.get(url)

    def key_header(self, trusted: bool) -> Optional[str]:
        """The Authorization header the proxy's own key gives a node: --node-api-key goes only to
        trusted nodes, so that a node registered by someone else never receives it."""
        return f"Bearer {self._node_api_key}" if trusted and self._node_api_key else None

    def add(self, url: str, cards: List[dict], trusted: bool) -> Node:
        """`cards`: the node's /v1/models entries (each has an "id")."""
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = Node(url)
        # Adding a node again (say, a restarted server) refreshes what it serves; stats are kept, and
        # so is trust: it belongs to the URL the operator vouched for, whoever adds it again.
        node.set_models(cards)
        node.trusted = node.trusted or trusted
        node.healthy, node.failed_checks = True, 0
        return node

    def add_pending(self, url: str) -> Node:
        """A node the operator gave at start (--nodes): trusted, probed by the health check."""
        return self.nodes.setdefault(url, Node(url, trusted=True))

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
                             "with --node-api-key KEY (one of the node's --api-keys); the proxy sends it only "
                             "to nodes given with --nodes or registered with its --registration-key")
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
            node.set_models(await probe_node(client, node.url, table.key_header(node.trusted), timeout))
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
