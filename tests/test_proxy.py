"""`tidemind serve proxy`: routing strategies and session affinity as unit tests, then the app
against fake nodes (an httpx transport, no sockets). With real api_servers: test_proxy_e2e.py."""
from __future__ import annotations

import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional

import httpx
import pytest

from tidemind.serve.proxy.nodes import Node, NodeTable, normalize_url
from tidemind.serve.proxy.routing import (SessionAffinity, choose_node, pick_min_expected_latency,
                                          pick_min_observed_latency, pick_random)


def _node(name: str, in_flight: int = 0, latency: Optional[float] = None) -> Node:
    node = Node(f"http://{name}:1", models=["m"], healthy=True, in_flight=in_flight)
    node.latency_ewma = latency
    return node


def _picks(strategy, nodes, trials: int = 400, seed: int = 0) -> dict:
    rng = random.Random(seed)
    counts = {n.url: 0 for n in nodes}
    for _ in range(trials):
        counts[strategy(nodes, rng).url] += 1
    return counts


# ---------------------------------------------------------------- strategies, no servers

def test_random_spreads_evenly():
    counts = _picks(pick_random, [_node("a"), _node("b", in_flight=9, latency=9.0), _node("c")], 3000)
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_min_expected_latency_weighs_in_flight_by_speed():
    fast_busy, slow_idle = _node("fast", in_flight=1, latency=0.5), _node("slow", latency=2.0)
    # (1 + 1) x 0.5 s = 1 s beats (0 + 1) x 2 s
    assert _picks(pick_min_expected_latency, [fast_busy, slow_idle])[fast_busy.url] == 400
    fast_busy.in_flight = 4  # 5 x 0.5 s = 2.5 s: now the slow idle node clears first
    assert _picks(pick_min_expected_latency, [fast_busy, slow_idle])[slow_idle.url] == 400


def test_min_expected_latency_treats_unmeasured_nodes_as_average_and_spreads_ties():
    measured, new = _node("measured", in_flight=2, latency=1.0), _node("new")
    assert _picks(pick_min_expected_latency, [measured, new])[new.url] == 400  # 1 x 1 s < 3 x 1 s
    new.in_flight = 3  # 4 x (mean of measured = 1 s) > 3 x 1 s
    assert _picks(pick_min_expected_latency, [measured, new])[measured.url] == 400
    idle = [_node("a"), _node("b"), _node("c")]
    assert all(c > 80 for c in _picks(pick_min_expected_latency, idle).values())


def test_min_observed_latency_ignores_load_and_tries_new_nodes_first():
    quick, sluggish = _node("quick", in_flight=50, latency=0.2), _node("sluggish", latency=0.9)
    assert _picks(pick_min_observed_latency, [quick, sluggish])[quick.url] == 400
    new = _node("new")
    assert _picks(pick_min_observed_latency, [quick, sluggish, new])[new.url] == 400


def test_choose_node_names_the_strategies_and_refuses_an_empty_pool():
    with pytest.raises(ValueError, match="min_expected_latency"):
        choose_node("round_robin", [_node("a")], random.Random(0))
    with pytest.raises(ValueError):
        choose_node("random", [], random.Random(0))
    assert choose_node("min_observed_latency", [_node("a")], random.Random(0)).url == "http://a:1"


def test_latency_moving_average_and_status_statistics():
    node = _node("a")
    for seconds in (1.0, 2.0, 3.0):
        node.record_latency(seconds)
    assert node.latency_ewma == pytest.approx(1.0 + 0.2 * (2.0 - 1.0) + 0.2 * (3.0 - 1.2))
    latency = node.status(sessions=0)["latency"]
    assert latency["mean_s"] == pytest.approx(2.0) and latency["p50_s"] == 2.0 and latency["samples"] == 3


def test_session_affinity_pins_loses_once_and_is_bounded():
    sessions = SessionAffinity(capacity=2)
    sessions.pin(1, "http://a:1")
    sessions.pin(2, "http://b:1")
    assert sessions.node_of(1) == "http://a:1"  # 1 is now the most recently used
    sessions.pin(3, "http://b:1")  # evicts 2, the least recently used
    assert sessions.node_of(2) is None and sessions.count_on("http://b:1") == 1
    sessions.node_gone("http://a:1")
    assert sessions.node_of(1) is None
    assert sessions.take_lost(1) == "http://a:1" and sessions.take_lost(1) is None


