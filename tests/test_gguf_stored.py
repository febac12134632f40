"""GGUF weights at their stored precision (loader/gguf_blocks.py, loader/gguf.py keep_quantized,
layers/quantization/gguf.py, runner/gguf_precision.py).

The decoded integers and scales reproduce gguf-py's dequantization bit for bit, for every type
kept quantized; a tiny Llama written as a GGUF of mixed types loads at stored precision with every
packed weight dequantizing exactly to the float32 conversion's, and its logits differ from the
float32 model's only by the rounding of activations to int8 (a bound 2.5x what this model
shows); the choice of path follows --dtype, the device, the weight types and whether the
kernels can be built.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from model_factory import PagedKV, make_hf_model, run_step, write_synthetic_gguf
from tidemind.loader import load_model, resolve_model
from tidemind.loader import gguf_blocks

CPU = torch.device("cpu")
# bytes holding IEEE half scales in each block (set to finite values; the rest is random)
_HALF_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2),
                T.Q5_K: (0, 2), T.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(_HALF_FIELDS), ids=lambda t: t.name)
def test_decode_blocks_matches_gguf_py(qtype):
    from gguf.quants import dequantize

    block_bytes, block_values = gguf_blocks._BLOCKS[qtype]
    rows, cols = 3, 2 * max(block_values, 256)
    rng = np.random.default_rng(int(qtype))
    data = rng.integers(0, 256, (rows, cols // block_values * block_bytes), dtype=np.uint8)
    blocks = data.reshape(-1, block_bytes)
    for at in _HALF_FIELDS[qtype]:
        halves = (rng.standard_normal(blocks.shape[0]) * 0.01).astype(np.float16)
        blocks[:, at:at + 2] = halves.view(np.uint8).reshape(-1, 2)
    q, d, m = gguf_blocks.decode_blocks(data, qtype, cols)
    assert q.shape == (rows, cols) and d.shape == (rows, cols // gguf_blocks.GROUP_SIZES[qtype])
    np.testing.assert_array_equal(gguf_blocks.dequantize(q, d, m), dequantize(data, qtype).reshape(rows, cols))


# every 2-D weight of a type kept quantized; q / k / v of three different types share one merged layer
QTYPES = {"norm": "F32", "token_embd": "Q8_0", "attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q4_1",
          "attn_output": "Q5_0", "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q5_1", "output": "Q4_1",
          "": "F32"}


def _logits(model, model_config, ids):
    kv = PagedKV(model_config)
    half = len(ids) // 2
    return torch.cat(run_step(model, kv, [(0, ids[:half])]) + run_step(model, kv, [(0, ids[half:])]))


def _packed_dense(method) -> torch.Tensor:
    """The packed weight of a GGUFLinearMethod read back, [N, K] float32 (segments in order)."""
    rows = [method.kernels.qrows(packed, torch.arange(width)) for _, width, packed in method.segments]
    return torch.cat(rows)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_at_stored_precision(tmp_path, tied):
    pytest.importorskip("tidemind.kernels.cpu.library").supported_isas()
    from tidemind.layers.quantization.gguf import GGUFLinearMethod

    hf = make_hf_model("llama", str(tmp_path / "hf"), seed=21, tie_word_embeddings=tied, head_dim=None,
                       mlp_bias=False)
    gguf_path = str(tmp_path / "tiny.gguf")
    write_synthetic_gguf(hf, gguf_path, "llama", QTYPES)
    dense, stored = resolve_model(gguf_path), resolve_model(gguf_path, keep_quantized=True)
    assert stored.path != dense.path and stored.gguf_path == gguf_path
    with open(os.path.join(stored.path, "config.json")) as f:
        assert json.load(f)["quantization_config"] == {"quant_method": "gguf"}
    fmodel, config = load_model(dense.path, torch.float32, CPU)
    qmodel, _ = load_model(stored.path, torch.float32, CPU)
    fparams = dict(fmodel.named_parameters())
    methods = {name: module.linear_method for name, module in qmodel.named_modules()
               if isinstance(module.__dict__.get("linear_method"), GGUFLinearMethod)}
    assert len(methods) == 4 * 3 + 1 + (0 if tied else 1)  # qkv, o, gate_up, down per layer; embedding; head
    for name, method in methods.items():
        assert torch.equal(_packed_dense(method), fparams[f"{name}.weight"]), name
    qkv = methods["model.layers.0.self_attn.qkv_proj"].describe()
    assert qkv == "8-bit g32 f16 scales | 4-bit g32 f16 scales", qkv  # Q8_0 | Q4_0 and Q4_1 in one call
    ids = list(range(5, 37))
    want, got = _logits(fmodel, config, ids), _logits(qmodel, config, ids)
    relative = float((got - want).norm() / want.norm())
    assert relative < 0.03, relative  # measured 0.012: int8 activations, 3 layers


def test_precision_choice(tmp_path, monkeypatch, caplog):
    from tidemind.kernels.cpu import library
    from tidemind.runner.gguf_precision import keep_gguf_quantized

    hf = make_hf_model("llama", str(tmp_path / "hf"), seed=22, head_dim=None, mlp_bias=False)
    ok, floats = str(tmp_path / "ok.gguf"), str(tmp_path / "f16.gguf")
    write_synthetic_gguf(hf, ok, "llama", QTYPES)
    write_synthetic_gguf(hf, floats, "llama", {**QTYPES, "ffn_down": "F16"})
    caplog.set_level(logging.INFO, logger="tidemind")
    assert keep_gguf_quantized(ok, "auto", "cpu")
    assert "CPU kernels: " in caplog.text
    assert not keep_gguf_quantized(ok, "float32", "cpu")
    assert not keep_gguf_quantized(str(tmp_path / "hf"), "auto", "cpu")  # not a GGUF
    assert not keep_gguf_quantized(floats, "auto", "cpu")
    assert "blk.0.ffn_down.weight is F16" in caplog.text

    def no_compiler(name="auto"):
        raise library.CPUKernelBuildError("no C compiler found (tried $CC, gcc, cc): install gcc\nmore")
    monkeypatch.setattr(library, "select_isa", no_compiler)
    caplog.clear()
    assert not keep_gguf_quantized(ok, "auto", "cpu")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "install gcc" in warnings[0].getMessage()
