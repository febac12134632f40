"""Our models on a paged KV cache vs Hugging Face's full-sequence forward, per architecture.

Every check runs a prompt in two prefill chunks (the second attends to cached context) and then
single-token decode steps, on a KV cache with block_size 4 and shuffled block ids.

Tolerance: float32 logits must agree within ATOL = 1e-4. The two implementations compute the
same function and differ only in summation order (merged qkv / gate_up matmuls, SDPA vs eager
softmax, where the residual add happens), i.e. a few float32 ulps per op: observed max |diff| is
~1e-6 on logits of magnitude ~2. 1e-4 keeps ~50x headroom for BLAS differences across machines;
a real error (rope pairing, a dropped bias, the window off by one, a missing (1 + w)) moves
logits by more than 1e-2 (see test_sliding_window_matters for the window).
"""
from __future__ import annotations

import json

import pytest
import torch

from model_factory import (VOCAB, PagedKV, hf_config, hf_logits, make_hf_model, randomize_, run_step,
                           write_internlm2_from_llama)
from tidemind.loader import load_model

ATOL = 1e-4
PROMPT_LEN, CHUNK, DECODE_STEPS = 20, 11, 4
CPU = torch.device("cpu")


def tokens(n: int, seed: int = 5) -> list:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunked_then_decode(model, model_config, toks) -> torch.Tensor:
    """Logits of every position: prefill [0, CHUNK), prefill [CHUNK, PROMPT_LEN), then one token per step."""
    kv = PagedKV(model_config)
    rows = run_step(model, kv, [(0, toks[:CHUNK])]) + run_step(model, kv, [(0, toks[CHUNK:PROMPT_LEN])])
    for i in range(PROMPT_LEN, len(toks)):
        rows += run_step(model, kv, [(0, toks[i:i + 1])])
    return torch.cat(rows)


def assert_matches_hf(model_dir: str, hf_model, toks=None) -> None:
    toks = toks or tokens(PROMPT_LEN + DECODE_STEPS)
    model, model_config = load_model(model_dir, torch.float32, CPU)
    ours = chunked_then_decode(model, model_config, toks)
    ref = hf_logits(hf_model, toks)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.std() > 100 * ATOL  # logits carry signal far above the tolerance
    diff = (ours - ref).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff:.2e} >= {ATOL}"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
def test_chunked_prefill_and_decode_match_hf(arch, tmp_path):
    hf = make_hf_model(arch, str(tmp_path), seed=1)
    assert_matches_hf(str(tmp_path), hf)


@pytest.mark.parametrize("bias", [True, False])
def test_internlm2_packed_wqkv_matches_llama(bias, tmp_path):
    # InternLM2 is not in transformers: the same weights as a Llama (same math) are the reference.
    llama = make_hf_model("llama", str(tmp_path / "llama"), seed=2, head_dim=None, attention_bias=bias,
                          mlp_bias=False)
    write_internlm2_from_llama(llama, str(tmp_path / "internlm2"))
    assert_matches_hf(str(tmp_path / "internlm2"), llama)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
], ids=lambda rope: rope["rope_type"])
def test_rope_types_match_hf(rope, tmp_path):
    hf = make_hf_model("llama", str(tmp_path), seed=3, rope_parameters=dict(rope))
    assert_matches_hf(str(tmp_path), hf)


def test_old_style_rope_config(tmp_path):
    # transformers 4 wrote rope_theta + rope_scaling at the top level of config.json
    hf = make_hf_model("llama", str(tmp_path), seed=4,
                       rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 5000.0})
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "linear", "factor": rope["factor"]})
    path.write_text(json.dumps(config))
    assert_matches_hf(str(tmp_path), hf)


