"""How the proxy picks a node: three strategies under LMDeploy's names, and session affinity.

A strategy sees only what the node table keeps for each node: `in_flight` (requests sent to it and
not finished) and `latency_ewma` (moving average of its request latencies in seconds, None until
it finished one). Nothing here does I/O, so the strategies are unit-tested on plain objects.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, TypeVar

NodeT = TypeVar("NodeT")

DEFAULT_ROUTING_STRATEGY = "min_expected_latency"

# Latency assumed for every node while no node has finished a request yet: any positive value gives
# the same choices (only ratios matter), so an idle fleet is spread by in-flight counts alone.
_UNMEASURED_LATENCY_S = 1.0


def _pick_lowest(nodes: Sequence[NodeT], score: Callable[[NodeT], float], rng: random.Random) -> NodeT:
    scores = [score(node) for node in nodes]
    best = min(scores)
    # Equal scores are common (idle nodes, nodes never measured): a random pick among them spreads
    # load instead of sending everything to the first node in the table.
    tolerance = 1e-9 * max(1.0, abs(best))
    return rng.choice([node for node, s in zip(nodes, scores) if s <= best + tolerance])


def pick_random(nodes: Sequence[NodeT], rng: random.Random) -> NodeT:
    return rng.choice(list(nodes))


def pick_min_expected_latency(nodes: Sequence[NodeT], rng: random.Random) -> NodeT:
    """The node whose queue would clear first: (in_flight + 1) x its mean request latency.

    A node not measured yet counts as the mean of the measured ones, so a new node gets its share
    of traffic (and thereby a measurement) without being assumed infinitely fast."""
    measured = [n.latency_ewma for n in nodes if n.latency_ewma is not None]
    fallback = sum(measured) / len(measured) if measured else _UNMEASURED_LATENCY_S

    def expected(node) -> float:
        latency = node.latency_ewma if node.latency_ewma is not None else fallback
        return (node.in_flight + 1) * latency

    return _pick_lowest(nodes, expected, rng)


def pick_min_observed_latency(nodes: Sequence[NodeT], rng: random.Random) -> NodeT:
    """The node with the lowest moving average of recent latencies, whatever its load.

    A node not measured yet scores 0: it is tried first, otherwise it would never be measured."""
    return _pick_lowest(nodes, lambda n: n.latency_ewma if n.latency_ewma is not None else 0.0, rng)


ROUTING_STRATEGIES: Dict[str, Callable[[Sequence, random.Random], object]] = {
    "random": pick_random,
    "min_expected_latency": pick_min_expected_latency,
    "min_observed_latency": pick_min_observed_latency,
}


def choose_node(strategy: str, nodes: Sequence[NodeT], rng: random.Random) -> NodeT:
    if strategy not in ROUTING_STRATEGIES:
        raise ValueError(f"unknown routing strategy {strategy!r}: use one of {', '.join(ROUTING_STRATEGIES)}")
    if not nodes:
        raise ValueError("no node to choose from")
    return ROUTING_STRATEGIES[strategy](nodes, rng)


class SessionAffinity:
    """session_id -> URL of the node that holds the session (its history lives in that node's
    KV cache, so every turn must go there).

    When a node leaves the table its sessions move to `_lost`, so that the next request of such a
    session gets a clear "session lost" answer once, instead of silently starting afresh elsewhere
    without its history. Both maps are bounded (least recently used entries go first): a session
    evicted from `_pins` is routed like a new one."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._pins: "OrderedDict[int, str]" = OrderedDict()
        self._lost: "OrderedDict[int, str]" = OrderedDict()

    def node_of(self, session_id: int) -> Optional[str]:
        url = self._pins.get(session_id)
        if url is not None:
            self._pins.move_to_end(session_id)
        return url

    def pin(self, session_id: int, url: str) -> None:
        self._lost.pop(session_id, None)
        self._pins[session_id] = url
        self._pins.move_to_end(session_id)
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)

    def unpin(self, session_id: int) -> None:
        self._pins.pop(session_id, None)

    def node_gone(self, url: str) -> None:
        for session_id in [s for s, u in self._pins.items() if u == url]:
            del self._pins[session_id]
            self._lost[session_id] = url
        while len(self._lost) > self.capacity:
            self._lost.popitem(last=False)

    def take_lost(self, session_id: int) -> Optional[str]:
        """The URL of the node a session was lost with (once: the entry is forgotten)."""
        return self._lost.pop(session_id, None)

    def count_on(self, url: str) -> int:
        return sum(1 for u in self._pins.values() if u == url)
