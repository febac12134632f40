"""Decoder layers as one C call each (kernels/cpu/decoder.py, csrc/decoder_layer.c) against the
per-op path they replace and the torch reference.

The layer call runs the per-op path's kernels in its order on the same data, so with the same
instruction set its logits are the per-op path's bit for bit; checked on a tiny random Llama
written as a GGUF of mixed types (q | k | v in two packed formats, biases on q, k, v and o, a
sliding window on some layers, batches mixing prefill chunks and decodes), and on the bundled
SmolLM2 for 40 greedy tokens, and for every instruction-set variant this CPU runs. Against the
torch reference kernels and attention (same quantized linear layers) the logits agree to float32
rounding (as carried through int8 activations).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model_factory import PagedKV, make_hf_model, run_step, write_synthetic_gguf
from tidemind.kernels.cpu.build import CPUKernelBuildError

try:
    from tidemind.kernels.cpu import library
    ISAS = library.supported_isas()
except CPUKernelBuildError as exc:  # no C compiler here: the engine falls back to torch
    pytest.skip(f"CPU kernels unavailable: {exc}", allow_module_level=True)

from tidemind.attention.cpu_backend import CPUAttentionBackend  # noqa: E402
from tidemind.kernels.registry import kernel_set  # noqa: E402
from tidemind.layers.context import BuildContext  # noqa: E402
from tidemind.loader import load_model, resolve_model  # noqa: E402
from tidemind.models.cpu_layers import fused_cpu_layers, layer_specs  # noqa: E402
from tidemind.models.llama import LlamaDecoderLayer  # noqa: E402

CPU = torch.device("cpu")
QTYPES = {"norm": "F32", "token_embd": "Q8_0", "attn_q": "Q8_0", "attn_k": "Q4_1", "attn_v": "Q4_1",
          "attn_output": "Q4_0", "ffn_gate": "Q4_0", "ffn_up": "Q5_1", "ffn_down": "Q5_0", "output": "Q4_1",
          "": "F32"}
# (seq id, new tokens) per step: prefills of two sequences, a chunked prefill beside decodes, decodes
STEPS = [[(0, list(range(5, 16))), (1, list(range(40, 47)))],
         [(0, [17]), (1, list(range(50, 56)))],
         [(0, [18]), (1, [57]), (2, list(range(60, 69)))]] + [[(0, [20 + i]), (1, [70 + i]), (2, [90 + i])]
                                                                for i in range(6)]


def _cpu_context() -> BuildContext:
    return BuildContext(kernels=kernel_set("cpu"), attention_backend=CPUAttentionBackend())


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu_decoder")
    hf = make_hf_model("llama", str(path / "hf"), seed=31, head_dim=None, mlp_bias=False, num_hidden_layers=4,
                       intermediate_size=160)
    gguf_path = str(path / "tiny.gguf")
    write_synthetic_gguf(hf, gguf_path, "llama", QTYPES)
    return gguf_path


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    model, config = load_model(resolve_model(tiny_gguf, keep_quantized=True).path, torch.float32, CPU,
                               _cpu_context())
    return model, config


def _with_windows(model, windows):
    """Give layer i the sliding window windows[i] (0: none) in both paths, and rebuild the layer calls."""
    for layer, window in zip(model.model.layers, windows):
        attn = layer.self_attn.attn
        attn.spec = dataclasses.replace(attn.spec, sliding_window=window or None)
    model.after_weights_processed()


def _logits(model, config, layers):
    """Every step's logits with model.cpu_layers = layers (None: the per-op path), one tensor."""
    saved = model.cpu_layers
    model.cpu_layers = layers
    try:
        kv = PagedKV(config, num_blocks=64, block_size=4)
        return torch.cat([torch.cat(run_step(model, kv, step)) for step in STEPS])
    finally:
        model.cpu_layers = saved