def test_gemma3_old_style_config(tmp_path):
    # Gemma 3 before transformers 5: rope_theta / rope_local_base_freq / rope_scaling and
    # sliding_window_pattern instead of rope_parameters and layer_types.
    hf = make_hf_model("gemma3", str(tmp_path), seed=6,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                        "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                           "rope_theta": 300000.0}})
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for key in ("rope_parameters", "layer_types"):
        config.pop(key)
    config.update(rope_theta=300000.0, rope_local_base_freq=20000.0, sliding_window_pattern=3,
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    path.write_text(json.dumps(config))
    assert_matches_hf(str(tmp_path), hf)


def test_gemma3_multimodal_checkpoint_text_part(tmp_path):
    import transformers

    text = hf_config("gemma3", final_logit_softcapping=None).to_dict()  # HF's multimodal head never softcaps
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(7)
    hf = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    randomize_(hf, 7, gemma_norms=True)
    hf.tie_weights()
    hf.save_pretrained(str(tmp_path))
    assert_matches_hf(str(tmp_path), hf, tokens(PROMPT_LEN + 2))


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_matters(arch, tmp_path):
    # The prompt is longer than the window, so the window changes HF's logits well beyond ATOL:
    # the comparisons above would catch a model that ignored it.
    windowed = make_hf_model(arch, str(tmp_path / "a"), seed=1)
    full = make_hf_model(arch, str(tmp_path / "b"), seed=1, sliding_window=64)
    toks = tokens(PROMPT_LEN)
    assert (hf_logits(windowed, toks) - hf_logits(full, toks)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_decode_and_mixed_steps(arch, tmp_path):
    hf = make_hf_model(arch, str(tmp_path), seed=8)
    model, model_config = load_model(str(tmp_path), torch.float32, CPU)
    seqs = {0: tokens(17, seed=10), 1: tokens(14, seed=11), 2: tokens(9, seed=12)}
    kv = PagedKV(model_config, seed=3)
    got = {seq_id: [] for seq_id in seqs}

    def step(batch):  # batch: [(seq_id, start, end)], decodes first as the runner orders them
        outs = run_step(model, kv, [(s, seqs[s][a:b]) for s, a, b in batch])
        for (s, _, _), rows in zip(batch, outs):
            got[s].append(rows)

    step([(0, 0, 12)])
    step([(0, 12, 13), (1, 0, 6), (2, 0, 7)])  # a decode row, then two prefills (one is a first chunk)
    step([(0, 13, 14), (1, 6, 11)])  # decode + the second chunk of a prefill
    step([(0, 14, 15), (2, 7, 8), (1, 11, 12)])  # three decodes of different lengths in one batch
    step([(1, 12, 13), (2, 8, 9), (0, 15, 16)])  # same sequences, another order
    step([(0, 16, 17), (1, 13, 14)])
    for seq_id, toks in seqs.items():
        ours = torch.cat(got[seq_id])
        diff = (ours - hf_logits(hf, toks)).abs().max().item()
        assert diff < ATOL, f"sequence {seq_id}: max |logit diff| {diff:.2e}"


def test_load_in_bfloat16(tmp_path):
    # The dtype path: parameters and caches in bfloat16, logits float32 and close to HF's fp32
    # (bfloat16 keeps 8 mantissa bits: errors of a few 1e-2 on logits of magnitude ~2).
    # hidden 72: sqrt(72) = 8.485 rounds to 8.5 in bfloat16, as HF's Gemma embedding scale does.
    hf = make_hf_model("gemma3", str(tmp_path), seed=9, hidden_size=72)
    model, model_config = load_model(str(tmp_path), torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    toks = tokens(PROMPT_LEN + 2)
    ref = hf_logits(hf, toks)
    ids = torch.tensor(toks)
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), hf.to(torch.bfloat16).model.embed_tokens(ids))
    kv = PagedKV(model_config, dtype=torch.bfloat16)
    ours = torch.cat(run_step(model, kv, [(0, toks[:CHUNK])]) + run_step(model, kv, [(0, toks[CHUNK:])]))
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.15
