"""Tensor parallelism on the bundled real models, on the CPU (gloo, one worker process per rank):
greedy outputs at tp > 1 equal tp 1's, through pipeline() and through `tidemind serve api_server`.

SmolLM2-135M has 9 attention heads on 3 kv heads: tp 3 is the smallest size that splits it (tp 2
is refused, naming 1, 3 and 9). Gemma-3-270M has 4 heads on one kv head: at tp 2 each rank holds 2
query heads and a replica of the kv head. float32 (DESIGN.md: near-tied first tokens): tensor
parallelism only changes summation order (the row-parallel partial sums), ~1e-6 on the logits.
"""
from __future__ import annotations

import functools

import httpx
import pytest

from hf_reference import bench_prompts
from serve_fixtures import api_server
from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.loader import CheckpointError

pytestmark = pytest.mark.slow

GREEDY = GenerationConfig(max_new_tokens=32)
GEMMA = "gemma3-270m"
GEMMA_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
GEMMA_GREEDY = GenerationConfig(max_new_tokens=16)


def _config(**fields) -> EngineConfig:
    return EngineConfig(dtype="float32", device="cpu", session_len=512, **fields)


@functools.lru_cache(maxsize=None)
def _greedy(model, prompts: tuple, tp: int):
    with pipeline(model, backend_config=_config(tp=tp)) as pipe:
        return [r.token_ids for r in pipe(list(prompts), GREEDY)]


@functools.lru_cache(maxsize=None)
def _gemma(tp: int):
    """[(prompt ids, Response)] of GEMMA_PROMPTS (the base model: the text as is)."""
    with pipeline(GEMMA, backend_config=_config(tp=tp), chat_template="base") as pipe:
        return list(zip([pipe.encode_prompt(p) for p in GEMMA_PROMPTS], pipe(list(GEMMA_PROMPTS), GEMMA_GREEDY)))


def test_smollm2_at_tp3_answers_like_tp1():
    prompts = tuple(bench_prompts()[:8])
    expected = _greedy(None, prompts, 1)
    assert _greedy(None, prompts, 3) == expected
    assert sum(map(len, expected)) > 8 * 16  # real answers, not early stops


def test_smollm2_at_tp2_is_refused_naming_the_sizes_that_split_it():
    with pytest.raises(CheckpointError, match=r"num_attention_heads=9 is not divisible by tp=2, .*\(1, 3, 9\)"):
        pipeline(backend_config=_config(tp=2))


def test_gemma3_at_tp2_answers_like_tp1():
    expected = [r.token_ids for _, r in _gemma(1)]
    assert [r.token_ids for _, r in _gemma(2)] == expected
    assert all(len(ids) == GEMMA_GREEDY.max_new_tokens for ids in expected)


def test_api_server_at_tp2_answers_like_tp1(tmp_path):
    """One request to `serve api_server --tp 2`: the prompt sent as the pipeline's token ids (the same
    input), the answer's text equal to the in-process tp 1 pipeline's."""
    prompt_ids, expected = _gemma(1)[0]
    with api_server("--tp", "2", model=GEMMA, log_path=str(tmp_path / "tp2.log")) as url:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        response = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": model, "prompt": prompt_ids, "max_tokens": GEMMA_GREEDY.max_new_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected.text
    assert "2 tensor-parallel ranks (mp executor, gloo) ready" in (tmp_path / "tp2.log").read_text()
