"""Paged KV-cache bookkeeping: which block ids each request owns. Pure Python, no torch.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots, ids 0..num_blocks-1. A request's
``block_ids`` is its block table: token position p lives in block ``block_ids[p // block_size]`` at
slot ``p % block_size``.

Every block carries a reference count (the number of block tables that hold it):
    ref_count == 0  <=>  the block is in the free stack (exactly once)
    ref_count == k  <=>  the block appears k times over all live block tables (never twice in one)
Today every allocated block has ref_count 1; counting already lets shared prompt blocks (prefix
caching) be added by bumping counts instead of rewriting allocate/free.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, List, Protocol

from .request import Request


class BlockHolder(Protocol):
    """Anything with a block table: a request, or a session keeping its KV between turns."""

    block_ids: List[int]


class _Blocks:
    """A bare block table (for freeing part of a holder's blocks)."""

    def __init__(self, block_ids: List[int]):
        self.block_ids = block_ids

    def __repr__(self) -> str:
        return f"blocks {self.block_ids}"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1 token")
        self._num_blocks = num_blocks
        self._block_size = block_size
        # LIFO stack of free ids: pop() hands out low ids first on a fresh cache, and blocks freed
        # last are reused first (their memory is the most likely to still be warm).
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts: List[int] = [0] * num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of the blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self._num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a block table needs to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self._block_size)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks ``request`` needs so that its block table covers ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self._block_size) - len(request.block_ids))

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow ``request.block_ids`` to cover ``num_tokens`` tokens. All or nothing: returns False,
        changing nothing, when too few blocks are free."""
        need = -(-num_tokens // self._block_size) - len(request.block_ids)
        if need <= 0:
            return True
        free = self._free
        if need > len(free):
            return False
        taken = free[-need:]
        del free[-need:]
        taken.reverse()  # the stack's top first
        ref_counts = self._ref_counts
        for block_id in taken:
            ref_counts[block_id] = 1
        request.block_ids.extend(taken)
        return True

    def free(self, holder: BlockHolder) -> None:
        """Drop the holder's references to its blocks; blocks nobody else holds become free.

        ``holder.block_ids`` is replaced by a new empty list rather than cleared, so a block table
        already handed to the runner in a SchedulerOutput stays intact.
        """
        block_ids = holder.block_ids
        if not block_ids:
            return
        ref_counts = self._ref_counts
        free = self._free
        # Pushed last block first, so the holder's first block is on top and is handed out first.
        for block_id in reversed(block_ids):
            count = ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} of {holder!r} was already free")
            ref_counts[block_id] = count
            if count == 0:
                free.append(block_id)
        holder.block_ids = []

    def trim(self, holder: BlockHolder, num_tokens: int) -> None:
        """Free the holder's blocks beyond the first ``num_tokens`` tokens."""
        keep = -(-num_tokens // self._block_size)
        if keep >= len(holder.block_ids):
            return
        tail = _Blocks(holder.block_ids[keep:])
        holder.block_ids = holder.block_ids[:keep]
        self.free(tail)

    def check_invariants(self, owners: Iterable[BlockHolder]) -> None:
        """Raise AssertionError unless every block is either free (once) or owned, never both, and
        each block's reference count equals the number of ``owners`` holding it. O(num_blocks):
        for tests and debugging, not for the step loop. (Explicit raises, not `assert`: the checks
        also run under `python -O`.)"""
        free_counts = Counter(self._free)
        duplicates = [b for b, c in free_counts.items() if c > 1]
        if duplicates:
            raise AssertionError(f"blocks {duplicates} are in the free stack more than once")
        held = Counter()
        for owner in owners:
            table = owner.block_ids
            if len(set(table)) != len(table):
                raise AssertionError(f"{owner!r} holds a block twice: {table}")
            held.update(table)
        unknown = [b for b in list(held) + list(free_counts) if not 0 <= b < self._num_blocks]
        if unknown:
            raise AssertionError(f"block ids out of range: {unknown}")
        for block_id, count in enumerate(self._ref_counts):
            in_free = block_id in free_counts
            if in_free != (count == 0):
                raise AssertionError(f"block {block_id}: ref_count {count} but "
                                     f"{'in' if in_free else 'not in'} the free stack")
            if held[block_id] != count:
                raise AssertionError(f"block {block_id}: ref_count {count} but held by "
                                     f"{held[block_id]} block tables")
