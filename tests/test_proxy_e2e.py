"""`tidemind serve proxy` end to end: a proxy in front of two real api_servers on the bundled
SmolLM2 (one registered through --proxy-url, one through POST /nodes/add), driven with the official
`openai` client; one node is stopped to check retries and the health check.

The tests share one cluster and run in file order: the dead-node test stops node B, so it comes
after the tests that need both nodes."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import List

import httpx
import pytest

from serve_fixtures import api_server, free_port, running, stop, wait_until_healthy

pytestmark = pytest.mark.slow


def _node_command(port: int, *extra: str) -> List[str]:
    return [sys.executable, "-m", "tidemind.cli.main", "serve", "api_server", "--server-name", "127.0.0.1",
            "--server-port", str(port), "--device", "cpu", "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A proxy (health checks every second), node A that registered itself with --proxy-url, and
    node B added with POST /nodes/add, which the tests may terminate (its Popen is `b_process`)."""
    from tidemind.loader.resolve import resolve_model

    resolve_model(None)  # converts the bundled GGUF once here, not in both servers at the same time
    logs = tmp_path_factory.mktemp("proxy-e2e")
    port = free_port()
    proxy_command = ["serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
                     "--health-check-interval", "1", "--log-level", "INFO"]
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(running(proxy_command, port, log_path=str(logs / "proxy.log")))
        b_port = free_port()
        b_log = stack.enter_context(open(logs / "node-b.log", "w"))
        # B loads while A does (the two share the 2 cores, but start in about the time of one).
        b_process = subprocess.Popen(_node_command(b_port), stdout=b_log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stack.callback(stop, b_process)
        a = stack.enter_context(api_server("--proxy-url", proxy, log_path=str(logs / "node-a.log")))
        b = f"http://127.0.0.1:{b_port}"
        wait_until_healthy(b, b_process)
        added = httpx.post(f"{proxy}/nodes/add", json={"url": b}, timeout=30)
        assert added.status_code == 200, added.text
        deadline = time.time() + 30
        while a not in _live_status(proxy) and time.time() < deadline:  # A registers in the background
            time.sleep(0.2)
        assert set(_live_status(proxy)) == {a, b}, open(logs / "proxy.log").read()[-3000:]
        # Closed before the proxy stops: an open keep-alive connection would hold its shutdown.
        client = stack.enter_context(_openai(proxy))
        yield SimpleNamespace(proxy=proxy, a=a, b=b, b_process=b_process, client=client,
                              model=added.json()["models"][0])


def _live_status(proxy: str, headers=None) -> dict:
    return {n["url"]: n for n in httpx.get(f"{proxy}/nodes/status", headers=headers, timeout=10).json()["nodes"]}


def _openai(base: str, key: str = "unused"):
    import openai

    # max_retries=0: the client must not hide a failed request by sending it again itself.
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _ask(client, model: str, i: int, stream: bool) -> str:
    messages = [{"role": "user", "content": f"Count from {i} to {i + 5}."}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                              temperature=0).choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_e2e_requests_spread_over_both_nodes(cluster):
    client = cluster.client
    assert [m.id for m in client.models.list().data] == [cluster.model]
    before = {url: n["served"] for url, n in _live_status(cluster.proxy).items()}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _ask(client, cluster.model, i, stream=i % 2 == 0), range(8)))
    assert all(answers), answers
    after = _live_status(cluster.proxy)
    served = {url: after[url]["served"] - before[url] for url in before}
    assert sum(served.values()) == 8 and min(served.values()) >= 1, served
    assert all(n["in_flight"] == 0 and n["latency"]["samples"] > 0 for n in after.values())


def test_e2e_a_stream_arrives_chunk_by_chunk(cluster):
    arrivals = []
    stream = cluster.client.completions.create(model=cluster.model, prompt="Once upon a time",
                                                       max_tokens=24, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic())
    # A buffered relay would hand over every chunk at once, at the end.
    assert len(arrivals) >= 10 and arrivals[-1] - arrivals[0] > 0.2, arrivals


def _aborted_on_nodes(cluster) -> float:
    total = 0.0
    for url in (cluster.a, cluster.b):
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith('tidemind_requests_total{finish_reason="abort"}'):
                total += float(line.split()[-1])
    return total


def test_e2e_a_client_that_goes_away_stops_the_generation_on_the_node(cluster):
    aborted = _aborted_on_nodes(cluster)
    long_request = {"model": cluster.model, "prompt": "Once upon a time", "max_tokens": 400,
                    "ignore_eos": True, "stream": True}  # 400 tokens: well over 5 s on the CPU
    with httpx.stream("POST", f"{cluster.proxy}/v1/completions", json=long_request, timeout=60) as answer:
        first = next(answer.iter_lines())
        assert answer.status_code == 200 and first.startswith("data: "), first
    deadline = time.time() + 5  # the node ends the request as aborted, not after its 400 tokens
    while _aborted_on_nodes(cluster) == aborted and time.time() < deadline:
        time.sleep(0.1)
    assert _aborted_on_nodes(cluster) == aborted + 1
    assert all(n["in_flight"] == 0 for n in _live_status(cluster.proxy).values())


