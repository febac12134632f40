"""The bundled SmolLM2 through the whole engine: greedy output equals Hugging Face transformers'.

Checked for all 32 prompts of benchmarks/prompts.jsonl with the chat template, 64 new tokens,
float32: one prompt at a time, all 32 batched together, and with a KV cache so small that
requests are preempted (and prompts prefilled in chunks mixed with decodes).
"""
from __future__ import annotations

import functools

import pytest

from hf_reference import bench_prompts, hf_chat_prompt_ids, hf_greedy
from tidemind import EngineConfig, GenerationConfig, pipeline

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
GREEDY = GenerationConfig(max_new_tokens=NEW_TOKENS)


@functools.lru_cache(maxsize=1)
def reference_outputs():
    prompts = bench_prompts()
    return [hf_greedy(hf_chat_prompt_ids(p), NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def pipe():
    with pipeline(backend_config=EngineConfig(dtype="float32", device="cpu")) as p:
        yield p


def _assert_matches_reference(responses):
    expected = reference_outputs()
    mismatches = [i for i, (r, e) in enumerate(zip(responses, expected)) if r.token_ids != e]
    assert not mismatches, "\n".join(
        f"prompt {i}: ours {responses[i].token_ids} != transformers {expected[i]}" for i in mismatches)


def test_prompt_tokens_equal_transformers_chat_template(pipe):
    for prompt in bench_prompts():
        assert pipe.encode_prompt(prompt) == hf_chat_prompt_ids(prompt)


def test_greedy_one_at_a_time_equals_transformers(pipe):
    _assert_matches_reference([pipe(p, GREEDY) for p in bench_prompts()])


def test_greedy_batched_equals_transformers(pipe):
    responses = pipe(bench_prompts(), GREEDY)
    _assert_matches_reference(responses)
    for r in responses:
        assert r.finish_reason in ("stop", "length")
        assert r.generate_token_len == len(r.token_ids)
    assert pipe.engine.block_manager.num_free_blocks == pipe.engine.block_manager.num_total_blocks


def test_greedy_under_preemption_and_chunked_prefill_equals_transformers():
    # 24 blocks x 16 tokens = 384 tokens of KV for 32 sequences of ~100-130 tokens each: at most
    # three fit at once, so requests are preempted and recomputed; a 48-token budget splits
    # every prompt into chunks that share steps with other sequences' decodes.
    config = EngineConfig(dtype="float32", device="cpu", num_gpu_blocks=24, cache_block_seq_len=16,
                          session_len=384, max_prefill_token_num=48)
    with pipeline(backend_config=config) as small:
        responses = small(bench_prompts(), GREEDY)
        assert small.engine.scheduler.num_preemptions > 0
        assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_total_blocks
    _assert_matches_reference(responses)
