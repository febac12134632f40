"""The proxy is secure by default (issue 8): adding and removing nodes needs a credential, the node
key reaches only nodes the operator vouched for, node URLs are checked, a failed add tells nothing of
the port it tried, the proxy listens on loopback unless told otherwise, and request bodies are
bounded. In-process against test_proxy.py's fake nodes; with real sockets where the network is
the point (port states, peer addresses, a 50 MB body)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from typing import Iterator, Optional

import httpx
import pytest

from serve_fixtures import free_port, running, stop, wait_until_healthy
from test_proxy import FakeFleet, FakeNode, _add, _status, proxy_client  # noqa: F401 (a fixture)

from tidemind.serve.proxy.app import ProxySettings, create_app

REMOTE = "203.0.113.9"  # a client on another machine (TEST-NET-3)
JSON = {"content-type": "application/json"}


@contextlib.contextmanager
def calling_from(client, host: str) -> Iterator[None]:
    """The requests of a TestClient come from `host` until the block ends (Starlette's test
    transport puts its `client` address into every request's scope)."""
    transport = client._transport
    saved, transport.client = transport.client, (host, 50000)
    try:
        yield
    finally:
        transport.client = saved


def _error(answer: httpx.Response, status: int, code: str) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code, error
    return error


# ---------------------------------------------------------------- node registration and the node key

def test_the_hijack_of_issue_8_a_stranger_cannot_register_or_remove_nodes(proxy_client):
    # The issue's probe: with client routes open (no --api-keys), a fake node registered from
    # elsewhere answered most user requests, read the prompts and was sent --node-api-key.
    fleet = FakeFleet(good=FakeNode(), evil=FakeNode())
    client = proxy_client(fleet, node_api_key="node-key", nodes=("http://good:1",))
    with calling_from(client, REMOTE):
        for answer in (client.post("/nodes/add", json={"url": "http://evil:1"}),
                       client.post("/nodes/remove", json={"url": "http://good:1"}),
                       client.post("/nodes/remove", params={"node_url": "http://good:1"})):
            error = _error(answer, 403, "registration_forbidden")
            assert "--registration-key" in error["message"] and REMOTE in error["message"]
        for i in range(20):
            prompt = {"model": "m", "messages": [{"role": "user", "content": f"my secret {i}"}]}
            assert client.post("/v1/chat/completions", json=prompt).status_code == 200
    assert fleet.nodes["http://evil:1"].requests == 0  # never probed, never sent a prompt or a key
    good = fleet.nodes["http://good:1"]
    assert len(good.bodies) == 20 and set(good.authorizations) == {"Bearer node-key"}
    assert list(_status(client)) == ["http://good:1"]


def test_a_request_relayed_by_a_reverse_proxy_on_this_machine_is_not_local(proxy_client):
    fleet = FakeFleet(evil=FakeNode())
    client = proxy_client(fleet)  # the peer is 127.0.0.1, as for nginx in front of the proxy
    for relayed in ({"X-Forwarded-For": REMOTE}, {"Forwarded": f"for={REMOTE}"}, {"X-Real-IP": REMOTE},
                    {"X-Forwarded-For": "127.0.0.1"}):
        _error(client.post("/nodes/add", json={"url": "http://evil:1"}, headers=relayed), 403,
               "registration_forbidden")
    assert fleet.nodes["http://evil:1"].requests == 0


def test_with_a_registration_key_only_that_key_manages_nodes(proxy_client):
    fleet = FakeFleet(a=FakeNode(), b=FakeNode())
    client = proxy_client(fleet, api_keys=("client-key",), registration_key="reg-key", node_api_key="node-key")
    operator, user = {"Authorization": "Bearer reg-key"}, {"Authorization": "Bearer client-key"}
    with calling_from(client, REMOTE):
        for headers in ({}, user, {"Authorization": "Bearer wrong"}, {"Authorization": "reg-key"}):
            for path in ("/nodes/add", "/nodes/remove"):
                error = _error(client.post(path, json={"url": "http://a:1"}, headers=headers), 401,
                               "invalid_registration_key")
                assert "--proxy-registration-key" in error["message"]
        assert fleet.nodes["http://a:1"].requests == 0
        _add(client, "a", headers=operator)  # from another machine: the key is what counts
        # The caller's Authorization is its registration credential: the node sees the node key instead.
        assert fleet.nodes["http://a:1"].model_list_authorizations == ["Bearer node-key"]
        assert client.post("/v1/completions", json={"model": "m"}, headers=user).status_code == 200
        assert fleet.nodes["http://a:1"].authorizations == ["Bearer node-key"]
        assert _status(client, headers=user)["http://a:1"]["trusted"] is True
        assert client.post("/nodes/remove", json={"url": "http://a:1"}, headers=operator).json()["removed"]
    # On the proxy's own machine too: once a key is configured, nothing else will do.
    _error(client.post("/nodes/add", json={"url": "http://b:1"}, headers=user), 401, "invalid_registration_key")


def test_the_node_key_goes_only_to_nodes_the_operator_vouched_for(proxy_client):
    fleet = FakeFleet(listed=FakeNode(), local=FakeNode())
    client = proxy_client(fleet, node_api_key="node-key", nodes=("http://listed:1",), routing_strategy="random")
    _add(client, "local")  # from this machine, no registration key configured: accepted, not trusted
    status = _status(client)
    assert status["http://listed:1"]["trusted"] is True and status["http://local:1"]["trusted"] is False
    assert fleet.nodes["http://local:1"].model_list_authorizations == [None]
    for _ in range(20):  # random routing: both nodes get some (all to one: p = 2^-19)
        client.post("/v1/encode", json={"input": "x"}, headers={"Authorization": "Bearer users-own-key"})
    listed, local = fleet.nodes["http://listed:1"], fleet.nodes["http://local:1"]
    assert listed.authorizations and set(listed.authorizations) == {"Bearer node-key"}
    # Without proxy --api-keys, a client's own header is what an untrusted node may see.
    assert local.authorizations and set(local.authorizations) == {"Bearer users-own-key"}
    _add(client, "listed")  # added again by someone without the key: trust stays with the listed URL
    assert _status(client)["http://listed:1"]["trusted"] is True


def test_a_client_key_of_the_proxy_is_never_passed_on_to_nodes(proxy_client):
    fleet = FakeFleet(a=FakeNode())
    client = proxy_client(fleet, api_keys=("client-key",))
    user = {"Authorization": "Bearer client-key"}
    _add(client, "a", headers=user)  # no registration key: this machine, with a client key as on any path
    client.post("/v1/encode", json={"input": "x"}, headers=user)
    node = fleet.nodes["http://a:1"]
    assert node.model_list_authorizations == [None] and node.authorizations == [None]


def test_settings_refuse_keys_that_would_open_registration():
    with pytest.raises(ValueError, match="--api-keys"):
        ProxySettings(api_keys=("k",), registration_key="k")
    with pytest.raises(ValueError, match="--registration-key is empty"):
        ProxySettings(registration_key=" ")
    with pytest.raises(ValueError, match="--max-request-bytes"):
        ProxySettings(max_request_bytes=0)


def test_keys_come_from_the_environment_and_never_show_in_help(monkeypatch):
    from tidemind.serve.openai import launch as server_launch
    from tidemind.serve.proxy import launch as proxy_launch

    monkeypatch.setenv("TIDEMIND_PROXY_REGISTRATION_KEY", "key-from-env")
    for module, flag, dest in ((proxy_launch, "--registration-key", "registration_key"),
                               (server_launch, "--proxy-registration-key", "proxy_api_key")):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert getattr(parser.parse_args([]), dest) == "key-from-env"
        assert getattr(parser.parse_args([flag, "key-from-flag"]), dest) == "key-from-flag"
        assert "key-from-env" not in parser.format_help()
        if module is server_launch:  # the flag's former name still works
            assert parser.parse_args(["--proxy-api-key", "old"]).proxy_api_key == "old"
        else:
            defaults = parser.parse_args([])
            assert defaults.server_name == "127.0.0.1" and defaults.max_request_bytes == 8 << 20


# ---------------------------------------------------------------- node URLs

def test_add_refuses_urls_that_are_not_plain_http_hosts_without_contacting_them(proxy_client):
    fleet = FakeFleet(a=FakeNode())
    client = proxy_client(fleet)
    for url in ("http://user:pw@a:1", "http://:token@a:1", "http://a:1#x", "http://a:1?x=1", "http://a:0",
                "http://a:99999", "http://a%2f:1", "ftp://a:1", "file:///etc/passwd", "javascript:alert(1)"):
        _error(client.post("/nodes/add", json={"url": url}), 400, "invalid_url")
    assert fleet.nodes["http://a:1"].requests == 0
    # One node, one spelling: trust and removal find it however it was written.
    assert client.post("/nodes/add", json={"url": "HTTP://A:01/"}).json()["url"] == "http://a:1"


def test_allowed_node_hosts_are_matched_as_written_and_others_are_never_contacted(proxy_client):
    allowed, refused = ("10.1.2.3", "gpu-1.internal", "x.cluster.local"), \
        ("169.254.169.254", "127.0.0.1", "gpu-1.internal.evil.com", "2130706433", "cluster.local", "10.1.2.3.nip.io")
    fleet = FakeFleet(**{host: FakeNode() for host in allowed + refused})
    client = proxy_client(fleet, allowed_node_hosts=("10.0.0.0/8", "GPU-1.internal", "*.cluster.local"))
    for host in allowed:
        _add(client, host)
    for host in refused:  # 2130706433 is 127.0.0.1 to a resolver; names are never resolved
        _error(client.post("/nodes/add", json={"url": f"http://{host}:1"}), 403, "node_host_not_allowed")
        assert fleet.nodes[f"http://{host}:1"].requests == 0, host
    with pytest.raises(ValueError, match="--allowed-node-hosts"):
        ProxySettings(allowed_node_hosts=("10.0.0.0/8",), nodes=("http://192.168.0.5:1",))
    with pytest.raises(ValueError, match="not a host name"):
        ProxySettings(allowed_node_hosts=("http://gpu-1:80",))


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _ports_in_every_state() -> Iterator[dict]:
    """name -> URL: a closed port, an open one that never answers, one that speaks another protocol,
    and an HTTP server that is not an api_server."""
    silent, banner = socket.socket(), socket.socket()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    for s in (silent, banner):
        s.bind(("127.0.0.1", 0))
        s.listen(8)

    def greet():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = banner.accept()
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.close()

    threading.Thread(target=greet, daemon=True).start()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        yield {name: f"http://127.0.0.1:{port}" for name, port in (
            ("closed", free_port()), ("silent", silent.getsockname()[1]), ("ssh", banner.getsockname()[1]),
            ("http", web.server_address[1]))}
    finally:
        web.shutdown()
        silent.close()
        banner.close()


def test_add_node_errors_do_not_tell_port_states_apart(caplog):
    from fastapi.testclient import TestClient

    app = create_app(ProxySettings(health_check_interval=2.0))  # the real network; probes time out after 2 s
    with _ports_in_every_state() as urls, TestClient(app, client=("127.0.0.1", 50000)) as client:
        answers = {name: client.post("/nodes/add", json={"url": url}) for name, url in urls.items()}
    seen = {(a.status_code, a.json()["error"]["code"], a.json()["error"]["message"].replace(urls[name], "URL"))
            for name, a in answers.items()}
    assert len(seen) == 1, seen
    assert seen.pop()[:2] == (400, "node_unreachable")
    for url in urls.values():  # the operator still learns why, from the proxy's log
        assert any(url in record.getMessage() and "refused to add" in record.getMessage()
                   for record in caplog.records), url


# ---------------------------------------------------------------- request size

def _json_of_size(size: int) -> bytes:
    head = b'{"model": "m", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_a_body_over_max_request_bytes_is_refused_before_it_is_parsed_or_forwarded(proxy_client):
    fleet = FakeFleet(a=FakeNode())
    client = proxy_client(fleet, max_request_bytes=1000)
    _add(client, "a")
    assert client.post("/v1/completions", content=_json_of_size(1000), headers=JSON).status_code == 200

    def chunked():  # no Content-Length: the limit counts what arrives
        yield _json_of_size(1500)

    for content in (_json_of_size(1001), b"{" * 5000, chunked()):  # not JSON: too large comes first
        error = _error(client.post("/v1/completions", content=content, headers=JSON), 413, "request_too_large")
        assert "--max-request-bytes" in error["message"]
    _error(client.post("/nodes/add", content=_json_of_size(2000), headers=JSON), 413, "request_too_large")
    assert len(fleet.nodes["http://a:1"].bodies) == 1


def test_the_body_limit_stops_reading_as_soon_as_the_limit_is_passed():
    from tidemind.serve.proxy.security import BodySizeLimit

    pulled, sent = 0, []

    async def endless_body():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not see a request over the limit")

    limited = BodySizeLimit(app, limit=10 * 1024)
    for declared, reads in ((None, 11), (b"52428800", 0)):  # chunks until past the limit; none at all
        pulled = 0
        sent.clear()
        headers = [(b"content-length", declared)] if declared else []
        asyncio.run(limited({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers},
                            endless_body, send))
        assert pulled == reads and sent[0]["status"] == 413


# ---------------------------------------------------------------- where the proxy listens (real processes)

def _non_loopback_address() -> Optional[str]:
    """An address of this machine that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks the route
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_proxy_listens_on_loopback_by_default_and_says_so(tmp_path):
    port, log = free_port(), tmp_path / "proxy.log"
    with running(["serve", "proxy", "--server-port", str(port)], port, log_path=str(log)) as proxy:
        text = log.read_text()
        assert "loopback only" in text and "--server-name 0.0.0.0" in text, text
        assert "from this machine only" in text, text
        elsewhere = _non_loopback_address()
        if elsewhere is not None:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{elsewhere}:{port}/health", timeout=5)
        # The issue's 50 MB body: refused by the default limit (8 MiB) without being read whole.
        big = httpx.post(f"{proxy}/v1/chat/completions", content=b"x" * (50 << 20), headers=JSON, timeout=60)
        _error(big, 413, "request_too_large")


@pytest.mark.skipif(_non_loopback_address() is None, reason="this machine has no non-loopback address")
def test_registration_from_another_address_is_refused_even_if_it_claims_to_be_local(tmp_path):
    address, port = _non_loopback_address(), free_port()
    url, log_path = f"http://{address}:{port}", tmp_path / "proxy.log"
    with open(log_path, "w") as log:
        # FORWARDED_ALLOW_IPS=*: uvicorn would believe anyone's X-Forwarded-For; the proxy must not.
        process = subprocess.Popen([sys.executable, "-m", "tidemind.cli.main", "serve", "proxy", "--server-name",
                                    address, "--server-port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "FORWARDED_ALLOW_IPS": "*"})
        try:
            wait_until_healthy(url, process, timeout=60)
            for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}):  # from this address, not from 127.0.0.1
                answer = httpx.post(f"{url}/nodes/add", json={"url": "http://127.0.0.1:9"}, headers=headers)
                _error(answer, 403, "registration_forbidden")
        finally:
            stop(process)
    text = log_path.read_text()
    assert f"listening on {address}" in text and "without --api-keys anyone" in text, text
