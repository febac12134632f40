"""The engine in a process of its own (pipeline(engine_process=True), the api_server's way on a GPU)
against the engine in a thread of the caller: the same greedy text for batches, streams and a
two-turn session; the caller's errors raised in the caller; a killed engine process fails its
callers at once; close() leaves no process behind."""
from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from tidemind import EngineConfig, GenerationConfig, pipeline

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, who are you?", "Write a haiku about the sea.", "What is 2 + 2?"]
GREEDY = GenerationConfig(max_new_tokens=24, do_sample=False)
CONFIG = dict(dtype="float32", device="cpu", session_len=256, max_batch_size=8)


@pytest.fixture(scope="module")
def pipes():
    with pipeline(backend_config=EngineConfig(**CONFIG)) as here, \
            pipeline(backend_config=EngineConfig(**CONFIG), engine_process=True) as apart:
        yield here, apart


def test_batches_streams_and_sessions_answer_as_in_process(pipes):
    here, apart = pipes
    assert [r.text for r in apart(PROMPTS, gen_config=GREEDY)] == [r.text for r in here(PROMPTS, gen_config=GREEDY)]
    ids = here.encode_prompt(PROMPTS[1])
    streamed = list(apart.async_engine.stream(ids, GREEDY))
    assert len(streamed) > 1 and streamed[-1].finished  # deltas, one a step, as in process
    assert "".join(o.new_text for o in streamed) == "".join(o.new_text for o in here.async_engine.stream(ids, GREEDY))
    turns = {}
    for name, pipe in (("here", here), ("apart", apart)):
        session = pipe.chat("My name is Ada. Say hello.", gen_config=GREEDY)
        session = pipe.chat("What is my name?", session=session, gen_config=GREEDY)
        turns[name] = [m["content"] for m in session.history]
        pipe.end_session(session)
    assert turns["apart"] == turns["here"]
    deadline = time.monotonic() + 10  # the engine applies end_session before its next step
    stats = apart.engine.stats()
    while stats["kv_blocks_free"] < stats["kv_blocks_total"] and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = apart.engine.stats()
    assert stats["generated_tokens_total"] > 0 and stats["num_sessions"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_errors_are_raised_in_the_caller_with_the_engines_words(pipes):
    here, apart = pipes
    too_long = list(range(1, 300))
    with pytest.raises(ValueError, match="shorten the prompt or raise --session-len"):
        apart.async_engine.submit(too_long, GREEDY, lambda out: None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apart.async_engine.submit([10**7], GREEDY, lambda out: None)
    # a session's length is known here from the engine's outputs: a turn that would overflow it is refused
    outputs = queue.SimpleQueue()
    apart.async_engine.submit(list(range(1, 200)), GenerationConfig(max_new_tokens=8, ignore_eos=True),
                              outputs.put, session_id=77)
    while not outputs.get(timeout=60).finished:
        pass
    with pytest.raises(ValueError, match="session 77 holds 207 tokens"):
        apart.async_engine.submit(list(range(1, 60)), GREEDY, lambda out: None, session_id=77)
    apart.async_engine.end_session(77)
    apart.async_engine.submit(list(range(1, 60)), GREEDY, outputs.put, session_id=77)  # a fresh session now
    while not outputs.get(timeout=60).finished:
        pass
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        pipeline("/no/such/model", engine_process=True)


def test_a_killed_engine_process_fails_its_callers_at_once():
    pipe = pipeline(backend_config=EngineConfig(**CONFIG), engine_process=True)
    client = pipe.async_engine
    failures = []
    client.on_failure.append(failures.append)
    outputs = queue.SimpleQueue()
    long_run = GenerationConfig(max_new_tokens=200, ignore_eos=True)
    client.submit(pipe.encode_prompt(PROMPTS[0]), long_run, outputs.put)
    first = outputs.get(timeout=60)
    assert not first.finished
    os.kill(client._proc.pid, signal.SIGKILL)
    start = time.monotonic()
    out = first
    while not out.finished:
        out = outputs.get(timeout=30)
    assert out.finish_reason == "error" and "killed by SIGKILL" in out.error
    assert time.monotonic() - start < 20
    assert not client.is_alive and len(failures) == 1 and "engine process" in failures[0]
    with pytest.raises(RuntimeError, match="the engine stopped after a failure"):
        client.submit([1, 2, 3], GREEDY, lambda out: None)
    pipe.close()


def test_close_ends_the_engine_process_and_what_ran_gets_a_final_output():
    pipe = pipeline(backend_config=EngineConfig(**CONFIG), engine_process=True)
    client = pipe.async_engine
    outputs = queue.SimpleQueue()
    client.submit(pipe.encode_prompt(PROMPTS[0]), GenerationConfig(max_new_tokens=200, ignore_eos=True), outputs.put)
    assert not outputs.get(timeout=60).finished
    process = client._proc
    pipe.close()
    assert process.poll() == 0
    out = outputs.get(timeout=5)
    while not out.finished:
        out = outputs.get(timeout=5)
    assert out.finish_reason == "error"
