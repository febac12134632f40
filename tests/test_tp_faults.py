"""A tensor-parallel rank that dies or hangs, on a tiny Llama at tp 2 (gloo): every in-flight request
gets an error within a bounded time, new submissions are refused, no rank is left running, and the
api_server reports 503 on /health and exits with code 1. Never a hang.

Faults come from engine/faults.py's rank points, handed to the worker processes through
TIDEMIND_INJECT_FAULTS (each rank reads it at start): "rank<N>.step=K:exit" ends rank N's process
in its K-th step, ":hang" makes it sleep there until killed. A rank that hangs is declared hung after
--distributed-timeout seconds (here 4): its peers' collectives time out then too.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
import time

import httpx
import pytest

from serve_fixtures import api_server, running
from tp_helpers import tiny_prompts, tiny_tp_model
from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.engine.async_engine import EngineDeadError

TIMEOUT_S = 4.0  # --distributed-timeout of these tests
BOUND_S = TIMEOUT_S + 20.0  # from the fault to every caller's error: the timeout, stopping ranks, slack
GREEDY = GenerationConfig(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_tp_model(str(tmp_path_factory.mktemp("tiny-tp")))


def _pipe(model: str, monkeypatch, faults: str = ""):
    monkeypatch.setenv("TIDEMIND_INJECT_FAULTS", faults)  # read by the worker processes, not this one
    return pipeline(model, backend_config=EngineConfig(dtype="float32", device="cpu", session_len=96, tp=2,
                                                       distributed_timeout=TIMEOUT_S))


def _submit(pipe, prompts):
    sinks = [queue.SimpleQueue() for _ in prompts]
    for prompt, sink in zip(prompts, sinks):
        pipe.async_engine.submit(pipe.tokenizer.encode(prompt), GREEDY, sink.put)
    return sinks


def _final(sink, timeout: float):
    while True:
        out = sink.get(timeout=timeout)
        if out.finished:
            return out


def _all_gone(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.parametrize("fault", ["rank1.step=3:exit", "rank0.step=3:exit", "rank1.step=3:hang",
                                   "rank0.step=3:hang"])
def test_a_rank_that_dies_or_hangs_fails_every_in_flight_request(model, monkeypatch, fault):
    with _pipe(model, monkeypatch, fault) as pipe:
        pids = pipe.engine.executor.worker_pids
        start = time.monotonic()
        finals = [_final(sink, BOUND_S) for sink in _submit(pipe, tiny_prompts(4))]
        elapsed = time.monotonic() - start
        assert all(out.finish_reason == "error" for out in finals), [out.finish_reason for out in finals]
        assert elapsed < BOUND_S
        if fault.endswith("hang"):
            assert elapsed >= TIMEOUT_S * 0.9  # declared hung by the timeout, not by anything sooner
        assert "tensor-parallel rank" in pipe.async_engine.failure
        with pytest.raises(EngineDeadError):
            pipe.async_engine.submit(pipe.tokenizer.encode("t5 t6"), GREEDY, lambda out: None)
        assert _all_gone(pids), "a rank was left running"


def test_a_rank_killed_while_the_engine_idles_is_noticed_at_once(model, monkeypatch):
    with _pipe(model, monkeypatch) as pipe:
        assert pipe(tiny_prompts(1)[0], GREEDY).finish_reason == "length"
        died = threading.Event()
        pipe.async_engine.on_failure.append(lambda reason: died.set())
        os.kill(pipe.engine.executor.worker_pids[1], signal.SIGKILL)
        assert died.wait(10), "the engine did not notice a rank that died while it idled"
        assert "rank 1" in pipe.async_engine.failure and "SIGKILL" in pipe.async_engine.failure
        assert _all_gone(pipe.engine.executor.worker_pids)


# ---- the api_server ------------------------------------------------------------------------------
def _stream(url: str, prompt: str, results: list) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": "m", "prompt": prompt, "max_tokens": 40, "ignore_eos": True, "stream": True}) as r:
            results.append((r.status_code, r.read().decode()))
    except httpx.TransportError as exc:  # the server went away mid-stream: an error too
        results.append((None, repr(exc)))


def _server_args():
    return ("--tp", "2", "--distributed-timeout", str(TIMEOUT_S), "--session-len", "96", "--model-name", "m")


@pytest.mark.parametrize("fault", ["rank1.step=4:hang", "rank1.step=4:exit"])
def test_api_server_with_a_failed_rank_errors_its_requests_turns_unhealthy_and_exits(model, tmp_path, fault):
    log = tmp_path / "server.log"
    with api_server(*_server_args(), model=model, log_path=str(log), env={"TIDEMIND_INJECT_FAULTS": fault}) as url:
        process = running.process
        assert httpx.get(f"{url}/health").status_code == 200
        results: list = []
        start = time.monotonic()
        clients = [threading.Thread(target=_stream, args=(url, p, results)) for p in tiny_prompts(3)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(BOUND_S)
        assert len(results) == 3 and time.monotonic() - start < BOUND_S
        # every stream ends in an error: an error status, an error event, or the connection closed
        assert all(code != 200 or '"error"' in body for code, body in results), results
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            assert health.status_code == 503
        except httpx.TransportError:
            pass  # already gone
        assert process.wait(timeout=BOUND_S) == 1
    assert "tensor-parallel" in log.read_text()


def test_api_server_exits_when_a_rank_is_killed_while_idle(model, tmp_path):
    log = tmp_path / "server.log"
    with api_server(*_server_args(), model=model, log_path=str(log)) as url:
        process = running.process
        assert httpx.get(f"{url}/health").status_code == 200
        workers = [int(pid) for pid in open(f"/proc/{process.pid}/task/{process.pid}/children").read().split()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        assert process.wait(timeout=BOUND_S) == 1
    assert "SIGKILL" in log.read_text()
