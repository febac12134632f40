"""The runner's host swap pool (runner/swap.py) on the CPU: a separate tensor, real copies of every
layer's keys and values, swap-outs before swap-ins, copies batched by runs of host blocks."""
import pytest
import torch

from tidemind.runner import swap as swap_module
from tidemind.attention.kv_cache import LayerKVCache
from tidemind.runner.swap import HostKVPool, _runs


def _caches(num_layers=3, num_blocks=10):
    torch.manual_seed(0)
    # [2, num_blocks, block_size, kv_heads, head_dim] per layer
    return [torch.randn(2, num_blocks, 4, 2, 8) for _ in range(num_layers)]


def _pool(num_blocks, caches):
    return HostKVPool(num_blocks, [LayerKVCache(c) for c in caches])


def test_runs_of_consecutive_ids():
    assert _runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert _runs([]) == []


def test_blocks_swapped_out_come_back_into_other_blocks_with_every_layer():
    caches = _caches()
    before = [c.clone() for c in caches]
    pool = _pool(6, caches)
    assert pool.host.data_ptr() != caches[0].data_ptr() and pool.host.shape == (6, 3, 2, 4, 2, 8)
    pool.apply([(2, 0), (5, 1), (7, 4)], [])
    for c in caches:
        c.zero_()  # the device blocks are reused for something else
    pool.apply([], [(0, 9), (1, 3), (4, 0)])
    for c, b in zip(caches, before):
        for host_src, device_dst in ((2, 9), (5, 3), (7, 0)):
            assert torch.equal(c[:, device_dst], b[:, host_src])
        assert not c[:, [1, 2, 4, 5, 6, 7, 8]].any()  # nothing else written


def test_swap_outs_of_a_step_read_blocks_before_its_swap_ins_overwrite_them():
    caches = _caches()
    before = [c.clone() for c in caches]
    pool = _pool(4, caches)
    pool.apply([(1, 2)], [])  # host 2 holds block 1's KV
    pool.apply([(3, 0)], [(2, 3)])  # block 3 goes out and, in the same step, receives host 2
    for c, b in zip(caches, before):
        assert torch.equal(c[:, 3], b[:, 1])
    pool.apply([], [(0, 5)])
    for c, b in zip(caches, before):
        assert torch.equal(c[:, 5], b[:, 3])


def test_large_swaps_go_in_bounded_batches(monkeypatch):
    monkeypatch.setattr(swap_module, "_MAX_BLOCKS_PER_COPY", 3)
    caches = _caches(num_blocks=10)
    before = [c.clone() for c in caches]
    pool = _pool(10, caches)
    pool.apply([(b, 9 - b) for b in range(8)], [])
    pool.apply([], [(9 - b, (b + 1) % 10) for b in range(8)])
    for c, b in zip(caches, before):
        for block in range(8):
            assert torch.equal(c[:, (block + 1) % 10], b[:, block])


def test_no_pool_without_swap_space():
    assert HostKVPool.create(0, [LayerKVCache(c) for c in _caches()]) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pool_is_pinned_and_round_trips():
    caches = [c.cuda() for c in _caches()]
    before = [c.clone() for c in caches]
    pool = _pool(4, caches)
    assert pool.host.is_pinned()
    pool.apply([(1, 0), (2, 1)], [])
    pool.apply([], [(0, 6), (1, 7)])
    torch.cuda.synchronize()
    for c, b in zip(caches, before):
        assert torch.equal(c[:, 6], b[:, 1]) and torch.equal(c[:, 7], b[:, 2])


# ------------------------------------------------------------------ sizing and flags

def test_swap_pool_size_from_blocks_or_gib_with_errors_naming_the_fix(monkeypatch):
    from tidemind.config import EngineConfig
    from tidemind.runner import kv_cache

    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: 8 * 2**30)
    mib = 2**20
    assert kv_cache.plan_host_blocks(EngineConfig(), mib) == 0
    assert kv_cache.plan_host_blocks(EngineConfig(num_cpu_blocks=100), mib) == 100
    assert kv_cache.plan_host_blocks(EngineConfig(swap_space=0.5), mib) == 512
    with pytest.raises(RuntimeError, match="--swap-space 0.0001 GiB holds no KV block.*raise it"):
        kv_cache.plan_host_blocks(EngineConfig(swap_space=0.0001), mib)
    with pytest.raises(RuntimeError, match="--num-cpu-blocks 9000 needs 8.8 GiB.*8.0 GiB are available: lower it"):
        kv_cache.plan_host_blocks(EngineConfig(num_cpu_blocks=9000), mib)
    with pytest.raises(ValueError, match="give only one of them"):
        EngineConfig(num_cpu_blocks=4, swap_space=1.0)
    with pytest.raises(ValueError, match="num_cpu_blocks=-1 must be >= 0"):
        EngineConfig(num_cpu_blocks=-1)
    with pytest.raises(ValueError, match="swap_space=-1.0 must be >= 0"):
        EngineConfig(swap_space=-1.0)


def test_flags_follow_lmdeploys_names():
    import argparse

    from tidemind.config_flags import add_config_flags, config_from_args
    from tidemind.config import EngineConfig

    parser = argparse.ArgumentParser()
    add_config_flags(parser, EngineConfig, "engine")
    config = config_from_args(EngineConfig, parser.parse_args(["--no-enable-prefix-caching", "--swap-space", "2"]))
    assert not config.enable_prefix_caching and config.swap_space == 2.0
    assert config_from_args(EngineConfig, parser.parse_args(["--num-cpu-blocks", "64"])).num_cpu_blocks == 64
    assert config_from_args(EngineConfig, parser.parse_args(["--enable-prefix-caching"])).enable_prefix_caching
