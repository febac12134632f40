"""The engine's overlapped loop (engine.py: step N+1 scheduled and launched before step N's tokens
are applied) against its plain loop, on the bundled SmolLM2: the same tokens and texts under
preemption, chunked prefill, stops, random sampling, penalties, logprobs, grammars, sessions, the
prefix cache and host swap; and the overlap really happens (the call order the executor sees)."""
from __future__ import annotations

from typing import Dict, List

import pytest

from tidemind import EngineConfig, GenerationConfig
from tidemind.engine.engine import Engine

pytestmark = pytest.mark.slow

# A cache of 10 blocks of 16 tokens for 8 requests of up to ~70 tokens: preemption is certain.
TIGHT = dict(num_gpu_blocks=10, cache_block_seq_len=16, max_batch_size=8, max_prefill_token_num=48)


def _engine(overlap: bool, **config) -> Engine:
    return Engine(None, EngineConfig(overlap_schedule=overlap, session_len=256, **config))


def _prompts(engine: Engine, n: int) -> List[List[int]]:
    return [engine.tokenizer.encode(f"Question {i}: what is {i} plus {i * 3}? " * (1 + i % 3)) for i in range(n)]


def _run(engine: Engine, requests: Dict[int, tuple]) -> Dict[int, tuple]:
    """Run {request_id: (prompt, GenerationConfig[, session_id])} to the end:
    {request_id: (tokens, text, finish_reason, logprobs)}; checks that no KV block leaks."""
    for rid, (prompt, gen, *session) in requests.items():
        engine.add_request(rid, prompt, gen, session_id=session[0] if session else None)
    tokens: Dict[int, list] = {rid: [] for rid in requests}
    texts: Dict[int, str] = {rid: "" for rid in requests}
    logprobs: Dict[int, list] = {rid: [] for rid in requests}
    reasons: Dict[int, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.new_text
            logprobs[out.request_id] += out.new_logprobs or []
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], texts[rid], reasons[rid], logprobs[rid]) for rid in requests}


def _assert_no_leak(engine: Engine) -> None:
    bm = engine.block_manager
    in_sessions = engine.scheduler.sessions.num_cached_blocks
    assert bm.num_free_blocks + in_sessions == bm.num_total_blocks
    engine.scheduler.check_invariants()


def _both(make_requests, **config):
    results = []
    for overlap in (False, True):
        engine = _engine(overlap, **config)
        assert engine.overlap is overlap
        results.append(_run(engine, make_requests(engine)))
        _assert_no_leak(engine)
        preemptions = engine.scheduler.num_preemptions
        engine.close()
    return results, preemptions


def test_greedy_outputs_equal_under_preemption_chunking_and_stops():
    def requests(engine):
        gens = [GenerationConfig(max_new_tokens=12 + 5 * (i % 4), ignore_eos=i % 2 == 0,
                                 stop_words=["\n\n"] if i % 3 == 0 else None) for i in range(8)]
        return {i: (p, g) for i, (p, g) in enumerate(zip(_prompts(engine, 8), gens))}

    (plain, overlapped), preemptions = _both(requests, **TIGHT)
    assert preemptions > 0, "the cache was meant to force preemption"
    assert overlapped == plain


def test_sampling_penalties_logprobs_and_grammars_equal_with_greedy_rows_beside_them():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    gens = [GenerationConfig(max_new_tokens=16, ignore_eos=True),  # greedy: stays on the device
            GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, random_seed=5),
            GenerationConfig(max_new_tokens=16, do_sample=True, top_k=20, temperature=1.2, random_seed=7, logprobs=3),
            GenerationConfig(max_new_tokens=16, do_sample=True, repetition_penalty=1.3, min_p=0.05, temperature=0.7,
                             random_seed=9),
            GenerationConfig(max_new_tokens=24, response_format={"type": "json_schema",
                                                                  "json_schema": {"name": "n", "schema": schema}}),
            GenerationConfig(max_new_tokens=16, ignore_eos=True, logprobs=2)]

    def requests(engine):
        return {i: (p, g) for i, (p, g) in enumerate(zip(_prompts(engine, len(gens)), gens))}

    (plain, overlapped), _ = _both(requests, **TIGHT)
    assert overlapped == plain
    assert plain[4][1].startswith("{") and plain[2][3], "the grammar and the logprobs were meant to apply"


def test_sessions_prefix_cache_and_host_swap_equal():
    def requests(engine):
        prompts = _prompts(engine, 6)
        out = {i: (prompts[i], GenerationConfig(max_new_tokens=10, ignore_eos=True), 100 + i % 2) for i in range(2)}
        out.update({i: (prompts[0] + prompts[i], GenerationConfig(max_new_tokens=14)) for i in range(2, 6)})
        return out

    def two_turns(engine):
        first = requests(engine)
        results = _run(engine, first)
        second = {10 + i: (engine.tokenizer.encode(f" and then {i}?"), GenerationConfig(max_new_tokens=8), 100 + i)
                  for i in range(2)}
        results.update(_run(engine, second))
        return results

    outcomes = []
    for overlap in (False, True):
        engine = _engine(overlap, num_cpu_blocks=16, **TIGHT)
        outcomes.append(two_turns(engine))
        assert engine.scheduler.num_hit_tokens > 0, "prompts sharing a prefix were meant to hit the prefix cache"
        _assert_no_leak(engine)
        engine.close()
    assert outcomes[1] == outcomes[0]


class _CallLog:
    """Wraps an executor, recording the calls the engine makes."""

    def __init__(self, executor, log):
        self._executor, self._log = executor, log

    def __getattr__(self, name):
        attr = getattr(self._executor, name)
        if name in ("prepare", "launch", "collect", "execute"):
            def logged(*args):
                self._log.append(name)
                return attr(*args)
            return logged
        return attr


def test_the_next_step_is_launched_before_the_previous_one_is_collected():
    engine = _engine(True)
    log: List[str] = []
    engine.executor = _CallLog(engine.executor, log)
    _run(engine, {0: (_prompts(engine, 1)[0], GenerationConfig(max_new_tokens=5, ignore_eos=True))})
    # step 1 (the prompt) launches; each later step launches before the one before it is collected
    assert log[:2] == ["prepare", "launch"]
    assert log[2:5] == ["prepare", "launch", "collect"]
    assert "execute" not in log and log.count("launch") == 5 and log.count("collect") == 5
