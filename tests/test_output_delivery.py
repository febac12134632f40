"""How outputs travel from the engine thread to event loops: one wake-up of a loop per engine step
for all its requests, and a slow reader's queued deltas merged per request. No model here: a
stand-in engine returns scripted outputs."""
from __future__ import annotations

import threading
import types

from tidemind.engine.async_engine import AsyncEngine, LoopSink
from tidemind.messages import RequestOutput
from tidemind.serve.openai.generation import merge_outputs


def _out(rid, text, finished=False, tokens=None, logprobs=None):
    return RequestOutput(rid, tokens or [len(text)], text, 3, 1, new_logprobs=logprobs, finished=finished,
                         finish_reason="stop" if finished else None)


class ScriptedEngine:
    """Takes any request; once `expected` requests were added, each step() returns the next
    scripted list of outputs."""

    def __init__(self, steps, expected):
        self.steps = list(steps)
        self.expected = expected
        self.added = 0
        self.stepped = threading.Event()
        self.executor = types.SimpleNamespace(add_failure_listener=lambda callback: None)  # never dies alone

    def validate_request(self, *args):
        pass

    def add_request(self, *args):
        self.added += 1

    def has_unfinished_requests(self):
        return self.added >= self.expected and bool(self.steps)

    def step(self):
        if self.added < self.expected:
            return []
        outputs = self.steps.pop(0) if self.steps else []
        if not self.steps:
            self.stepped.set()
        return outputs

    def abort_all(self, error):
        pass

    def close(self):
        pass


class RecordingLoop:
    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, fn, *args):
        self.calls.append((fn, args))


def test_a_steps_outputs_reach_each_loop_in_one_wakeup():
    loops = [RecordingLoop(), RecordingLoop()]
    received = []
    engine = ScriptedEngine([[_out(1, "a"), _out(2, "b"), _out(3, "c")], [_out(1, "d", finished=True)]], expected=3)
    async_engine = AsyncEngine(engine)
    try:
        # request ids are handed out from 1: requests 1 and 3 read on loop 0, request 2 on loop 1
        for loop in (loops[0], loops[1], loops[0]):
            async_engine.submit([1, 2], None, LoopSink(loop, received.append))
        assert engine.stepped.wait(5)
    finally:
        async_engine.close()
    assert [len(loop.calls) for loop in loops] == [2, 1]  # steps 1 and 2 for loop 0, step 1 for loop 1
    for fn, args in loops[0].calls + loops[1].calls:
        fn(*args)
    assert sorted(out.new_text for out in received) == ["a", "b", "c", "d"]


def test_queued_deltas_merge_per_request_in_order():
    batch = [(0, _out(7, "Hel", tokens=[1], logprobs=[{1: -0.1}])), (1, _out(8, "x")),
             (0, _out(7, "lo", tokens=[2], logprobs=[{2: -0.2}])), (0, _out(7, "!", finished=True, tokens=[3],
                                                                        logprobs=[{3: -0.3}]))]
    merged = merge_outputs(batch)
    assert [index for index, _ in merged] == [0, 1]
    first = merged[0][1]
    assert (first.new_text, first.new_token_ids, first.finished) == ("Hello!", [1, 2, 3], True)
    assert first.new_logprobs == [{1: -0.1}, {2: -0.2}, {3: -0.3}]
    assert merged[1][1].new_text == "x"
