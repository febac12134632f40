"""Failure containment in the engine, by fault injection (tidemind/engine/faults.py) on the bundled
SmolLM2: a failure tied to one request fails it alone, a failed step fails that step's requests and
the engine goes on, and an engine that cannot go on fails every caller at once (never a hang)."""
from __future__ import annotations

import queue
import time

import pytest

from fake_runner import all_blocks_free_soon
from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.engine.async_engine import EngineDeadError
from tidemind.engine.faults import FAULTS

pytestmark = pytest.mark.slow

GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)
PROMPTS = [[1, 504, 3458, 30], [1, 2683, 314, 260, 3575], [1, 9690, 2683], [1, 504, 1033, 31, 12, 88]]


def _pipe(**config):
    return pipeline(backend_config=EngineConfig(dtype="float32", device="cpu", session_len=256, **config))


def _collect(engine, prompts, timeout: float = 60.0):
    """Submit all prompts at once; returns per prompt (token ids, finish_reason, error)."""
    sinks = [queue.SimpleQueue() for _ in prompts]
    for prompt, sink in zip(prompts, sinks):
        engine.submit(prompt, GREEDY, sink.put)
    results = []
    for sink in sinks:
        tokens = []
        while True:
            out = sink.get(timeout=timeout)
            tokens += out.new_token_ids
            if out.finished:
                results.append((tokens, out.finish_reason, out.error))
                break
    return results


@pytest.fixture(autouse=True)
def no_faults_left():
    FAULTS.clear()
    yield
    FAULTS.clear()


@pytest.fixture(scope="module")
def solo():
    """Each prompt's greedy tokens, run alone with no fault."""
    with _pipe() as pipe:
        return [_collect(pipe.async_engine, [p])[0][0] for p in PROMPTS]


# overlap: the engine's overlapped loop (engine.py), where a failure can hit a step while the one
# before it is still to be collected
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])


@OVERLAP
def test_a_failure_making_one_output_fails_that_request_alone(solo, overlap):
    with _pipe(overlap_schedule=overlap) as pipe:
        FAULTS.inject("output", at=9)  # the 9th output of the run: a token of one of the 4 requests
        results = _collect(pipe.async_engine, PROMPTS)
        failed = [i for i, (_, reason, _) in enumerate(results) if reason == "error"]
        assert len(failed) == 1
        for i, (tokens, reason, error) in enumerate(results):
            if i in failed:
                assert "server log" in error and "InjectedFault" not in error
            else:
                assert (tokens, reason) == (solo[i], "length")
        assert all_blocks_free_soon(pipe.engine.block_manager)
        assert _collect(pipe.async_engine, PROMPTS[:1])[0][0] == solo[0]  # the engine goes on


@OVERLAP
def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(solo, overlap):
    # Two requests run at a time: the failed step holds the first two, the other two wait.
    with _pipe(max_batch_size=2, overlap_schedule=overlap) as pipe:
        FAULTS.inject("execute", at=3)
        results = _collect(pipe.async_engine, PROMPTS)
        assert [reason for _, reason, _ in results] == ["error", "error", "length", "length"]
        assert [tokens for tokens, _, _ in results[2:]] == solo[2:]
        assert all_blocks_free_soon(pipe.engine.block_manager)
        assert pipe.async_engine.is_alive
        assert [r[0] for r in _collect(pipe.async_engine, PROMPTS[:2])] == solo[:2]


def test_an_engine_that_cannot_go_on_fails_every_caller_at_once():
    with _pipe(max_batch_size=2) as pipe:
        engine = pipe.async_engine
        reasons = []
        engine.on_failure.append(reasons.append)
        FAULTS.inject("execute", at=2)
        FAULTS.inject("recovery", at=1)  # the cleanup of the failed step fails too
        start = time.monotonic()
        results = _collect(engine, PROMPTS, timeout=10.0)
        assert time.monotonic() - start < 10.0
        assert all(reason == "error" for _, reason, _ in results)
        assert not engine.is_alive and engine.failure and reasons == [engine.failure]
        with pytest.raises(EngineDeadError, match="restart"):
            engine.submit(PROMPTS[0], GREEDY, lambda out: None)


@OVERLAP
def test_requests_that_leave_an_empty_engine_give_their_runner_rows_back(solo, overlap):
    # Each lone request is aborted, so the step after it schedules nothing: the runner must still
    # be told it left, or its batch rows (max_batch_size of them) run out.
    with _pipe(max_batch_size=2, overlap_schedule=overlap) as pipe:
        engine = pipe.async_engine
        for _ in range(5):
            outputs = engine.stream(PROMPTS[0], GREEDY.replace(max_new_tokens=200))
            next(outputs)
            outputs.close()  # aborts the request, still running: it has 199 tokens to go
            # the abort was applied before the next request arrives
            assert all_blocks_free_soon(pipe.engine.block_manager)
        assert _collect(engine, PROMPTS[:1])[0] == (solo[0], "length", None)
        assert len(pipe.engine.executor.runner.batch) <= 1
