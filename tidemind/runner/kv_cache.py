"""Sizing and allocation of the paged KV cache (and the size of the host swap pool, runner/swap.py).

One LayerKVCache per layer (attention/kv_cache.py: the layout, quantized or not). Blocks are
planned by their bytes over all layers, scales included, so a quantized cache holds more tokens in
the same memory: at head_dim 128 against bfloat16, 1.939x (int8) and 3.76x (int4).
"""
from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass
from typing import List

import torch

from ..attention.kv_cache import KV_SCALES_DTYPE, LayerKVCache, check_kv_quant, kv_dtype_name, kv_row_bytes
from ..config import EngineConfig, ModelConfig

logger = logging.getLogger("tidemind")


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_source: str  # how num_blocks was chosen, for the start-up log
    num_host_blocks: int = 0  # blocks of the host swap pool (num_cpu_blocks / swap_space)
    quant_policy: int = 0  # 0, 8 (int8) or 4 (int4): what each block stores
    kv_dtype: str = ""  # what the data holds, for logs: the model dtype's name, int8 or int4

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def available_host_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), falling back to free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype, quant_policy: int) -> int:
    """Bytes of KV cache one token takes over all layers: keys and values, scales included."""
    return 2 * model_config.num_layers * model_config.num_kv_heads * kv_row_bytes(model_config.head_dim, dtype,
                                                                                  quant_policy)


def plan_kv_cache(model_config: ModelConfig, engine_config: EngineConfig, dtype: torch.dtype,
                  device: torch.device, session_len: int, max_batch_size: int) -> KVCacheSpec:
    """Choose the number of KV blocks; call after the weights are on the device."""
    block_size = engine_config.cache_block_seq_len
    quant_policy = engine_config.quant_policy
    check_kv_quant(quant_policy, model_config.head_dim)
    bytes_per_block = block_size * kv_bytes_per_token(model_config, dtype, quant_policy)
    share = engine_config.cache_max_entry_count
    num_host_blocks = plan_host_blocks(engine_config, bytes_per_block)
    planned = dict(num_host_blocks=num_host_blocks, quant_policy=quant_policy,
                   kv_dtype=kv_dtype_name(dtype, quant_policy))
    if engine_config.num_gpu_blocks:
        return KVCacheSpec(engine_config.num_gpu_blocks, block_size, bytes_per_block, "num_gpu_blocks", **planned)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        num_blocks = int(free * share) // bytes_per_block
        source = f"{share:.0%} of {free / 2**30:.1f} GiB free GPU memory"
    else:
        available = available_host_memory()
        # Never more than the batch could use: max_batch_size full sessions.
        batch_blocks = max_batch_size * -(-session_len // block_size)
        num_blocks = min(int(available * share) // bytes_per_block, batch_blocks)
        source = (f"min({share:.0%} of {available / 2**30:.1f} GiB available RAM, "
                  f"{max_batch_size} sequences x {session_len} tokens)")
    if num_blocks < 1:
        raise RuntimeError(
            f"no memory left for the KV cache ({source}, {bytes_per_block} bytes per block): raise "
            f"--cache-max-entry-count, lower --cache-block-seq-len, or free memory")
    return KVCacheSpec(num_blocks, block_size, bytes_per_block, source, **planned)


def plan_host_blocks(engine_config: EngineConfig, bytes_per_block: int) -> int:
    """Blocks of the host swap pool: num_cpu_blocks, or swap_space GiB of blocks; 0 for none."""
    if engine_config.num_cpu_blocks:
        num_blocks, asked = engine_config.num_cpu_blocks, f"--num-cpu-blocks {engine_config.num_cpu_blocks}"
    elif engine_config.swap_space:
        num_blocks, asked = int(engine_config.swap_space * 2**30) // bytes_per_block, \
            f"--swap-space {engine_config.swap_space} GiB"
        if num_blocks < 1:
            raise RuntimeError(f"{asked} holds no KV block of {bytes_per_block / 2**20:.1f} MiB: raise it, or "
                               f"leave swap off")
    else:
        return 0
    available = available_host_memory()
    if num_blocks * bytes_per_block > available:
        raise RuntimeError(f"{asked} needs {num_blocks * bytes_per_block / 2**30:.1f} GiB of host memory but "
                           f"{available / 2**30:.1f} GiB are available: lower it")
    return num_blocks


def _zeroed(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor. On the CPU it lives in an anonymous memory mapping: the kernel hands
    out zero pages on first touch, so a large cache costs RAM only as blocks get used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, num_bytes), dtype=dtype).view(shape)


def allocate_kv_cache(spec: KVCacheSpec, model_config: ModelConfig, dtype: torch.dtype,
                      device: torch.device) -> List[LayerKVCache]:
    """One LayerKVCache per layer: data [2, num_blocks, block_size, num_kv_heads, head_dim] of
    `dtype` (keys, values), or uint8 [..., head_dim * quant_policy / 8] with float16 scales
    [2, num_blocks, block_size, num_kv_heads, 2] when spec.quant_policy is 8 or 4.

    Zero-filled: attention gives masked-out slots zero weight, and 0 * NaN garbage would still be NaN
    (a zero (scale, zero) pair dequantizes to zeros too).
    """
    head = (spec.num_blocks, spec.block_size, model_config.num_kv_heads)
    bits = spec.quant_policy
    caches = []
    for _ in range(model_config.num_layers):
        if bits:
            data = _zeroed((2, *head, model_config.head_dim * bits // 8), torch.uint8, device)
            caches.append(LayerKVCache(data, _zeroed((2, *head, 2), KV_SCALES_DTYPE, device), bits))
        else:
            caches.append(LayerKVCache(_zeroed((2, *head, model_config.head_dim), dtype, device)))
    return caches
