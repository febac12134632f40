"""The host half of KV swap: a pool of host blocks beside the device KV cache, and the copies a
step asks for (core/swap.py is the bookkeeping; core/outputs.py the contract).

The pool is one tensor per part of a layer's cache (its data; its scales too when the cache is
quantized, attention/kv_cache.py), block-major, so that a block's KV over all layers is one
contiguous run of host memory per part, and a block moves whole, scales with data:

    host[num_host_blocks, num_layers, 2, block_size, num_kv_heads, W]      (2: keys, values)
    device part of layer l: [2, num_blocks, block_size, num_kv_heads, W]   (runner/kv_cache.py)
    W: head_dim (data), head_dim * bits / 8 (quantized data) or 2 (scales: scale, zero)

On a GPU the pool is pinned, so the copies are DMA transfers that do not block the host; on the
CPU it is an ordinary tensor, separate from the cache, so CPU tests exercise real copies.

swap_out(pairs):  per part, gather the source blocks of every layer on the device (index_select,
                  stacked into [n, num_layers, 2, ...]), then copy that into the host blocks, one
                  copy per run of consecutive host ids.
swap_in(pairs):   the reverse: host runs into a device staging tensor, then index_copy_ into every
                  layer's part.

apply() does all swap-outs of a step before its swap-ins, both on the current stream ahead of the
step's forward pass, which orders them with it: no synchronization is needed (the host never reads
the pool itself; a host block is rewritten only by a later step's copy, queued behind this one's).
Staging tensors hold at most _MAX_BLOCKS_PER_COPY blocks, bounding the device memory a swap takes.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch

from ..attention.kv_cache import LayerKVCache
from .device import to_device

logger = logging.getLogger("tidemind")

_MAX_BLOCKS_PER_COPY = 64
Pairs = Sequence[Tuple[int, int]]


def _runs(ids: Sequence[int]) -> List[Tuple[int, int, int]]:
    """(index in ids, first id, length) for each run of consecutive ids."""
    runs: List[Tuple[int, int, int]] = []
    for i, block in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((i, block, 1))
    return runs


class HostKVPool:
    def __init__(self, num_blocks: int, device_caches: List[LayerKVCache]):
        # parts[p][l]: part p (data, scales) of layer l, [2, num_device_blocks, block_size, kv_heads, W]
        self.parts = [[c.data for c in device_caches]]
        if device_caches[0].scales is not None:
            self.parts.append([c.scales for c in device_caches])
        self.device = device_caches[0].data.device
        self._pinned = self.device.type == "cuda"
        # per part: one block over every layer, and the pool of such blocks
        self._block_shapes = [(len(layers), 2, *layers[0].shape[2:]) for layers in self.parts]
        self.hosts = [torch.empty((num_blocks, *shape), dtype=layers[0].dtype, pin_memory=self._pinned)
                      for shape, layers in zip(self._block_shapes, self.parts)]

    @property
    def host(self) -> torch.Tensor:
        """The pool of the caches' data [num_host_blocks, num_layers, 2, block_size, kv_heads, W]."""
        return self.hosts[0]

    @property
    def num_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hosts)

    @classmethod
    def create(cls, num_blocks: int, device_caches: List[LayerKVCache]) -> Optional["HostKVPool"]:
        """The pool, or None without swap space."""
        if not num_blocks:
            return None
        pool = cls(num_blocks, device_caches)
        logger.info("KV swap pool: %d host blocks, %.2f GiB%s", num_blocks, pool.num_bytes / 2**30,
                    " pinned" if pool._pinned else "")
        return pool

    def apply(self, swap_out: Pairs, swap_in: Pairs) -> None:
        """A step's copies, swap-outs first (core/swap.py relies on that order)."""
        for start in range(0, len(swap_out), _MAX_BLOCKS_PER_COPY):
            self._swap_out(swap_out[start:start + _MAX_BLOCKS_PER_COPY])
        for start in range(0, len(swap_in), _MAX_BLOCKS_PER_COPY):
            self._swap_in(swap_in[start:start + _MAX_BLOCKS_PER_COPY])

    def _swap_out(self, pairs: Pairs) -> None:
        device_ids = to_device([d for d, _ in pairs], torch.int64, self.device)
        host_runs = _runs([h for _, h in pairs])
        for layers, host in zip(self.parts, self.hosts):
            # [n, num_layers, 2, block_size, kv_heads, W], contiguous
            staged = torch.stack([part.index_select(1, device_ids).transpose(0, 1) for part in layers], dim=1)
            for index, first, length in host_runs:
                host[first:first + length].copy_(staged[index:index + length], non_blocking=self._pinned)

    def _swap_in(self, pairs: Pairs) -> None:
        device_ids = to_device([d for _, d in pairs], torch.int64, self.device)
        host_runs = _runs([h for h, _ in pairs])
        for layers, host, block_shape in zip(self.parts, self.hosts, self._block_shapes):
            staged = torch.empty((len(pairs), *block_shape), dtype=host.dtype, device=self.device)
            for index, first, length in host_runs:
                staged[index:index + length].copy_(host[first:first + length], non_blocking=self._pinned)
            for layer, part in enumerate(layers):
                part.index_copy_(1, device_ids, staged[:, layer].transpose(0, 1))
