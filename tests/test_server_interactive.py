"""POST /v1/chat/interactive (LMDeploy's stateful chat) on the bundled SmolLM2: a second turn reuses
the first turn's KV and answers as a fresh full prompt would; cancel stops a running turn; the end
call frees the KV; a client that leaves mid-turn leaves the session usable. The server registers
with a (fake) proxy given by --proxy-url."""
from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import pytest

from serve_fixtures import api_server, metrics

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "request_output_len": 24}
LONG = {"temperature": 0, "request_output_len": 400, "ignore_eos": True}


class _FakeProxy(http.server.BaseHTTPRequestHandler):
    """Records the POSTs a `tidemind serve proxy` would get from an api_server started with --proxy-url."""

    calls: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.calls.append((self.path, json.loads(body or b"null")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module", params=["--no-engine-process", "--engine-process"])
def server(tmp_path_factory, request):
    """A server registered with a (fake) proxy: it must say so at start and at shutdown. Its engine
    runs in a thread of the server, then in a process of its own (the sessions' lengths live there)."""
    _FakeProxy.calls = []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    log = str(tmp_path_factory.mktemp("server") / "api_server.log")
    try:
        with api_server("--session-len", "1024", "--proxy-url", proxy_url, request.param, log_path=log) as url:
            # registration runs once the socket listens, so it may finish just after /health answers
            assert wait_until(lambda: _FakeProxy.calls == [("/nodes/add", {"url": url})], timeout=5)
            yield url
        assert _FakeProxy.calls == [("/nodes/add", {"url": url}), ("/nodes/remove", {"url": url})]
    finally:
        proxy.shutdown()


def post(url: str, body: dict, **kw) -> dict:
    response = httpx.post(f"{url}/v1/chat/interactive", json=body, timeout=120, **kw)
    assert response.status_code == 200, response.text
    return response.json()


def turn(url: str, session_id: int, prompt, **kw) -> dict:
    return post(url, {"prompt": prompt, "session_id": session_id, "interactive_mode": True, **GREEDY, **kw})


def end(url: str, session_id: int) -> dict:
    return post(url, {"prompt": "", "session_id": session_id, "interactive_mode": False})


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def all_blocks_free(url: str) -> bool:
    m = metrics(url)
    return m["tidemind_kv_cache_blocks_free"] == m["tidemind_kv_cache_blocks_total"]


def stream_lines(url: str, body: dict):
    """The NDJSON objects of a streamed turn, as they arrive."""
    with httpx.stream("POST", f"{url}/v1/chat/interactive", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
        for line in response.iter_lines():
            if line:
                yield json.loads(line)


def test_second_turn_reuses_the_kv_and_answers_like_a_fresh_full_prompt(server):
    assert all_blocks_free(server)
    cached_before = metrics(server)["tidemind_cached_prompt_tokens_total"]
    first = turn(server, 11, "Name a fruit that is red.")
    assert first["history_tokens"] == 0 and first["finish_reason"] == "stop" and first["tokens"] > 1
    kept = metrics(server)
    assert kept["tidemind_num_sessions"] == 1 and kept["tidemind_kv_cache_blocks_idle_sessions"] > 0

    lines = list(stream_lines(server, {"prompt": "And one that is yellow?", "session_id": 11,
                                       "interactive_mode": True, **GREEDY}))
    second = {**lines[-1], "text": "".join(line["text"] for line in lines)}
    assert [line["finish_reason"] for line in lines[:-1]] == [None] * (len(lines) - 1)
    assert [line["tokens"] for line in lines] == sorted(line["tokens"] for line in lines)
    # all of the first turn but its last generated token came from the session's KV
    assert second["history_tokens"] == first["input_tokens"] + first["tokens"] - 1 > 0
    assert second["input_tokens"] > first["input_tokens"] + first["tokens"]
    assert metrics(server)["tidemind_cached_prompt_tokens_total"] - cached_before == second["history_tokens"]

    conversation = [{"role": "user", "content": "Name a fruit that is red."},
                    {"role": "assistant", "content": first["text"]},
                    {"role": "user", "content": "And one that is yellow?"}]
    fresh = post(server, {"prompt": conversation, "session_id": -1, **GREEDY})
    assert fresh["history_tokens"] == 0 and fresh["input_tokens"] == second["input_tokens"]
    assert (fresh["text"], fresh["tokens"]) == (second["text"], second["tokens"])

    assert end(server, 11)["finish_reason"] is None
    assert wait_until(lambda: all_blocks_free(server)), "the end call did not free the session's KV"
    assert metrics(server)["tidemind_num_sessions"] == 0
    # the id starts a new conversation: no history
    assert turn(server, 11, "Hi!", request_output_len=2)["history_tokens"] == 0
    end(server, 11)


@pytest.fixture(scope="module")
def control(server):
    """Two short turns of a session with nothing in between: what a session whose middle turn was
    cancelled (or abandoned) must answer, since the engine forgets an aborted turn but keeps the
    conversation's KV."""
    first = turn(server, 20, "Say one word.", request_output_len=4)
    second = turn(server, 20, "Say another word.", request_output_len=4)
    end(server, 20)
    return first, second


def _after_an_aborted_turn(server, session_id: int, control) -> None:
    after = turn(server, session_id, "Say another word.", request_output_len=4)
    assert (after["input_tokens"], after["text"]) == (control[1]["input_tokens"], control[1]["text"])
    # the aborted turn gave the conversation's KV back: this turn reuses it as the control's did
    assert after["history_tokens"] == control[1]["history_tokens"] > 0
    end(server, session_id)
    assert wait_until(lambda: all_blocks_free(server))


def test_cancel_stops_a_running_turn_and_the_session_goes_on(server, control):
    assert turn(server, 21, "Say one word.", request_output_len=4)["text"] == control[0]["text"]
    running = stream_lines(server, {"prompt": "Count to a thousand.", "session_id": 21, "interactive_mode": True,
                                    **LONG})
    next(running)
    busy = httpx.post(f"{server}/v1/chat/interactive", json={"prompt": "Hi", "session_id": 21,
                                                             "interactive_mode": True})
    assert busy.status_code == 400 and "busy" in busy.json()["error"]["message"]
    started = time.time()
    assert post(server, {"session_id": 21, "cancel": True})["finish_reason"] == "abort"
    rest = list(running)
    assert rest[-1]["finish_reason"] == "abort" and rest[-1]["tokens"] < 400 and time.time() - started < 10
    assert post(server, {"session_id": 21, "cancel": True})["finish_reason"] is None  # nothing running now
    _after_an_aborted_turn(server, 21, control)


def test_client_leaving_mid_turn_aborts_it_and_leaves_the_session_usable(server, control):
    turn(server, 31, "Say one word.", request_output_len=4)
    running = stream_lines(server, {"prompt": "Count to a thousand.", "session_id": 31, "interactive_mode": True,
                                    **LONG})
    next(running)
    running.close()  # the connection is closed mid-turn: the server aborts the turn
    assert wait_until(lambda: metrics(server)["tidemind_num_requests_running"] == 0, timeout=5)
    # the session stays busy until the engine has confirmed the abort (cancel says whether a turn runs)
    assert wait_until(lambda: post(server, {"session_id": 31, "cancel": True})["finish_reason"] is None)
    _after_an_aborted_turn(server, 31, control)


def test_one_off_requests_and_session_rules(server):
    turn(server, 41, "Hello!", request_output_len=2)
    # interactive_mode=false with the id of a kept session ends it first, then answers afresh
    one_off = post(server, {"prompt": "Hello!", "session_id": 41, **GREEDY, "request_output_len": 2})
    assert one_off["history_tokens"] == 0
    assert wait_until(lambda: metrics(server)["tidemind_num_sessions"] == 0)
    for body, fragment in [({"prompt": "Hi", "interactive_mode": True}, "session_id"),
                           ({"prompt": "", "session_id": 5, "interactive_mode": True}, "empty"),
                           ({"prompt": "Hi", "session_id": 5, "temperature": -1}, "temperature")]:
        response = httpx.post(f"{server}/v1/chat/interactive", json=body)
        assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text


def test_concurrent_sessions_keep_their_own_conversations(server):
    results = {}

    def converse(session_id: int, name: str):
        turn(server, session_id, f"My name is {name}. Say hi.", request_output_len=8)
        results[session_id] = turn(server, session_id, "What is my name?", request_output_len=8)
        end(server, session_id)

    threads = [threading.Thread(target=converse, args=(50 + i, name)) for i, name in enumerate(("Ada", "Bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [50, 51] and all(r["history_tokens"] > 0 for r in results.values())
    assert wait_until(lambda: all_blocks_free(server))