def test_layer_calls_equal_per_op_path(tiny, monkeypatch):
    model, config = tiny
    _with_windows(model, [0, 3, 0, 6])
    fused = model.cpu_layers
    assert fused is not None and len(fused) == 4
    assert [len(s.qkv.segments) for s in layer_specs(model)] == [2] * 4  # Q8_0 | Q4_1 in one layer call
    per_op = _logits(model, config, None)

    def per_op_layer(*args, **kwargs):
        raise AssertionError("the per-op layer ran although the layer calls apply")
    monkeypatch.setattr(LlamaDecoderLayer, "forward", per_op_layer)
    got = _logits(model, config, fused)
    assert torch.equal(got, per_op), float((got - per_op).abs().max())
    monkeypatch.undo()
    _with_windows(model, [0, 0, 0, 0])
    unwindowed = _logits(model, config, model.cpu_layers)
    assert not torch.equal(unwindowed, got)  # the windows reached the kernel: the steps are longer than them


def test_layer_calls_match_torch_reference(tiny, tiny_gguf):
    model, config = tiny
    _with_windows(model, [0, 0, 0, 0])
    reference, _ = load_model(resolve_model(tiny_gguf, keep_quantized=True).path, torch.float32, CPU)
    assert reference.cpu_layers is None  # torch kernels and attention: the per-op path
    want, got = _logits(reference, config, None), _logits(model, config, model.cpu_layers)
    relative = float((got - want).norm() / want.norm())
    # float32 rounding of norms, rope and attention, which now and then moves an activation to the next
    # int8 step in the linear layers after them (measured 0.003; a wrong rope, bias or window: > 0.1)
    assert relative < 0.01, relative
    dense, _ = load_model(resolve_model(tiny_gguf).path, torch.float32, CPU)
    want = _logits(dense, config, None)
    relative = float((got - want).norm() / want.norm())
    assert relative < 0.05, relative  # int8 activations in the quantized linear layers


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_layer_call(tiny_gguf, isa):
    """Each instruction-set variant's layer call against the per-op path on the same variant."""
    chosen = library.kernels().isa
    library.select_isa(isa)
    try:
        model, config = load_model(resolve_model(tiny_gguf, keep_quantized=True).path, torch.float32, CPU,
                                   _cpu_context())
    finally:
        library.select_isa(chosen)
    _with_windows(model, [5, 0, 0, 2])
    assert model.cpu_layers.isa == isa
    per_op = _logits(model, config, None)
    got = _logits(model, config, model.cpu_layers)
    assert torch.equal(got, per_op), float((got - per_op).abs().max())


def test_other_models_keep_the_per_op_path(tiny_gguf):
    reference, _ = load_model(resolve_model(tiny_gguf, keep_quantized=True).path, torch.float32, CPU)
    assert fused_cpu_layers(reference) is None  # torch kernels
    dense, _ = load_model(resolve_model(tiny_gguf).path, torch.float32, CPU, _cpu_context())
    assert dense.cpu_layers is None  # float32 weights: not the stored-precision linear layers


@pytest.mark.slow
def test_bundled_smollm2_greedy_equal():
    model, config = load_model(resolve_model(None, keep_quantized=True).path, torch.float32, CPU, _cpu_context())
    assert model.cpu_layers is not None

    def greedy(layers, count=40):
        model.cpu_layers = layers
        kv = PagedKV(config, num_blocks=32, block_size=16)
        logits = run_step(model, kv, [(0, list(range(1000, 1032)))])[0][-1:]
        tokens, rows = [int(logits.argmax())], [logits]
        for _ in range(count - 1):
            logits = run_step(model, kv, [(0, [tokens[-1]])])[0]
            tokens.append(int(logits.argmax()))
            rows.append(logits)
        return tokens, torch.cat(rows)

    fused = model.cpu_layers
    tokens, logits = greedy(fused)
    want_tokens, want_logits = greedy(None)
    assert tokens == want_tokens
    assert torch.equal(logits, want_logits), float((logits - want_logits).abs().max())
