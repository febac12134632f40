"""`tidemind bench serve`: metric arithmetic on synthetic timestamps, the SSE client against an
in-process fake server (httpx.MockTransport), and the whole command against a real api_server."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from serve_fixtures import api_server, free_port
from tidemind.bench.serve_settings import ServeBenchSettings, arrival_offsets, request_bodies
from tidemind.bench.serve_client import SSEParser, _StreamState, normalize_url
from tidemind.bench.serve_metrics import RequestRecord, percentile, summarize
from tidemind.bench.serve_report import dumps
from tidemind.bench.serve_runner import run_benchmark
from tidemind.bench.workloads import t1_prompts

# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.2, 9.0, 4.0, 4.0, 7.5, 1.0, 3.3], list(range(100))])
def test_percentile_matches_numpy(values):
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


def _record(index=0, sent=10.0, chunks=((10.5, 1), (10.6, 1), (10.8, 2)), end=10.9, usage=None, error=None):
    r = RequestRecord(index=index, sent_s=sent, end_s=end, chunks=list(chunks), error=error)
    r.usage_output_tokens = usage
    return r


def test_request_metrics_on_synthetic_timestamps():
    r = _record()
    assert r.output_tokens == 4  # counted from chunks: 1 + 1 + 2
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(0.9)
    assert r.tpot_s == pytest.approx((0.9 - 0.5) / 3)
    # the two-token chunk's 0.2 s gap stands for two tokens of 0.1 s
    assert r.itls_s() == pytest.approx([0.1, 0.1, 0.1])
    assert _record(usage=6).output_tokens == 6  # the server's usage wins over chunk counting
    assert _record(usage=6).tpot_s == pytest.approx(0.4 / 5)
    assert _record(chunks=[(10.5, 1)]).tpot_s is None  # one token: no TPOT
    assert _record(chunks=[]).ttft_s is None
    # the results file keeps every number; reading a record back gives the same metrics
    text = dumps({"r": r.to_json(run_start_s=9.0)})
    assert '"chunk_s": [0.5, 0.6, 0.8]' in text and '"chunk_tokens": [1, 1, 2]' in text
    back = RequestRecord.from_json(json.loads(text)["r"])
    assert back.itls_s() == pytest.approx(r.itls_s()) and back.tpot_s == pytest.approx(r.tpot_s)
    assert json.loads(text)["r"]["sent_at_s"] == pytest.approx(1.0)


def test_summary_counts_failures_and_throughput():
    records = [_record(i, sent=10.0 + i, chunks=[(10.5 + i, 1), (10.6 + i, 1), (10.8 + i, 2)], end=10.9 + i)
               for i in range(3)]
    records.append(_record(3, chunks=[], error="HTTP 500: boom"))
    s = summarize(records, duration_s=4.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert s["request_throughput"] == pytest.approx(3 / 4.0)
    assert s["output_tokens"] == 12 and s["output_throughput"] == pytest.approx(3.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0) and s["ttft_ms"]["count"] == 3
    assert s["itl_ms"]["count"] == 9 and s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(400 / 3, abs=1e-3)
    json.dumps(s, allow_nan=False)
    empty = summarize([_record(error="x")], 1.0)
    assert empty["ttft_ms"]["p50"] is None and empty["completed"] == 0


def test_sse_parser_and_token_counting():
    parser = SSEParser()
    events = [parser.feed(line) for line in [": keep-alive", "data: {\"a\":", "data: 1}", "", "event: x",
                                             "data:[DONE]\r\n", "\r\n"]]
    assert [e for e in events if e is not None] == ['{"a":\n1}', "[DONE]"]
    assert parser.feed("data: tail") is None and parser.flush() == "tail"

    record = RequestRecord(index=0)
    state = _StreamState(record)  # vLLM-style cumulative usage on every chunk: tokens per chunk

    def chunk(text, tokens, finish=None):
        return json.dumps({"choices": [{"delta": {"content": text}, "finish_reason": finish}],
                           "usage": {"prompt_tokens": 7, "completion_tokens": tokens}})
    for t, (text, tokens) in enumerate([("He", 1), ("llo wor", 3), ("ld", 4)]):
        state.event(chunk(text, tokens, "length" if tokens == 4 else None), float(t))
    state.event("[DONE]", 3.0)
    assert [n for _, n in record.chunks] == [1, 2, 1]
    assert (record.output_tokens, record.usage_prompt_tokens, record.finish_reason, state.done) == (4, 7, "length", True)


def test_arrivals_and_bodies():
    assert arrival_offsets(5, math.inf, 0) == [0.0] * 5
    offsets = arrival_offsets(512, 4.0, 0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[1] == pytest.approx(np.random.default_rng(0).exponential(0.25))
    assert 0.2 < offsets[-1] / 511 < 0.3  # mean gap 1 / rate
    c2 = request_bodies(ServeBenchSettings(url="http://x", num_prompts=34).resolved(), "m")
    assert len(c2) == 34 and c2[32]["messages"] == c2[0]["messages"]
    assert c2[0]["max_tokens"] == 128 and c2[0]["ignore_eos"] and c2[0]["stream"]
    s1 = request_bodies(ServeBenchSettings(url="http://x", workload="S1", num_prompts=3).resolved(), "m")
    assert [b["prompt"] for b in s1] == t1_prompts(49152, 3) and s1[0]["max_tokens"] == 256
    with pytest.raises(ValueError, match="--request-rate"):
        ServeBenchSettings(url="http://x", request_rates=[0.0]).resolved()
    with pytest.raises(ValueError, match="--num-prompts 512"):
        request_bodies(ServeBenchSettings(url="http://x", workload="S1", num_prompts=513).resolved(), "m")
    assert normalize_url("http://h:1/v1/") == "http://h:1"
    with pytest.raises(ValueError, match="--url"):
        normalize_url("h:1")

# ---------------------------------------------------------------------------- fake server


class FakeServer:
    """An OpenAI-ish chat server in-process: `tokens` one-word chunks spaced `gap` s apart, a usage
    chunk, [DONE]; request number `fail_index` answers HTTP 500. Records the peak concurrency."""

    def __init__(self, gap=0.01, fail_index=None, key=None):
        self.gap, self.fail_index, self.key = gap, fail_index, key
        self.in_flight = self.peak = self.posts = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        self.posts += 1
        if self.posts - 1 == self.fail_index:
            return httpx.Response(500, json={"error": {"message": "engine exploded"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._stream(body))

    async def _stream(self, body):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for i in range(body["max_tokens"]):
                await asyncio.sleep(self.gap)
                finish = "length" if i == body["max_tokens"] - 1 else None
                yield f"data: {json.dumps({'choices': [{'delta': {'content': f'w{i} '}, 'finish_reason': finish}]})}\n\n".encode()
            usage = {"prompt_tokens": 5, "completion_tokens": body["max_tokens"], "total_tokens": 5 + body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.in_flight -= 1


def test_runner_against_fake_server_counts_failures_and_limits_concurrency():
    fake = FakeServer(fail_index=3)  # the warm-up is post 0, so run request 2 fails
    settings = ServeBenchSettings(url="http://fake", num_prompts=6, max_tokens=5, concurrency=2, progress=False)
    result = run_benchmark(settings, command="test", transport=httpx.MockTransport(fake.handle))
    assert fake.peak == 2
    (run,) = result["runs"]
    s = run["summary"]
    assert (s["requests"], s["completed"], s["failed"]) == (6, 5, 1)
    assert list(s["errors"]) == ["HTTP 500: engine exploded"]
    assert [r["index"] for r in run["requests"]] == list(range(6))
    assert not run["requests"][2]["ok"] and run["requests"][2]["output_tokens"] == 0
    assert s["output_tokens"] == 25 and s["input_tokens"] == 25
    assert 0.01 <= s["ttft_ms"]["p50"] / 1000 and s["itl_ms"]["p50"] >= 9.0
    assert result["model"] == "fake-model" and "api_key" not in result["settings"]
    json.dumps(result, allow_nan=False)


def test_user_errors_name_the_fix():
    fake = FakeServer(key="sekrit")
    base = dict(url="http://fake", num_prompts=1, max_tokens=2, progress=False)
    with pytest.raises(RuntimeError, match="--api-key"):
        run_benchmark(ServeBenchSettings(**base), transport=httpx.MockTransport(fake.handle))
    with pytest.raises(ValueError, match=r"serves \['fake-model'\].*--model"):
        run_benchmark(ServeBenchSettings(**base, model="gpt-9", api_key="sekrit"), transport=httpx.MockTransport(fake.handle))
    ok = run_benchmark(ServeBenchSettings(**base, api_key="sekrit"), transport=httpx.MockTransport(fake.handle))
    assert ok["runs"][0]["summary"]["completed"] == 1

# ---------------------------------------------------------------------------- real server


def _bench(*args, timeout=300):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tidemind.cli.main", "bench", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    # generous: the fixture converts the GGUF into a fresh cache, on a machine that may be busy
    with api_server(log_path=str(log), timeout=300) as url:
        yield url


def test_c2_against_tidemind_server(server_url, tmp_path):
    out = tmp_path / "c2.json"
    proc, wall = _bench("--url", server_url, "--workload", "C2", "--num-prompts", "4", "--max-tokens", "8",
                        "--concurrency", "2", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["command"].startswith("tidemind bench serve --url") and result["url"] == server_url
    (run,) = result["runs"]
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (4, 0)
    assert s["output_tokens"] == 4 * 8 and all(r["output_tokens"] == 8 for r in run["requests"])
    assert all(r["finish_reason"] == "length" and r["ttft_s"] > 0 for r in run["requests"])
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < s[name]["p50"] <= s[name]["p99"], name
    assert 0 < s["duration_s"] < wall
    assert s["request_throughput"] == pytest.approx(4 / s["duration_s"], rel=1e-3)
    assert s["output_throughput"] == pytest.approx(32 / s["duration_s"], rel=1e-3)
    # the slowest request ends the run; requests start after the run's start
    assert max(r["e2e_s"] for r in run["requests"]) <= s["duration_s"] + 1e-6
    assert "4/4 requests ok" in proc.stdout


def test_s1_token_id_prompts_at_two_rates(server_url, tmp_path):
    out = tmp_path / "s1"
    proc, _ = _bench("--url", server_url + "/v1", "--workload", "S1", "--num-prompts", "2", "--max-tokens", "4",
                     "--request-rate", "8", "inf", "--out", str(out), "--no-progress", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "s1.json").read_text())
    assert (tmp_path / "s1.png").exists()
    assert [r["request_rate"] for r in result["runs"]] == ["8", "inf"]
    lengths = [len(p) for p in t1_prompts(49152, 2)]
    for run in result["runs"]:
        assert run["summary"]["completed"] == 2 and run["summary"]["output_tokens"] == 8
        # token-id prompts reach the model as given: the server counts exactly T1's lengths
        assert [r["usage_prompt_tokens"] for r in run["requests"]] == lengths


def test_cli_user_errors(server_url, tmp_path):
    proc, _ = _bench("--url", server_url, "--model", "no-such-model", "--num-prompts", "1", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--model" in proc.stderr and "no-such-model" in proc.stderr
    proc, _ = _bench("--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "cannot reach" in proc.stderr and "--url" in proc.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