def test_node_table_drops_after_three_failed_checks_but_keeps_pending_nodes():
    table = NodeTable(max_failed_checks=3)
    node = table.add("http://a:1", [{"id": "m"}], trusted=False)
    table.sessions.pin(7, node.url)
    pending = table.add_pending("http://later:1")
    for _ in range(2):
        assert not table.record_check(node, passed=False)
    assert not node.healthy and table.candidates("m") == []
    assert not table.record_check(node, passed=True)  # a passed check resets the count
    assert node.healthy and table.candidates("m") == [node]
    dropped = [table.record_check(node, passed=False) for _ in range(3)]
    assert dropped == [False, False, True] and table.get(node.url) is None
    assert table.sessions.take_lost(7) == "http://a:1"
    for _ in range(5):
        assert not table.record_check(pending, passed=False)
    assert table.get(pending.url) is pending


def test_normalize_url_names_the_fix():
    assert normalize_url(" http://h:8/ ") == "http://h:8"
    for bad in ("h:8", "http://h:8/v1", "", None):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            normalize_url(bad)


# ---------------------------------------------------------------- the app against fake nodes

@dataclass
class FakeNode:
    """What a node does, by URL, behind the fake transport."""
    models: List[str] = field(default_factory=lambda: ["m"])
    down: bool = False  # every connection is refused
    hung: bool = False  # hangs on the next forwarded request; from then on, health checks time out
    health_fails: bool = False
    delay: float = 0.0  # seconds before a forwarded request is answered
    status: int = 200  # of forwarded POSTs
    break_stream: bool = False  # a stream breaks off after its first chunk
    authorizations: List[Optional[str]] = field(default_factory=list)  # of forwarded POSTs
    bodies: List[dict] = field(default_factory=list)  # of forwarded POSTs
    model_list_authorizations: List[Optional[str]] = field(default_factory=list)  # of GET /v1/models
    requests: int = 0  # of any kind, refused connections included


def _streamed(status: int, payload: dict) -> httpx.Response:
    """A JSON response whose body still has to be read, as one from a real socket."""
    async def body():
        yield json.dumps(payload).encode()

    return httpx.Response(status, headers={"content-type": "application/json"}, content=body())


class FakeFleet:
    def __init__(self, **nodes: FakeNode):
        self.nodes = {f"http://{name}:1": node for name, node in nodes.items()}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.netloc.decode()}"
        node = self.nodes.get(url)
        if node is not None:
            node.requests += 1
        if node is None or node.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health" and node.health_fails:
            raise httpx.ReadTimeout("timed out", request=request)
        if node.hung and request.method == "POST":
            node.health_fails = True
            await asyncio.sleep(10)  # then answers late (bounded, so that a broken proxy fails, not hangs)
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        await asyncio.sleep(node.delay)
        if request.url.path == "/v1/models":
            node.model_list_authorizations.append(request.headers.get("authorization"))
            return httpx.Response(200, json={"object": "list", "data": [{"id": m, "object": "model", "owner": url}
                                                                        for m in node.models]})
        node.authorizations.append(request.headers.get("authorization"))
        payload = json.loads(request.content)
        node.bodies.append(payload)
        if node.status != 200:
            return _streamed(node.status, {"error": {"message": "bad", "type": "invalid_request_error",
                                                     "param": None, "code": None}})
        if payload.get("stream"):
            sse = request.url.path != "/v1/chat/interactive"  # which streams newline-delimited JSON
            return httpx.Response(200, headers={"content-type": "text/event-stream" if sse else "application/x-ndjson"},
                                  content=self._events(url, node.break_stream, sse))
        return _streamed(200, {"node": url, "path": request.url.path})

    @staticmethod
    async def _events(url: str, break_off: bool, sse: bool):
        for i in range(3):
            line = json.dumps({"node": url, "i": i})
            yield f"data: {line}\n\n".encode() if sse else f"{line}\n".encode()
            if break_off:
                raise httpx.ReadError("connection reset by peer")
        if sse:
            yield b"data: [DONE]\n\n"


