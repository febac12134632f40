"""Paged KV-cache bookkeeping: which block ids each holder owns, and the prefix cache. Pure Python.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots, ids 0..num_blocks-1. A holder's
``block_ids`` is its block table: token position p lives in block ``block_ids[p // block_size]`` at
slot ``p % block_size``. Holders are running requests and interactive sessions pinning their
conversation between turns (sessions.py).

Every block is in exactly one of three states:

    referenced      ref_count k >= 1: it appears k times over all live block tables (never twice
                    in one); it may carry a prefix key (then its KV is complete and shareable)
    free-cached     ref_count 0, carries a key, in the LRU ``_evictable`` (once): its KV stays
                    valid and a request with the same prefix takes it back by reference
    free-uncached   ref_count 0, no key, in the free stack ``_free`` (once)

``num_free_blocks`` counts both free states: allocate() takes free-uncached blocks first and evicts
free-cached ones (least recently freed first, dropping their key) only when those run out.

Prefix cache (``enable_prefix_caching``; off, no block ever carries a key and the LRU stays empty).
A full block whose KV is computed is registered under the key

    (parent, tokens)    tokens: the block's block_size token ids, as a tuple
                        parent: the key id of the block before it in its sequence (an int), or,
                        for a first block, ("root", the request's cache salt): the salt is None
                        unless the request names one (a LoRA adapter, or a tenant that must not
                        share KV, would)

Key ids are handed out once and never reused, so by induction a key names exactly one token
sequence from position 0: two different prefixes never share a block, whatever their hash values
(the dict compares keys, so a hash collision costs a probe, never a wrong block). ``_cached`` maps
key -> block, ``_key_of[block]`` is the reverse. A holder keeps ``key_ids``: the key id of each of
its leading full, computed blocks, in order; a request registers its blocks as they fill
(cache_full_blocks, called by the scheduler after a step that fills one). When the key is already
cached (another request computed the same prefix in the same steps), the request's own block stays
unregistered, a duplicate, and its chain goes on from the cached block's key id.

A lookup (find_cached_prefix) walks a new request's full blocks from the first, stopping at the
first miss, and never covers the request's last token: something must be computed to sample from.
Freeing a block table puts its blocks into the LRU last block first, so a sequence's tail is
evicted before its head (a head without its tail still hits; a tail without its head never can).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Dict, Hashable, Iterable, List, Optional, Protocol, Sequence, Tuple

from .request import Request

BlockKey = Tuple[Hashable, Tuple[int, ...]]  # (parent key id or cache salt, the block's tokens)


def block_key(parent: Hashable, tokens: Sequence[int]) -> BlockKey:
    """The prefix-cache key of a full block: its tokens and what came before them (see above)."""
    return parent, tuple(tokens)


def _root(salt: Hashable) -> Hashable:
    """The parent of a sequence's first block: never equal to a key id, whatever the salt."""
    return "root", salt


class BlockHolder(Protocol):
    """Anything with a block table: a request, or a session pinning its KV between turns."""

    block_ids: List[int]
    key_ids: List[int]  # key ids of the leading full blocks (empty without prefix caching)


