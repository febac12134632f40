"""Prefix caching and KV swap on the bundled SmolLM2 (float32, CPU): greedy outputs are the same
with them on as with prefix caching off, batched, under preemption, with swap to host memory, and
for a chat session whose KV went to the host between turns; the api_server's /metrics counts the
hits and the swaps.

The prompts share a long system message, so that the prefix cache has something to find; the
reference is the same engine with prefix caching off and a roomy cache (test_engine_e2e.py checks
that one against transformers).
"""
from __future__ import annotations

import functools
import threading

import httpx
import pytest

from hf_reference import bench_prompts
from serve_fixtures import api_server, metrics
from tidemind import EngineConfig, GenerationConfig, pipeline

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer briefly and plainly. " * 8  # ~100 tokens: 6 blocks of 16
GREEDY = GenerationConfig(max_new_tokens=64)
# 24 blocks x 16 tokens for 16 sequences of ~150-200 tokens: requests are preempted, and a
# 48-token budget prefills prompts in chunks mixed with other requests' decodes.
SMALL = dict(num_gpu_blocks=24, cache_block_seq_len=16, session_len=384, max_prefill_token_num=48)


def _prompts():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in bench_prompts()[:16]]


def _config(**fields) -> EngineConfig:
    return EngineConfig(dtype="float32", device="cpu", **fields)


@functools.lru_cache(maxsize=1)
def reference():
    with pipeline(backend_config=_config(enable_prefix_caching=False, cache_block_seq_len=16)) as pipe:
        return [r.token_ids for r in pipe(_prompts(), GREEDY)]


def _assert_same(responses):
    expected = reference()
    mismatched = [i for i, (r, e) in enumerate(zip(responses, expected)) if r.token_ids != e]
    assert not mismatched, "\n".join(f"prompt {i}: {responses[i].token_ids} != {expected[i]}" for i in mismatched)


def test_batched_with_prefix_caching_equals_without():
    with pipeline(backend_config=_config(enable_prefix_caching=True, cache_block_seq_len=16)) as pipe:
        first = pipe(_prompts()[:1], GREEDY)  # its blocks are cached when the batch arrives
        responses = pipe(_prompts(), GREEDY)
        stats = pipe.engine.stats()
    _assert_same(first + responses[1:])
    assert responses[0].token_ids == first[0].token_ids
    # every prompt of the batch found the system message's blocks; the first found nearly all of itself
    assert stats["prefix_cache_hits_total"] >= 16 * 6 * 16 and stats["kv_blocks_cached"] > 0


@pytest.mark.parametrize("fields", [
    dict(enable_prefix_caching=True), dict(enable_prefix_caching=True, num_cpu_blocks=64),
    dict(enable_prefix_caching=False, num_cpu_blocks=64)], ids=["cache", "cache+swap", "swap"])
def test_under_preemption_with_caching_or_swap_equals_without(fields):
    with pipeline(backend_config=_config(**SMALL, **fields)) as pipe:
        responses = pipe(_prompts(), GREEDY)
        stats = pipe.engine.stats()
        assert pipe.engine.block_manager.num_free_blocks == pipe.engine.block_manager.num_total_blocks
    _assert_same(responses)
    assert stats["num_preemptions"] > 0
    if fields["enable_prefix_caching"]:
        assert stats["prefix_cache_hits_total"] > 0
    if fields.get("num_cpu_blocks"):
        assert stats["swap_out_blocks_total"] > 0 and stats["swap_in_blocks_total"] > 0
        assert stats["cpu_blocks_free"] == stats["cpu_blocks_total"] == 64


def test_chat_session_swapped_to_the_host_between_turns_answers_like_a_fresh_prompt():
    greedy = GenerationConfig(max_new_tokens=24)
    with pipeline(backend_config=_config(**SMALL, num_cpu_blocks=128)) as pipe:
        session = pipe.chat("Name a fruit that is red.", gen_config=greedy)
        first = session.response
        pipe(_prompts()[:8], GREEDY)  # fills the cache: the idle session's pin goes to the host
        before = pipe.engine.stats()
        assert before["kv_blocks_in_idle_sessions"] == 0 and before["cpu_blocks_free"] < 128
        session = pipe.chat("And one that is yellow?", session=session, gen_config=greedy)
        after = pipe.engine.stats()
        # all of the first turn but its last token came back from the host
        assert after["cached_prompt_tokens_total"] - before["cached_prompt_tokens_total"] == \
            first.input_token_len + first.generate_token_len - 1
        assert after["swap_in_blocks_total"] > before["swap_in_blocks_total"]
        fresh = pipe(session.history[:-1], greedy)
        assert fresh.token_ids == session.response.token_ids
        pipe.end_session(session)


def test_metrics_count_prefix_cache_hits_and_swaps(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()] + ["--num-cpu-blocks", "64"]
    with api_server(*flags, log_path=str(tmp_path / "api_server.log")) as url:
        start = metrics(url)
        assert start["tidemind_kv_cache_cpu_blocks_total"] == 64 and start["tidemind_prefix_cache_hits_total"] == 0

        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        statuses = []

        def ask(prompt):
            body = {"model": model, "messages": prompt, "max_tokens": 96, "temperature": 0, "ignore_eos": True}
            statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).status_code)

        threads = [threading.Thread(target=ask, args=(p,)) for p in _prompts()[:8]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8
        m = metrics(url)
        assert m["tidemind_num_preemptions_total"] > 0 and m["tidemind_kv_swap_out_blocks_total"] > 0
        assert m["tidemind_prefix_cache_hits_total"] > 0 and 0 < m["tidemind_prefix_cache_hit_rate"] < 1
        assert m["tidemind_prefix_cache_queries_total"] >= m["tidemind_prefix_cache_hits_total"]
        assert m["tidemind_kv_cache_blocks_cached"] > 0
        assert m["tidemind_kv_cache_blocks_free"] == m["tidemind_kv_cache_blocks_total"]  # cached blocks are free
