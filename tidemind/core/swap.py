"""KV swap to host memory: the host block pool and the copies a step asks of the runner. Pure Python.

The runner keeps a host pool beside the device KV cache (runner/swap.py: pinned memory on a GPU, a
separate tensor on the CPU) of ``num_blocks`` blocks shaped like device blocks, ids
0..num_blocks-1. This is its bookkeeping:

- swap_out(device blocks) -> host blocks: each device block's KV is copied to a host block of its
  own, when the pool has room. The caller records the host blocks on the holder and frees the
  device blocks. Holders of host blocks: a WAITING request preempted with its KV swapped out
  instead of dropped (``Request.host_block_ids``), an idle session whose device pin was released
  under memory pressure (sessions.py).
- swap_in(host blocks, device blocks): the copies back, pairwise, when a request is admitted again;
  then the host blocks are released.
- Each step's copies reach the runner as SchedulerOutput.swap_out / swap_in, lists of
  (source, destination) block id pairs.

Step order, the runner's contract: all swap-outs of a step, then all swap-ins, then the forward
pass. Hence a device block freed by a swap-out may be handed out again in the same step (to a
swap-in or to a new request's prefill): it is read before it is overwritten. The reverse is not
safe: a host block released by a swap-in is read after the step's swap-outs, which could overwrite
it, so it becomes free only when the next step begins (begin_step). Host blocks given up unread
(an abort, an idle session's copy dropped to make room for a preempted request) are free at once.

Invariant (check_invariants): every host block is exactly one of free (once), held by one holder
(once), or released this step (once).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, List, Optional, Sequence, Tuple

CopyPairs = List[Tuple[int, int]]  # (source block id, destination block id)


class SwapSpace:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: a host swap pool needs at least one block")
        self.num_total_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._released: List[int] = []  # read by this step's swap-ins: free from the next step
        self._swap_out: CopyPairs = []  # this step's (device, host) copies
        self._swap_in: CopyPairs = []  # this step's (host, device) copies
        self.num_blocks_swapped_out = 0  # lifetime counters (metrics)
        self.num_blocks_swapped_in = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def begin_step(self) -> None:
        """Start a step's schedule: host blocks read by the previous step's swap-ins are free."""
        self._free.extend(self._released)
        self._released = []
        self._swap_out = []
        self._swap_in = []

    def take_copies(self) -> Tuple[CopyPairs, CopyPairs]:
        """(swap_out, swap_in) pairs recorded since begin_step, for the SchedulerOutput."""
        copies = self._swap_out, self._swap_in
        self._swap_out, self._swap_in = [], []
        return copies

    def swap_out(self, device_blocks: Sequence[int]) -> Optional[List[int]]:
        """Host blocks that receive copies of ``device_blocks`` (in order), or None, changing
        nothing, when fewer are free."""
        n = len(device_blocks)
        if n == 0 or n > len(self._free):
            return None
        host = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        host.reverse()
        self._swap_out.extend(zip(device_blocks, host))
        self.num_blocks_swapped_out += n
        return host

    def swap_in(self, host_blocks: Sequence[int], device_blocks: Sequence[int]) -> None:
        """Copy ``host_blocks`` back into ``device_blocks``, pairwise. The caller then releases the
        host blocks (release(..., read_this_step=True))."""
        if len(host_blocks) != len(device_blocks):
            raise RuntimeError(f"swap-in of {len(host_blocks)} host blocks into {len(device_blocks)} device blocks")
        self._swap_in.extend(zip(host_blocks, device_blocks))
        self.num_blocks_swapped_in += len(host_blocks)

    def release(self, host_blocks: Iterable[int], read_this_step: bool) -> None:
        """Give host blocks back: at the next step if a swap-in of this step reads them, else now."""
        (self._released if read_this_step else self._free).extend(host_blocks)

    def check_invariants(self, holders: Iterable[Sequence[int]]) -> None:
        """Raise AssertionError unless free, released and held host blocks partition the pool."""
        seen = Counter(self._free) + Counter(self._released)
        for blocks in holders:
            seen.update(blocks)
        wrong = {b: c for b, c in seen.items() if c != 1 or not 0 <= b < self.num_total_blocks}
        missing = self.num_total_blocks - len(seen)
        if wrong or missing:
            raise AssertionError(f"host blocks out of place (id: times seen) {wrong}, {missing} unaccounted for")