class _Blocks:
    """A bare block table (for freeing part of a holder's blocks)."""

    def __init__(self, block_ids: List[int]):
        self.block_ids = block_ids
        self.key_ids: List[int] = []

    def __repr__(self) -> str:
        return f"blocks {self.block_ids}"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1 token")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # LIFO stack of free-uncached ids: pop() hands out low ids first on a fresh cache, and
        # blocks freed last are reused first (their memory is the most likely to still be warm).
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts: List[int] = [0] * num_blocks
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # free-cached, oldest first
        self._cached: Dict[BlockKey, int] = {}  # key -> the block holding that prefix's KV
        self._key_of: List[Optional[BlockKey]] = [None] * num_blocks
        self._key_id_of: List[int] = [-1] * num_blocks  # -1: no key
        self._next_key_id = 0
        self.num_evictions = 0  # cached blocks given up for new allocations (metrics)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out: free-uncached plus free-cached (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of the blocks in use (referenced), in [0, 1]."""
        return 1.0 - self.num_free_blocks / self._num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a block table needs to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self._block_size)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks ``request`` needs so that its block table covers ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self._block_size) - len(request.block_ids))

    # ------------------------------------------------------------------ allocation

    def allocate(self, request: BlockHolder, num_tokens: int) -> bool:
        """Grow ``request.block_ids`` to cover ``num_tokens`` tokens. All or nothing: returns False,
        changing nothing, when too few blocks are free (free-cached ones included)."""
        need = -(-num_tokens // self._block_size) - len(request.block_ids)
        if need <= 0:
            return True
        free = self._free
        if need > len(free) + len(self._evictable):
            return False
        from_stack = min(need, len(free))
        taken = free[len(free) - from_stack:]
        del free[len(free) - from_stack:]
        taken.reverse()  # the stack's top first
        for _ in range(need - from_stack):
            taken.append(self._evict_oldest())
        ref_counts = self._ref_counts
        for block_id in taken:
            ref_counts[block_id] = 1
        request.block_ids.extend(taken)
        return True

    def drop_cached_blocks(self) -> int:
        """Forget every cached block nobody holds: they become plain free blocks (blocks requests
        or sessions hold keep their keys). Returns how many were dropped."""
        count = len(self._evictable)
        while self._evictable:
            self._free.append(self._evict_oldest())
        return count

    def _evict_oldest(self) -> int:
        block_id, _ = self._evictable.popitem(last=False)
        del self._cached[self._key_of[block_id]]
        self._key_of[block_id] = None
        self._key_id_of[block_id] = -1
        self.num_evictions += 1
        return block_id

    def free(self, holder: BlockHolder) -> None:
        """Drop the holder's references to its blocks. A block nobody else holds becomes free:
        free-cached (LRU) if it carries a key, else free-uncached.

        ``holder.block_ids`` is replaced by a new empty list rather than cleared, so a block table
        already handed to the runner in a SchedulerOutput stays intact.
        """
        block_ids = holder.block_ids
        holder.key_ids = []
        if not block_ids:
            return
        ref_counts = self._ref_counts
        key_of = self._key_of
        # Last block first: the holder's first block ends on top of the free stack (handed out
        # first) and last in the LRU (evicted last).
        for block_id in reversed(block_ids):
            count = ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} of {holder!r} was already free")
            ref_counts[block_id] = count
            if count == 0:
                if key_of[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None
        holder.block_ids = []

    def trim(self, holder: BlockHolder, num_tokens: int) -> int:
        """Free the holder's blocks beyond the first ``num_tokens`` tokens; its key ids keep only
        blocks wholly inside them. Returns the tokens the holder still covers: ``num_tokens``, or
        fewer when the block they end in is partly theirs and registered in the prefix cache (the
        holder will write past ``num_tokens`` into it, and a cached block must never change), in
        which case that block goes too."""
        bs = self._block_size
        keep = -(-num_tokens // bs)
        if keep > num_tokens // bs and keep <= len(holder.block_ids) \
                and self._key_of[holder.block_ids[keep - 1]] is not None:
            keep -= 1
            num_tokens = keep * bs
        del holder.key_ids[num_tokens // bs:]
        if keep < len(holder.block_ids):
            tail = _Blocks(holder.block_ids[keep:])
            holder.block_ids = holder.block_ids[:keep]
            self.free(tail)
        return num_tokens

    # ------------------------------------------------------------------ prefix cache

    def find_cached_prefix(self, token_ids: Sequence[int], salt: Hashable = None) -> Tuple[List[int], List[int]]:
        """(blocks, their key ids) holding the longest cached prefix of ``token_ids`` in whole
        blocks, leaving at least the last token out. Changes nothing; ([], []) with caching off."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self._block_size
        blocks: List[int] = []
        key_ids: List[int] = []
        parent = _root(salt)
        cached = self._cached
        for start in range(0, len(token_ids) - bs, bs):  # full blocks ending before the last token
            block_id = cached.get(block_key(parent, token_ids[start:start + bs]))
            if block_id is None:
                break
            blocks.append(block_id)
            parent = self._key_id_of[block_id]
            key_ids.append(parent)
        return blocks, key_ids

    def num_evictable_among(self, block_ids: Iterable[int]) -> int:
        """How many of ``block_ids`` are free-cached: taking them makes that many fewer free."""
        ref_counts = self._ref_counts
        return sum(1 for b in block_ids if ref_counts[b] == 0)

    def take_cached(self, holder: BlockHolder, block_ids: Sequence[int], key_ids: Sequence[int]) -> None:
        """Give a holder with an empty block table the cached blocks of find_cached_prefix, by
        reference (a free-cached block leaves the LRU)."""
        if holder.block_ids:
            raise RuntimeError(f"{holder!r} already holds blocks; cached blocks start a block table")
        ref_counts = self._ref_counts
        for block_id in block_ids:
            if ref_counts[block_id] == 0:
                del self._evictable[block_id]
            ref_counts[block_id] += 1
        holder.block_ids = list(block_ids)
        holder.key_ids = list(key_ids)

    def cache_full_blocks(self, holder: BlockHolder, token_ids: Sequence[int], num_computed_tokens: int,
                          salt: Hashable = None) -> None:
        """Register the holder's blocks that ``num_computed_tokens`` fills, after those already in
        ``holder.key_ids``; ``token_ids`` are the holder's tokens. A no-op with caching off."""
        if not self.enable_prefix_caching:
            return
        bs = self._block_size
        key_ids = holder.key_ids
        for index in range(len(key_ids), num_computed_tokens // bs):
            parent = key_ids[-1] if key_ids else _root(salt)
            key = block_key(parent, token_ids[index * bs:(index + 1) * bs])
            block_id = holder.block_ids[index]
            existing = self._cached.get(key)
            if existing is not None:  # the same prefix is cached already: this block is a duplicate
                key_ids.append(self._key_id_of[existing])
                continue
            if self._key_of[block_id] is not None:
                raise RuntimeError(f"block {block_id} of {holder!r} is cached under another prefix")
            self._cached[key] = block_id
            self._key_of[block_id] = key
            self._key_id_of[block_id] = self._next_key_id
            key_ids.append(self._next_key_id)
            self._next_key_id += 1

    # ------------------------------------------------------------------ checks (tests, debugging)

    def check_invariants(self, owners: Iterable[BlockHolder]) -> None:
        """Raise AssertionError unless every block is in exactly one state (referenced, free-cached
        in the LRU once, free-uncached in the stack once), each reference count equals the number
        of ``owners`` holding the block, the key map and the per-block keys agree, and each owner's
        key ids chain through its registered blocks. O(num_blocks): for tests and debugging.
        (Explicit raises, not `assert`: the checks also run under `python -O`.)"""
        free_counts = Counter(self._free)
        duplicates = [b for b, c in free_counts.items() if c > 1]
        if duplicates:
            raise AssertionError(f"blocks {duplicates} are in the free stack more than once")
        owners = list(owners)
        held = Counter()
        for owner in owners:
            table = owner.block_ids
            if len(set(table)) != len(table):
                raise AssertionError(f"{owner!r} holds a block twice: {table}")
            held.update(table)
        unknown = [b for b in list(held) + list(free_counts) + list(self._evictable)
                   if not 0 <= b < self._num_blocks]
        if unknown:
            raise AssertionError(f"block ids out of range: {unknown}")
        for block_id, count in enumerate(self._ref_counts):
            self._check_block_state(block_id, count, block_id in free_counts, held[block_id])
        if len(self._cached) != sum(k is not None for k in self._key_of):
            raise AssertionError(f"{len(self._cached)} keys map to blocks but "
                                 f"{sum(k is not None for k in self._key_of)} blocks carry a key")
        for owner in owners:
            self._check_chain(owner)

    def check_frontier(self, holder: BlockHolder, num_valid_tokens: int) -> None:
        """Raise AssertionError if a block the holder will write into (at or past the block that
        holds position ``num_valid_tokens``) is registered in the prefix cache: cached KV must never
        change. Also: its key ids cover only blocks wholly inside the valid tokens."""
        first_written = num_valid_tokens // self._block_size
        registered = [b for b in holder.block_ids[first_written:] if self._key_of[b] is not None]
        if registered:
            raise AssertionError(f"{holder!r} will write into cached blocks {registered}")
        if len(holder.key_ids) > first_written:
            raise AssertionError(f"{holder!r}: {len(holder.key_ids)} key ids but only {first_written} "
                                 f"full blocks of computed KV")

    def _check_block_state(self, block_id: int, count: int, in_free: bool, num_holders: int) -> None:
        key = self._key_of[block_id]
        in_lru = block_id in self._evictable
        states = [count > 0, in_lru, in_free]
        if sum(states) != 1:
            raise AssertionError(f"block {block_id}: ref_count {count}, in the LRU {in_lru}, in the "
                                 f"free stack {in_free}: it must be in exactly one of those states")
        if num_holders != count:
            raise AssertionError(f"block {block_id}: ref_count {count} but held by {num_holders} block tables")
        if in_lru and key is None:
            raise AssertionError(f"block {block_id} is in the LRU but carries no key")
        if in_free and key is not None:
            raise AssertionError(f"block {block_id} is free-uncached but carries key {key!r}")
        if key is not None and (self._cached.get(key) != block_id or self._key_id_of[block_id] < 0):
            raise AssertionError(f"block {block_id}: its key maps to block {self._cached.get(key)}")

    def _check_chain(self, owner: BlockHolder) -> None:
        """A registered block at index i of a table is keyed on the key id at i - 1 of the same
        table, and its own key id is the table's key id at i."""
        key_ids = owner.key_ids
        if len(key_ids) > len(owner.block_ids):
            raise AssertionError(f"{owner!r}: {len(key_ids)} key ids for {len(owner.block_ids)} blocks")
        if key_ids and not self.enable_prefix_caching:
            raise AssertionError(f"{owner!r} has key ids but prefix caching is off")
        for index, block_id in enumerate(owner.block_ids[:len(key_ids)]):
            key = self._key_of[block_id]
            if key is None:
                continue  # a duplicate of a block cached by another request
            if self._key_id_of[block_id] != key_ids[index] or (index and key[0] != key_ids[index - 1]):
                raise AssertionError(f"{owner!r}: block {block_id} at index {index} is keyed "
                                     f"{key[0]!r} -> {self._key_id_of[block_id]}, its chain says "
                                     f"{key_ids[max(0, index - 1):index + 1]}")
