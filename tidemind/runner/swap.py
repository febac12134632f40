"""The host half of KV swap: a pool of host blocks beside the device KV cache, and the copies a
step asks for (core/swap.py is the bookkeeping; core/outputs.py the contract).

The pool is one tensor, block-major, so that a block's KV over all layers is one contiguous run
of host memory:

    host[num_host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]      (2: keys, values)
    device cache of layer l: [2, num_blocks, block_size, num_kv_heads, head_dim]  (runner/kv_cache.py)

On a GPU the pool is pinned, so the copies are DMA transfers that do not block the host; on the
CPU it is an ordinary tensor, separate from the cache, so CPU tests exercise real copies.

swap_out(pairs):  gather the source blocks of every layer on the device (index_select, stacked
                  into [n, num_layers, 2, ...]), then copy that into the host blocks, one copy per
                  run of consecutive host ids.
swap_in(pairs):   the reverse: host runs into a device staging tensor, then index_copy_ into every
                  layer's cache.

apply() does all swap-outs of a step before its swap-ins, both on the current stream ahead of the
step's forward pass, which orders them with it: no synchronization is needed (the host never reads
the pool itself; a host block is rewritten only by a later step's copy, queued behind this one's).
Staging tensors hold at most _MAX_BLOCKS_PER_COPY blocks, bounding the device memory a swap takes.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch

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
    def __init__(self, num_blocks: int, device_caches: List[torch.Tensor]):
        first = device_caches[0]  # [2, num_device_blocks, block_size, kv_heads, head_dim]
        self.device_caches = device_caches
        self.device = first.device
        self._pinned = self.device.type == "cuda"
        self._block_shape = (len(device_caches), 2, *first.shape[2:])  # one block, every layer
        self.host = torch.empty((num_blocks, *self._block_shape), dtype=first.dtype, pin_memory=self._pinned)

    @classmethod
    def create(cls, num_blocks: int, device_caches: List[torch.Tensor]) -> Optional["HostKVPool"]:
        """The pool, or None without swap space."""
        if not num_blocks:
            return None
        pool = cls(num_blocks, device_caches)
        logger.info("KV swap pool: %d host blocks, %.2f GiB%s", num_blocks,
                    pool.host.numel() * pool.host.element_size() / 2**30, " pinned" if pool._pinned else "")
        return pool

    def apply(self, swap_out: Pairs, swap_in: Pairs) -> None:
        """A step's copies, swap-outs first (core/swap.py relies on that order)."""
        for start in range(0, len(swap_out), _MAX_BLOCKS_PER_COPY):
            self._swap_out(swap_out[start:start + _MAX_BLOCKS_PER_COPY])
        for start in range(0, len(swap_in), _MAX_BLOCKS_PER_COPY):
            self._swap_in(swap_in[start:start + _MAX_BLOCKS_PER_COPY])

    def _swap_out(self, pairs: Pairs) -> None:
        device_ids = to_device([d for d, _ in pairs], torch.int64, self.device)
        # [n, num_layers, 2, block_size, kv_heads, head_dim], contiguous
        staged = torch.stack([cache.index_select(1, device_ids).transpose(0, 1) for cache in self.device_caches],
                             dim=1)
        for index, first, length in _runs([h for _, h in pairs]):
            self.host[first:first + length].copy_(staged[index:index + length], non_blocking=self._pinned)

    def _swap_in(self, pairs: Pairs) -> None:
        staged = torch.empty((len(pairs), *self._block_shape), dtype=self.host.dtype, device=self.device)
        for index, first, length in _runs([h for h, _ in pairs]):
            staged[index:index + length].copy_(self.host[first:first + length], non_blocking=self._pinned)
        device_ids = to_device([d for _, d in pairs], torch.int64, self.device)
        for layer, cache in enumerate(self.device_caches):
            cache.index_copy_(1, device_ids, staged[:, layer].transpose(0, 1))
