"""The GPU engine against the torch reference on tiny random models: the Triton attention backend
and kernels, eager and CUDA-graph decode, one request at a time and batched, with chunked prefill,
unquantized and with an int8 / int4 KV cache (quant_policy: the same policy on both sides, so both
store the same bytes and read the same dequantized values, except where a value lies within float32
noise of a rounding boundary: the two paths' norms and rotary differ in the last bits, so such a
value lands one step (1/255 or 1/15 of its row's range) apart; rare, but it moves a log-probability
by up to ~1e-3 (int8: 6.6e-4 seen on the tiny Gemma 3) or 17 times that (int4), hence their
tolerances).
In float32 the greedy tokens must be identical and the log-probabilities equal to ~1e-4 (different
summation orders only); in bfloat16 the logprobs agree to bf16 rounding (the greedy paths may part
at a near-tie, so only the first token is compared).

On a machine without CUDA the same engine runs its Triton path through Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1): fewer prompts and tokens, no CUDA graphs, no bfloat16
(the interpreter multiplies bfloat16 wrongly), but every line of the backend, the step buffers and
the kernels' launchers runs.
"""
from __future__ import annotations

import os
import queue

import pytest
import torch

from model_factory import make_hf_model, save_tiny_tokenizer
from tidemind import EngineConfig, GenerationConfig, pipeline

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs a CUDA device or Triton's interpreter")]

# (arch, overrides): power-of-two head dims as the Triton kernels need; windows and GQA ratios vary.
MODELS = {
    "llama-gqa2": ("llama", dict(head_dim=32)),
    "llama-gqa4": ("llama", dict(head_dim=64, num_attention_heads=8, num_key_value_heads=2, hidden_size=128)),
    "mistral-window": ("mistral", dict(head_dim=16)),
    "gemma3": ("gemma3", dict(head_dim=32)),
}
# Prompts of 1 to 75 token ids (< the tiny vocabulary), some longer than the prefill budget below.
LENGTHS = (1, 5, 17, 40, 75, 9, 33, 64) if ON_GPU else (1, 17, 40)
PROMPTS = [[1 + (7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate(LENGTHS)]
GREEDY = GenerationConfig(max_new_tokens=24 if ON_GPU else 6, ignore_eos=True, logprobs=2)
MODES = (True, False) if ON_GPU else (True,)  # eager_mode values: CUDA graphs need the GPU


@pytest.fixture(scope="module", params=sorted(MODELS) if ON_GPU else ["gemma3", "llama-gqa4"])
def model_dir(request, tmp_path_factory):
    arch, overrides = MODELS[request.param]
    path = str(tmp_path_factory.mktemp(request.param))
    make_hf_model(arch, path, seed=3, max_position_embeddings=256, **overrides)
    save_tiny_tokenizer(path)
    return path


def _generate(model_dir, dtype, backend, eager, prompts, max_batch_size=8, max_prefill=48, quant_policy=0):
    config = EngineConfig(device=DEVICE, dtype=dtype, attention_backend=backend, eager_mode=eager,
                          max_batch_size=max_batch_size, max_prefill_token_num=max_prefill,
                          cache_block_seq_len=16, session_len=200, quant_policy=quant_policy)
    with pipeline(model_dir, backend_config=config) as pipe:
        sinks = []
        for prompt in prompts:
            sink = queue.SimpleQueue()
            pipe.async_engine.submit(prompt, GREEDY, sink.put)
            sinks.append(sink)
        results = []
        for sink in sinks:
            tokens, logprobs, done = [], [], False
            while not done:
                out = sink.get(timeout=120)
                tokens += out.new_token_ids
                logprobs += out.new_logprobs or []
                done = out.finished
            results.append((tokens, logprobs))
        return results


def _assert_logprobs_close(ours, reference, atol):
    for (tokens_a, lps_a), (tokens_b, lps_b) in zip(ours, reference):
        for step, (a, b) in enumerate(zip(lps_a, lps_b)):
            if tokens_a[:step + 1] != tokens_b[:step + 1]:
                break
            for token in set(a) & set(b):
                assert a[token] == pytest.approx(b[token], abs=atol), (step, token)


def test_float32_triton_equals_reference_eager_and_in_graphs(model_dir):
    reference = _generate(model_dir, "float32", "reference", True, PROMPTS)
    for eager in MODES:
        triton = _generate(model_dir, "float32", "triton", eager, PROMPTS)
        assert [t for t, _ in triton] == [t for t, _ in reference], f"eager={eager}"
        _assert_logprobs_close(triton, reference, atol=2e-4)


@pytest.mark.parametrize("quant_policy", [8, 4])
def test_float32_triton_equals_reference_with_a_quantized_kv_cache(model_dir, quant_policy):
    reference = _generate(model_dir, "float32", "reference", True, PROMPTS, quant_policy=quant_policy)
    for eager in MODES:
        triton = _generate(model_dir, "float32", "triton", eager, PROMPTS, quant_policy=quant_policy)
        assert [t for t, _ in triton] == [t for t, _ in reference], f"eager={eager}"
        _assert_logprobs_close(triton, reference, atol={8: 2e-3, 4: 3e-2}[quant_policy])


def test_batch_size_and_chunking_never_change_greedy_tokens(model_dir):
    eager = not ON_GPU
    alone = [_generate(model_dir, "float32", "triton", eager, [p], max_prefill=512)[0][0] for p in PROMPTS[:4]]
    squeezed = _generate(model_dir, "float32", "triton", eager, PROMPTS[:4], max_batch_size=3, max_prefill=16)
    assert [t for t, _ in squeezed] == alone


@pytest.mark.skipif(not ON_GPU, reason="Triton's interpreter multiplies bfloat16 wrongly")
def test_bfloat16_triton_matches_reference_to_bf16_rounding(model_dir):
    reference = _generate(model_dir, "bfloat16", "reference", True, PROMPTS)
    triton = _generate(model_dir, "bfloat16", "triton", False, PROMPTS)
    assert sum(a[0][0] == b[0][0] for a, b in zip(triton, reference)) >= len(PROMPTS) - 1
    _assert_logprobs_close(triton, reference, atol=0.1)
