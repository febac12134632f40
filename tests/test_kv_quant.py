"""KV cache quantization (quant_policy 8 / 4) without Triton: the quantization's round trip and
layout (kernels/reference.py, the definition), the cache's sizing and allocation, the host swap
pool moving scales with data, and the flag. The kernels are in test_kv_quant_kernels.py, the engine
in test_kv_quant_e2e.py and test_gpu_engine.py."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from tidemind.attention.kv_cache import LayerKVCache, check_kv_quant, kv_row_bytes
from tidemind.config import EngineConfig, ModelConfig
from tidemind.config_flags import add_config_flags, config_from_args
from tidemind.kernels import reference
from tidemind.runner import kv_cache as runner_kv_cache
from tidemind.runner.swap import HostKVPool

FLOAT32_EPS = 2.0 ** -23


def rows(kind: str, head_dim: int = 64) -> torch.Tensor:
    """[32, head_dim] float32 rows of one kind of value range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, head_dim, generator=g)
    return {
        "normal": x,
        "offset": 55.0 + 5.0 * torch.rand(32, head_dim, generator=g),  # all in [55, 60]: far from 0
        "negative": -1000.0 + x,
        "constant": torch.full((32, head_dim), -3.25),
        "tiny": x * 1e-6,  # scales below float16's normal range
        "mixed": x * torch.logspace(-3, 4, 32)[:, None],  # each row its own magnitude
    }[kind]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["normal", "offset", "negative", "constant", "tiny", "mixed"])
def test_round_trip_error_is_at_most_half_a_step(bits, kind):
    x = rows(kind)
    qmax = 2 ** bits - 1
    packed, scale_zero = reference.quantize_kv(x, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 64 * bits // 8)
    assert scale_zero.dtype == torch.float16 and scale_zero.shape == (32, 2)
    scale, zero = scale_zero[:, 0].double(), scale_zero[:, 1].double()
    lo, hi = x.double().amin(-1), x.double().amax(-1)
    # the stored (float16) range covers the row: zero <= min, zero + qmax * scale >= max
    assert (zero <= lo).all() and (zero + qmax * scale >= hi).all()
    # asymmetric: the step follows the row's own range (a symmetric one would cover [-max|x|, max|x|]),
    # widened by the rounding margins (2^-11 + 2^-20 of |zero| and of the range) and float16 rounding
    assert (scale <= (hi - lo + lo.abs() * 2 ** -10) / qmax * (1 + 2 ** -9) + 2 ** -23).all()
    error = (reference.dequantize_kv(packed, scale_zero, bits).double() - x.double()).abs()
    # float32 arithmetic adds a few ulps of the values involved
    slack = 4 * FLOAT32_EPS * torch.maximum(x.double().abs(), zero.abs()[:, None] + qmax * scale[:, None])
    assert (error <= scale[:, None] / 2 + slack).all(), (error - scale[:, None] / 2).max()


def test_rows_beyond_float16_saturate_instead_of_overflowing():
    x = torch.tensor([[-1e6, 0.0, 1e6, 5.0]])
    packed, scale_zero = reference.quantize_kv(x, 8)
    assert torch.isfinite(scale_zero.float()).all()
    back = reference.dequantize_kv(packed, scale_zero, 8)
    assert torch.isfinite(back).all() and back[0, 0] == -65504.0


def test_int4_packs_split_halves_low_nibble_first():
    x = torch.arange(8, dtype=torch.float32)[None] * 2.0  # one row, values 0 .. 14: steps of ~1
    packed, scale_zero = reference.quantize_kv(x, 4)
    q = torch.floor((x - scale_zero[:, 1:].float()) / scale_zero[:, :1].float() + 0.5)
    assert packed.tolist() == [[int(q[0, j]) | int(q[0, j + 4]) << 4 for j in range(4)]]


def test_write_skips_padding_slots_and_stores_scales_at_the_token_slot():
    cache = torch.full((2, 3, 4, 2, 8), 7, dtype=torch.uint8)  # [2, blocks, block_size, heads, 16 / 2]
    scales = torch.full((2, 3, 4, 2, 2), 9.0, dtype=torch.float16)
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([5, -1, 11])
    reference.write_kv_cache_split(key, value, cache[0], cache[1], slots, scales[0], scales[1], 4)
    written = torch.zeros(12, dtype=torch.bool)
    written[[5, 11]] = True
    for part, x in ((0, key), (1, value)):
        flat, flat_scales = cache[part].view(12, 2, 8), scales[part].view(12, 2, 2)
        assert (flat[~written] == 7).all() and (flat_scales[~written] == 9.0).all()
        for slot, token in ((5, 0), (11, 2)):
            expected, expected_scales = reference.quantize_kv(x[token], 4)
            assert torch.equal(flat[slot], expected) and torch.equal(flat_scales[slot], expected_scales)


# ---- sizing, allocation, flags ------------------------------------------------------------------


def model_config(head_dim=128, num_kv_heads=8, num_layers=4) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", model_type="llama", hidden_size=4096, num_layers=num_layers,
                       num_attention_heads=32, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=1000,
                       max_position_embeddings=8192)