@pytest.fixture
def proxy_client():
    """proxy_client(fleet, **settings) -> a TestClient of a proxy whose nodes are `fleet`."""
    from fastapi.testclient import TestClient

    from tidemind.serve.proxy.app import ProxySettings, create_app

    clients = []

    def make(fleet: FakeFleet, **settings) -> TestClient:
        app = create_app(ProxySettings(**settings), transport=httpx.MockTransport(fleet.handle))
        # A client on the proxy's own machine: without a registration key, only such a client may
        # add and remove nodes (test_proxy_security.py calls from elsewhere too).
        client = TestClient(app, client=("127.0.0.1", 50000))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _add(client, *names: str, headers=None) -> None:
    for name in names:
        answer = client.post("/nodes/add", json={"url": f"http://{name}:1"}, headers=headers)
        assert answer.status_code == 200, answer.text


def _status(client, headers=None) -> dict:
    return {n["url"]: n for n in client.get("/nodes/status", headers=headers).json()["nodes"]}


def test_add_probes_the_node_and_routes_by_model(proxy_client):
    fleet = FakeFleet(a=FakeNode(models=["m"]), b=FakeNode(models=["m", "other"]), dead=FakeNode(down=True))
    client = proxy_client(fleet)
    _add(client, "a", "b")
    refused = client.post("/nodes/add", json={"url": "http://dead:1"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "node_unreachable"
    assert client.post("/nodes/add", json={"url": "dead:1"}).json()["error"]["code"] == "invalid_url"
    cards = client.get("/v1/models").json()["data"]
    assert [card["id"] for card in cards] == ["m", "other"]
    assert cards[1] == {"id": "other", "object": "model", "owner": "http://b:1"}  # the node's own entry
    for _ in range(4):
        assert client.post("/v1/chat/completions", json={"model": "other"}).json()["node"] == "http://b:1"
    missing = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and "other" in missing.json()["error"]["message"]
    served = {url: n["served"] for url, n in _status(client).items()}
    assert served == {"http://a:1": 0, "http://b:1": 4}
    assert client.post("/nodes/remove", json={"url": "http://b:1"}).json()["removed"] is True
    assert client.post("/nodes/remove", json={"url": "http://b:1"}).status_code == 404
    assert client.post("/v1/completions", json={"model": "other"}).status_code == 404
    fleet.nodes["http://a:1"].down = True
    client.post("/v1/completions", json={"model": "m"})  # marks a unhealthy
    no_node = client.post("/v1/completions", json={"model": "m"})
    assert no_node.status_code == 503 and no_node.json()["error"]["code"] == "no_healthy_node"


def test_a_request_that_cannot_start_is_retried_on_another_node(proxy_client):
    fleet = FakeFleet(a=FakeNode(), b=FakeNode())
    client = proxy_client(fleet, routing_strategy="min_observed_latency")
    _add(client, "a", "b")
    # a has a measured latency and b none: min_observed_latency tries b first, which is now dead.
    client.app.state.proxy.table.get("http://a:1").record_latency(5.0)
    fleet.nodes["http://b:1"].down = True
    answer = client.post("/v1/chat/completions", json={"model": "m"})
    assert answer.status_code == 200 and answer.json()["node"] == "http://a:1"
    status = client.get("/nodes/status").json()
    assert status["retried_requests"] == 1
    nodes = {n["url"]: n for n in status["nodes"]}
    assert nodes["http://b:1"]["failed_starts"] == 1 and nodes["http://b:1"]["healthy"] is False
    assert nodes["http://a:1"]["served"] == 1 and nodes["http://a:1"]["in_flight"] == 0
    fleet.nodes["http://a:1"].down = True  # every node refuses: a clear 502, no hang
    failed = client.post("/v1/chat/completions", json={"model": "m"})
    assert failed.status_code in (502, 503) and failed.json()["error"]["code"] in ("no_node_available",
                                                                                   "no_healthy_node")


def test_a_request_waiting_on_a_hung_node_moves_on_when_the_node_is_dropped(proxy_client):
    fleet = FakeFleet(a=FakeNode(), b=FakeNode())
    client = proxy_client(fleet, routing_strategy="min_observed_latency", health_check_interval=0.05)
    _add(client, "a", "b")
    client.app.state.proxy.table.get("http://a:1").record_latency(5.0)  # b goes first
    fleet.nodes["http://b:1"].hung = True
    started = time.monotonic()
    answer = client.post("/v1/chat/completions", json={"model": "m"})
    assert answer.json()["node"] == "http://a:1" and time.monotonic() - started < 5
    status = client.get("/nodes/status").json()
    assert status["retried_requests"] == 1 and [n["url"] for n in status["nodes"]] == ["http://a:1"]


def test_streams_pass_through_and_are_not_retried_once_started(proxy_client):
    fleet = FakeFleet(a=FakeNode(), b=FakeNode(break_stream=True))
    client = proxy_client(fleet, routing_strategy="min_observed_latency")
    _add(client, "a", "b")
    client.app.state.proxy.table.get("http://a:1").record_latency(5.0)  # b goes first
    with client.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line]
    assert json.loads(events[0][len("data: "):]) == {"node": "http://b:1", "i": 0}
    assert json.loads(events[-1][len("data: "):])["error"]["code"] == "node_disconnected"
    assert len(events) == 2  # nothing from a: a broken stream is not retried
    fleet.nodes["http://b:1"].break_stream = False
    with client.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as answer:
        events = [line for line in answer.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    status = client.get("/nodes/status").json()
    assert status["retried_requests"] == 0 and _status(client)["http://a:1"]["served"] == 0
    assert all(n["in_flight"] == 0 for n in status["nodes"])


def test_a_broken_json_lines_stream_is_cut_off_for_the_client_too(proxy_client):
    fleet = FakeFleet(a=FakeNode(break_stream=True))
    client = proxy_client(fleet)
    _add(client, "a")
    lines = []
    with pytest.raises(httpx.ReadError):  # the test client re-raises what cut the body off
        with client.stream("POST", "/v1/chat/interactive", json={"prompt": "x", "stream": True}) as answer:
            lines.extend(answer.iter_lines())
    assert _status(client)["http://a:1"]["in_flight"] == 0
    fleet.nodes["http://a:1"].break_stream = False
    with client.stream("POST", "/v1/chat/interactive", json={"prompt": "x", "stream": True}) as answer:
        assert answer.headers["content-type"] == "application/x-ndjson"
        assert [json.loads(line)["i"] for line in answer.iter_lines() if line] == [0, 1, 2]


def test_node_errors_pass_through_unchanged(proxy_client):
    fleet = FakeFleet(a=FakeNode(status=400))
    client = proxy_client(fleet)
    _add(client, "a")
    answer = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "bad"
    bad_json = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"


def test_api_keys_guard_everything_but_health_and_node_key_is_forwarded(proxy_client):
    fleet = FakeFleet(a=FakeNode())
    # a is one of the operator's --nodes, so it is trusted with the node key (test_proxy_security.py).
    client = proxy_client(fleet, api_keys=("k1", "k2"), node_api_key="node-key", nodes=("http://a:1",))
    good = {"Authorization": "Bearer k2"}
    assert client.get("/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/nodes/status"), ("POST", "/nodes/add"),
                         ("POST", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
            answer = client.request(method, path, headers=headers, json={"url": "http://a:1"})
            assert answer.status_code == 401, (path, headers)
            error = answer.json()["error"]
            assert error["code"] == "invalid_api_key" and "--api-keys" in error["message"]
    _add(client, "a", headers=good)
    assert client.post("/v1/chat/completions", json={"model": "m"}, headers=good).status_code == 200
    assert fleet.nodes["http://a:1"].authorizations == ["Bearer node-key"]


def test_client_authorization_is_forwarded_without_a_node_key(proxy_client):
    fleet = FakeFleet(a=FakeNode())
    client = proxy_client(fleet)
    _add(client, "a")
    client.post("/v1/encode", json={"input": "x"}, headers={"Authorization": "Bearer shared"})
    client.post("/v1/encode", json={"input": "x"})
    assert fleet.nodes["http://a:1"].authorizations == ["Bearer shared", None]


def test_interactive_sessions_stick_to_their_node_and_a_lost_session_says_so(proxy_client):
    fleet = FakeFleet(a=FakeNode(), b=FakeNode())
    client = proxy_client(fleet, routing_strategy="random")
    _add(client, "a")

    def turn(session_id: int, interactive: bool = True, **extra) -> httpx.Response:
        return client.post("/v1/chat/interactive", json={"prompt": "hi", "session_id": session_id,
                                                         "interactive_mode": interactive, **extra})

    assert turn(42).json()["node"] == turn(43).json()["node"] == "http://a:1"
    _add(client, "b")
    for _ in range(10):  # random routing would pick b about half of the time
        assert turn(42).json()["node"] == "http://a:1"
    assert turn(42, cancel=True).json()["node"] == "http://a:1"  # a cancel keeps the session
    assert _status(client)["http://a:1"]["sessions"] == 2
    assert client.post("/nodes/remove", json={"url": "http://a:1"}).status_code == 200
    lost = turn(42)
    assert lost.status_code == 410
    assert lost.json()["error"]["code"] == "session_lost" and "http://a:1" in lost.json()["error"]["message"]
    assert turn(42).json()["node"] == "http://b:1"  # sent again: starts afresh on another node
    assert turn(43, interactive=False).status_code == 200  # one-off: the lost history is not needed
    assert turn(43).status_code == 200
    assert _status(client)["http://b:1"]["sessions"] == 2
    turn(42, interactive=False)  # a one-off request ends the session
    assert _status(client)["http://b:1"]["sessions"] == 1
    fleet.nodes["http://b:1"].down = True  # 43's node stops answering: not retried elsewhere
    refused = turn(43)
    assert refused.status_code == 410 and "did not take the request" in refused.json()["error"]["message"]
    assert _status(client)["http://b:1"]["sessions"] == 0


def test_a_new_session_is_pinned_before_its_first_turn_is_answered(proxy_client):
    fleet = FakeFleet(a=FakeNode(delay=1.0), b=FakeNode(delay=1.0))
    client = proxy_client(fleet)
    _add(client, "a", "b")
    with ThreadPoolExecutor(1) as pool:
        first_turn = pool.submit(client.post, "/v1/chat/interactive",
                                 json={"prompt": "hi", "session_id": 5, "interactive_mode": True})
        deadline = time.time() + 5
        while not any(n["in_flight"] for n in _status(client).values()) and time.time() < deadline:
            time.sleep(0.02)
        holder = [url for url, n in _status(client).items() if n["in_flight"]]
        assert [url for url, n in _status(client).items() if n["sessions"]] == holder  # pinned already
        assert client.post("/v1/chat/interactive", json={"session_id": 5, "cancel": True}).json()["node"] \
            == holder[0] == first_turn.result().json()["node"]


def test_health_check_drops_a_dead_node(proxy_client):
    fleet = FakeFleet(a=FakeNode(), b=FakeNode())
    client = proxy_client(fleet, health_check_interval=0.05, max_failed_checks=3,
                          nodes=("http://a:1", "http://late:1"))
    _add(client, "b")
    assert _status(client)["http://a:1"]["healthy"] is True  # an initial node, probed at start
    fleet.nodes["http://b:1"].down = True
    deadline = time.time() + 5
    while "http://b:1" in _status(client) and time.time() < deadline:
        time.sleep(0.05)
    status = _status(client)
    assert "http://b:1" not in status
    assert status["http://late:1"]["pending"] is True  # never answered: kept, not dropped
    fleet.nodes["http://late:1"] = FakeNode(models=["late-model"])
    deadline = time.time() + 5
    while not _status(client)["http://late:1"]["healthy"] and time.time() < deadline:
        time.sleep(0.05)
    assert _status(client)["http://late:1"]["models"] == ["late-model"]
