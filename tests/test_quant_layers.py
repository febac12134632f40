"""The quantization seam: packing, layouts, loading AWQ / GPTQ / W8A8 checkpoints written by the
tests (tests/quant_factory.py, independent of tidemind's packing), and the errors for checkpoints
tidemind cannot run.

Tolerance: a loaded quantized checkpoint must give the logits of the float model that holds the
same dequantized weights within 1e-4 (the dense tests' bound, tests/test_models_vs_hf.py): both
compute the same function in float32 and differ only in where the dequantization rounds (the
float16 scales are exact in float32). W8A8 also quantizes activations per token, which the float
model does not: that comparison gets a looser, justified bound below.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from model_factory import VOCAB, PagedKV, hf_logits, make_hf_model, run_step
from quant_factory import AWQ_NIBBLE_COLUMN, pack_columns, pack_rows, write_awq, write_gptq, write_w8a8
from tidemind.layers.quantization import QuantizationConfigError
from tidemind.layers.quantization.awq import awq_dequantize
from tidemind.layers.quantization.packing import pack, pack_awq, unpack, unpack_awq
from tidemind.layers.quantization.w8a8 import quantize_per_token
from tidemind.loader import CheckpointError, load_model

CPU = torch.device("cpu")
ATOL = 1e-4


def tokens(n: int = 12, seed: int = 3) -> list:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def our_logits(path: str, toks, **kwargs) -> torch.Tensor:
    model, config = load_model(path, torch.float32, CPU, **kwargs)
    kv = PagedKV(config)
    rows = run_step(model, kv, [(0, toks[:7])]) + run_step(model, kv, [(0, toks[7:])])
    return torch.cat(rows)


# ---- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(1, 8), (5, 24), (64, 40)])
def test_awq_packing_matches_independent_packer(rows, cols):
    values = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows))
    expected = pack_columns(values, 4, AWQ_NIBBLE_COLUMN)
    assert torch.equal(pack_awq(values), expected)
    assert torch.equal(unpack_awq(expected), values.to(torch.int32))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_along_rows_matches_independent_packer(bits):
    values = torch.randint(0, 1 << bits, (32, 6), generator=torch.Generator().manual_seed(bits))
    expected = pack_rows(values, bits)  # [32 * bits / 32, 6]
    assert torch.equal(pack(values, bits, dim=0), expected)
    assert torch.equal(unpack(expected, bits, dim=0), values.to(torch.int32))


def test_awq_dequantize_formula():
    # one group of 8 inputs, 8 outputs: W[k, n] = (q[k, n] - z[n]) * s[n]
    q = torch.arange(64).reshape(8, 8) % 16
    z = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    s = torch.linspace(0.5, 1.2, 8).half().reshape(1, 8)
    w = awq_dequantize(pack_awq(q), pack_awq(z), s, 8, torch.float32)
    assert torch.equal(w, (q - z).float() * s.float())


# ---- loading quantized checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("group,sym", [(32, False), (16, True)])
def test_awq_checkpoint_matches_dequantized_float_model(group, sym, tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "float"), seed=4)  # GQA, head_dim 24, biases
    write_awq(hf, str(tmp_path / "awq"), group, sym)
    toks = tokens()
    diff = (our_logits(str(tmp_path / "awq"), toks) - hf_logits(hf, toks)).abs().max().item()
    assert diff < ATOL


def test_awq_gemma3_checkpoint(tmp_path):
    hf = make_hf_model("gemma3", str(tmp_path / "float"), seed=5)
    write_awq(hf, str(tmp_path / "awq"), 32)
    toks = tokens()
    assert (our_logits(str(tmp_path / "awq"), toks, model_format="awq") - hf_logits(hf, toks)).abs().max() < ATOL


@pytest.mark.parametrize("bits,act_order,v2", [(4, False, False), (4, True, False), (8, False, True)])
def test_gptq_checkpoint_matches_dequantized_float_model(bits, act_order, v2, tmp_path):
    hf = make_hf_model("qwen2", str(tmp_path / "float"), seed=6)
    write_gptq(hf, str(tmp_path / "gptq"), 32, bits, act_order, v2)
    toks = tokens()
    model, _ = load_model(str(tmp_path / "gptq"), torch.float32, CPU)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.repacked == (bits == 4 and not act_order)  # in-order 4-bit GPTQ runs on the AWQ layout
    diff = (our_logits(str(tmp_path / "gptq"), toks) - hf_logits(hf, toks)).abs().max().item()
    assert diff < ATOL


def test_w8a8_linear_is_the_int8_formula():
    # the method against y = (xq @ wq.T) * x_scale * w_scale computed here in float64
    from tidemind.layers.linear import Linear
    from tidemind.layers.quantization.w8a8 import SmoothQuantConfig

    layer = Linear(40, 24, bias=True, linear_method=SmoothQuantConfig().linear_method("model.layers.0.mlp.down_proj"))
    gen = torch.Generator().manual_seed(0)
    layer.weight.data = torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8)
    layer.scale.data = torch.rand(24, 1, generator=gen) * 0.01
    layer.bias.data = torch.randn(24, generator=gen)
    x = torch.randn(5, 40, generator=gen)
    x_scale = x.abs().amax(-1, keepdim=True).double() / 127
    xq = (x.double() / x_scale).round()
    expected = (xq @ layer.weight.double().t()) * x_scale * layer.scale.double().t() + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    q, s = quantize_per_token(torch.zeros(2, 40))
    assert torch.equal(q, torch.zeros(2, 40, dtype=torch.int8)) and torch.equal(s, torch.ones(2, 1))


def test_w8a8_checkpoint_close_to_float_model(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "float"), seed=7)
    write_w8a8(hf, str(tmp_path / "w8a8"))
    toks = tokens()
    ours, ref = our_logits(str(tmp_path / "w8a8"), toks), hf_logits(hf, toks)
    model, _ = load_model(str(tmp_path / "w8a8"), torch.float32, CPU)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    # Only the per-token int8 activations differ from the float model: a relative error of about
    # 1/254 per input, which over this 3-layer model moves logits of scale ~1 by well under 0.05
    # (seen: ~0.01); a wrong scale or layout moves them by O(1).
    diff = (ours - ref).abs().max().item()
    assert 1e-6 < diff < 0.05, diff


# ---- checkpoints tidemind cannot run ----------------------------------------------------------


@pytest.fixture
def awq_dir(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "float"), seed=8)
    write_awq(hf, str(tmp_path / "awq"), 32)
    return str(tmp_path / "awq")


def edit_config(path: str, **quantization_config) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"].update(quantization_config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("change,message", [
    (dict(quant_method="fp8"), "quant_method='fp8', which tidemind cannot run; supported: awq, gptq, smooth_quant"),
    (dict(version="gemv"), "AWQ version 'gemv'"),
    (dict(bits=3), "bits=3"),
    (dict(group_size=48), "group size 48 does not divide the layer's 64 input features"),
])
def test_unrunnable_quantization_config_is_refused(awq_dir, change, message):
    # QuantizationConfigError, or the loader's CheckpointError naming config.json around it where
    # the model's construction (a layer's create_weights) found the problem
    edit_config(awq_dir, **change)
    with pytest.raises((QuantizationConfigError, CheckpointError)) as err:
        load_model(awq_dir, torch.float32, CPU)
    assert message in str(err.value)


@pytest.mark.parametrize("model_format,message", [
    ("gptq", "--model-format gptq was given but"),
    ("hf", "records quant_method='awq' but --model-format hf was given"),
])
def test_model_format_must_match_the_checkpoint(awq_dir, model_format, message):
    with pytest.raises(QuantizationConfigError, match="model-format") as err:
        load_model(awq_dir, torch.float32, CPU, model_format=model_format)
    assert message in str(err.value)


def test_model_format_on_a_dense_checkpoint(tmp_path):
    make_hf_model("llama", str(tmp_path), seed=9)
    with pytest.raises(QuantizationConfigError, match="has no quantization_config .*tidemind lite auto_awq"):
        load_model(str(tmp_path), torch.float32, CPU, model_format="awq")


def test_quantize_config_json_alone_is_not_guessed(awq_dir):
    with open(os.path.join(awq_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(awq_dir, "quantize_config.json"), "w") as f:
        json.dump(config.pop("quantization_config"), f)
    with open(os.path.join(awq_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="quantize_config.json but .* has no quantization_config"):
        load_model(awq_dir, torch.float32, CPU)


# ---- on the GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_awq_and_w8a8_layers_on_cuda_match_the_cpu(tmp_path):
    # the same checkpoints loaded on the GPU in float16 (AWQ: the Triton W4A16 kernels; W8A8:
    # torch._int_mm, rows padded past 16) and on the CPU in float32 (the reference paths)
    hf = make_hf_model("llama", str(tmp_path / "float"), seed=10)
    write_awq(hf, str(tmp_path / "awq"), 32)
    hf = make_hf_model("llama", str(tmp_path / "float"), seed=10)
    write_w8a8(hf, str(tmp_path / "w8a8"))
    for name in ("awq", "w8a8"):
        gpu, _ = load_model(str(tmp_path / name), torch.float16, torch.device("cuda"))
        cpu, _ = load_model(str(tmp_path / name), torch.float32, CPU)
        if name == "awq":  # repacked into K slabs at load
            assert gpu.model.layers[0].self_attn.qkv_proj.use_triton
            slabs = gpu.model.layers[0].self_attn.qkv_proj.qweight
            assert slabs.dim() == 3 and slabs.shape[0] * 32 == 64 and slabs.shape[2] == 4
        for rows in (1, 3, 40, 300):
            x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
            for layer in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
                expected = cpu.model.layers[1].get_submodule(layer)(x)
                actual = gpu.model.layers[1].get_submodule(layer)(x.cuda().half()).float().cpu()
                # float16 rounding of inputs, weights and outputs: ~1e-3 of outputs of order 1
                torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)