def test_row_bytes_include_scales():
    assert kv_row_bytes(128, torch.bfloat16, 0) == 256
    assert kv_row_bytes(128, torch.bfloat16, 8) == 128 + 4
    assert kv_row_bytes(128, torch.bfloat16, 4) == 64 + 4
    assert kv_row_bytes(64, torch.float32, 8) == 64 + 4


def test_the_kv_budget_in_tokens_grows_by_the_bytes_saved(monkeypatch):
    monkeypatch.setattr(runner_kv_cache, "available_host_memory", lambda: 2**30)
    config = model_config()
    tokens = {}
    for policy in (0, 8, 4):
        engine = EngineConfig(quant_policy=policy, cache_block_seq_len=16, cache_max_entry_count=0.5)
        spec = runner_kv_cache.plan_kv_cache(config, engine, torch.bfloat16, torch.device("cpu"), 10**6, 10**3)
        assert spec.bytes_per_block == 16 * 2 * 4 * 8 * kv_row_bytes(128, torch.bfloat16, policy)
        assert spec.kv_dtype == {0: "bfloat16", 8: "int8", 4: "int4"}[policy] and spec.quant_policy == policy
        tokens[policy] = spec.num_tokens
    # 2^29 bytes over (2 x 4 layers x 8 heads) rows a token, in whole blocks of 16 tokens
    assert tokens[0] == 16 * (2**29 // (16 * 64 * 256))
    assert tokens[8] / tokens[0] == pytest.approx(256 / 132, rel=1e-3)  # 1.939x, LMDeploy's layout
    assert tokens[4] / tokens[0] == pytest.approx(256 / 68, rel=1e-3)  # 3.765x


@pytest.mark.parametrize("policy", [0, 8, 4])
def test_allocation_gives_each_layer_its_data_and_scales(policy):
    config = model_config(head_dim=64, num_kv_heads=3, num_layers=2)
    spec = runner_kv_cache.KVCacheSpec(num_blocks=5, block_size=16, bytes_per_block=0, budget_source="test",
                                       quant_policy=policy)
    caches = runner_kv_cache.allocate_kv_cache(spec, config, torch.float32, torch.device("cpu"))
    assert len(caches) == 2 and caches[0].data.data_ptr() != caches[1].data.data_ptr()
    for cache in caches:
        width = 64 * policy // 8 if policy else 64
        assert cache.data.shape == (2, 5, 16, 3, width) and not cache.data.any()
        assert cache.data.dtype == (torch.uint8 if policy else torch.float32)
        assert cache.quant_policy == policy and cache.num_blocks == 5 and cache.block_size == 16
        if policy:
            assert cache.scales.shape == (2, 5, 16, 3, 2) and cache.scales.dtype == torch.float16
            assert set(cache.quant_args()) == {"key_scales", "value_scales", "kv_bits"}
        else:
            assert cache.scales is None and cache.quant_args() == {}


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="head_dim is 5 \\(odd\\): use quant_policy 8 or 0"):
        check_kv_quant(4, 5)
    check_kv_quant(8, 5)
    with pytest.raises(ValueError, match="quant_policy=2 is not one of 0 \\(none\\), 4 \\(int4"):
        EngineConfig(quant_policy=2)
    with pytest.raises(ValueError, match="needs scales exactly when"):
        LayerKVCache(torch.zeros(2, 1, 1, 1, 4, dtype=torch.uint8), None, 8)
    odd = model_config(head_dim=5)
    with pytest.raises(ValueError, match="use quant_policy 8 or 0"):
        runner_kv_cache.plan_kv_cache(odd, EngineConfig(quant_policy=4, num_gpu_blocks=4), torch.float32,
                                      torch.device("cpu"), 64, 1)


def test_quant_policy_flag_takes_lmdeploys_values():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, EngineConfig, "engine")
    assert config_from_args(EngineConfig, parser.parse_args(["--quant-policy", "8"])).quant_policy == 8
    assert config_from_args(EngineConfig, parser.parse_args([])).quant_policy == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--quant-policy", "16"])


# ---- host swap pool ---------------------------------------------------------------------------------


def test_swap_moves_scales_with_their_blocks():
    torch.manual_seed(0)
    caches = [LayerKVCache(torch.randint(0, 256, (2, 10, 4, 2, 8), dtype=torch.uint8),
                           torch.randn(2, 10, 4, 2, 2).half(), 4) for _ in range(3)]
    before = [(c.data.clone(), c.scales.clone()) for c in caches]
    pool = HostKVPool(4, caches)
    assert [h.shape for h in pool.hosts] == [(4, 3, 2, 4, 2, 8), (4, 3, 2, 4, 2, 2)]
    assert pool.num_bytes == 4 * 3 * 2 * 4 * 2 * (8 + 2 * 2)
    pool.apply([(2, 0), (7, 3)], [])
    for c in caches:
        c.data.zero_()
        c.scales.zero_()
    pool.apply([], [(3, 1), (0, 9)])
    for c, (data, scales) in zip(caches, before):
        for source, destination in ((2, 9), (7, 1)):
            assert torch.equal(c.data[:, destination], data[:, source])
            assert torch.equal(c.scales[:, destination], scales[:, source])
        untouched = [b for b in range(10) if b not in (1, 9)]
        assert not c.data[:, untouched].any() and not c.scales[:, untouched].any()
    assert math.isclose(pool.num_bytes / 2**20, 0.0022, rel_tol=0.1)