def test_e2e_errors_pass_through_and_unknown_models_get_404(cluster):
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        cluster.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    direct = httpx.post(f"{cluster.a}/v1/completions", json={"model": cluster.model, "prompt": "x", "max_tokens": -1})
    proxied = httpx.post(f"{cluster.proxy}/v1/completions", json={"model": cluster.model, "prompt": "x",
                                                                 "max_tokens": -1})
    assert proxied.status_code == direct.status_code == 400 and proxied.json() == direct.json()
    encoded = httpx.post(f"{cluster.proxy}/v1/encode", json={"input": "hello world"}, timeout=30)
    assert encoded.json() == httpx.post(f"{cluster.b}/v1/encode", json={"input": "hello world"}).json()


def test_e2e_interactive_session_sticks_to_one_node(cluster):
    turn = {"session_id": 4242, "interactive_mode": True, "max_tokens": 8, "temperature": 0}
    first = httpx.post(f"{cluster.proxy}/v1/chat/interactive", json={**turn, "prompt": "My name is Ada."},
                       timeout=120)
    assert first.status_code == 200, first.text
    holder = [url for url, n in _live_status(cluster.proxy).items() if n["sessions"] == 1]
    assert len(holder) == 1
    with httpx.stream("POST", f"{cluster.proxy}/v1/chat/interactive", timeout=120,
                      json={**turn, "prompt": "What is my name?", "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert len(lines) > 1 and lines[-1]["history_tokens"] > 0  # the second turn found the first's history
    ended = httpx.post(f"{cluster.proxy}/v1/chat/interactive", json={"session_id": 4242, "prompt": ""}, timeout=60)
    assert ended.status_code == 200 and _live_status(cluster.proxy)[holder[0]]["sessions"] == 0


def test_e2e_a_dead_node_is_routed_around_then_dropped_and_remove_works(cluster):
    # Runs last of the cluster's tests (pytest keeps file order): it stops node B.
    # A second proxy, given both nodes with --nodes, whose health check will not run during the test:
    # requests sent to the dead B must be retried on A. Fresh, it spreads the first two requests
    # over the two nodes (equal estimates, then one in flight on the first).
    port = free_port()
    with running(["serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port), "--nodes",
                  cluster.a, cluster.b, "--health-check-interval", "600"], port) as proxy, _openai(proxy) as client:
        assert all(n["healthy"] for n in _live_status(proxy).values())
        stop(cluster.b_process)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: _ask(client, cluster.model, i, stream=i % 2 == 1), range(6)))
        assert all(answers), answers
        status = httpx.get(f"{proxy}/nodes/status").json()
        nodes = {n["url"]: n for n in status["nodes"]}
        # Every request that went to B (concurrent ones may have gone together) moved on to A.
        assert status["retried_requests"] == nodes[cluster.b]["failed_starts"] >= 1
        assert nodes[cluster.a]["served"] == 6 and not nodes[cluster.b]["healthy"]
    # The cluster's proxy (health checks every second) drops B after three failed checks.
    deadline = time.time() + 20
    while cluster.b in _live_status(cluster.proxy) and time.time() < deadline:
        time.sleep(0.25)
    assert list(_live_status(cluster.proxy)) == [cluster.a]
    assert _ask(cluster.client, cluster.model, 1, stream=True)
    removed = httpx.post(f"{cluster.proxy}/nodes/remove", json={"url": cluster.a}, timeout=10)
    assert removed.status_code == 200 and _live_status(cluster.proxy) == {}
    assert cluster.client.models.list().data == []
    no_node = httpx.post(f"{cluster.proxy}/v1/completions", json={"model": cluster.model, "prompt": "x"}, timeout=10)
    assert no_node.status_code == 404 and no_node.json()["error"]["code"] == "model_not_found"


def test_e2e_proxy_api_keys_and_registration_key(monkeypatch):
    import openai

    # Read by the proxy's --registration-key and the api_server's --proxy-registration-key alike:
    # the key is on no command line.
    monkeypatch.setenv("TIDEMIND_PROXY_REGISTRATION_KEY", "reg-secret")
    port = free_port()
    with running(["serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
                  "--api-keys", "sesame"], port) as proxy:
        user = {"Authorization": "Bearer sesame"}
        assert httpx.get(f"{proxy}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError) as refused, _openai(proxy, key="wrong") as client:
            client.models.list()
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
        # a client's key does not let it add nodes, not even from the proxy's own machine
        for headers in ({}, user):
            added = httpx.post(f"{proxy}/nodes/add", json={"url": "http://127.0.0.1:9"}, headers=headers)
            assert added.status_code == 401 and added.json()["error"]["code"] == "invalid_registration_key"
        with _openai(proxy, key="sesame") as client:
            assert client.models.list().data == []
        # an api_server registers itself with the registration key, and its answers flow through
        with api_server("--proxy-url", proxy) as node:
            deadline = time.time() + 30  # registration runs once the node listens, maybe after /health answers
            while not _live_status(proxy, headers=user) and time.time() < deadline:
                time.sleep(0.2)
            assert [(n["url"], n["trusted"]) for n in _live_status(proxy, headers=user).values()] == [(node, True)]
            with _openai(proxy, key="sesame") as client:
                answer = client.completions.create(model=client.models.list().data[0].id, prompt="Hi", max_tokens=3)
            assert answer.usage.completion_tokens == 3
