"""The KV a waiting request starts with when it is admitted, instead of computing it. Pure Python.

Three sources, at most one session source per request:

    its session's pin        (sessions.py) the conversation's blocks, adopted by reference
    the prefix cache         (block_manager.py) full blocks of the same token prefix, by reference
    a host copy              (swap.py) its own KV swapped out at a preemption, or its session's;
                             copied back into newly allocated blocks

A pin covers the whole conversation (its partial last block included), so a request whose session
is pinned adopts the pin and looks no further. Otherwise the request takes the cached prefix and,
when its host copy reaches further, swaps in the rest of the copy after the cached blocks:

    blocks  [0 ........ k)[k .............. n)[n ...
             cached hits   swapped back in     allocated for the tokens it computes now

A host copy that is not used is released; so is a session's, so that a session whose turn has been
admitted holds no KV (the turn gives it back when it ends). The request's own host copy exists
only after an admission, the session's only before: never both. Whatever the source,
num_computed_tokens starts below num_tokens: a session pins one token less than its conversation,
a preempted request had not computed its last token, and a prefix-cache lookup never covers the
last token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .block_manager import BlockManager
from .request import Request
from .sessions import Session, SessionStore
from .swap import SwapSpace


@dataclass
class Reuse:
    num_tokens: int = 0  # tokens of KV the request starts with
    session: Optional[Session] = None  # the request's session, if it holds KV
    from_session: bool = False  # the session hands its KV (pin or host copy) over; else drops it
    cached_blocks: List[int] = field(default_factory=list)  # prefix-cache hits, taken by reference
    key_ids: List[int] = field(default_factory=list)
    swap_in: bool = False  # the host copy's blocks past the cached ones are copied back
    num_device_blocks: int = 0  # blocks it gets without allocating (pin or cached hits)
    num_evictable: int = 0  # of those, free-cached ones: taking them makes that many fewer free

    def num_hit_tokens(self, block_size: int) -> int:
        """Tokens whose KV was on the device already (pin or prefix cache), not copied back from
        the host."""
        if self.from_session and not self.swap_in:
            return self.num_tokens  # the session's pin
        return len(self.cached_blocks) * block_size

    def blocks_to_admit(self, bm: BlockManager, num_new_tokens: int) -> int:
        """Free blocks that admitting the request with ``num_new_tokens`` to compute takes."""
        return bm.blocks_for_tokens(self.num_tokens + num_new_tokens) - self.num_device_blocks + self.num_evictable


def plan_reuse(request: Request, bm: BlockManager, sessions: SessionStore) -> Reuse:
    """What ``request`` (WAITING, nothing computed) would start with if admitted now. Changes nothing."""
    session = sessions.holding_kv(request)
    if session is not None and session.block_ids:
        return Reuse(num_tokens=session.num_cached, session=session, from_session=True,
                     num_device_blocks=len(session.block_ids))
    blocks, key_ids = bm.find_cached_prefix(request.all_token_ids, request.cache_salt)
    if request.sampling.prompt_logprobs is not None:  # they come from computing every prompt token
        blocks, key_ids = [], []
    hit = len(blocks) * bm.block_size
    reuse = Reuse(num_tokens=hit, session=session, cached_blocks=blocks, key_ids=key_ids,
                  num_device_blocks=len(blocks), num_evictable=bm.num_evictable_among(blocks))
    host_tokens = session.num_cached if session is not None else request.num_swapped_tokens
    if host_tokens > hit:
        reuse.num_tokens, reuse.from_session, reuse.swap_in = host_tokens, session is not None, True
    return reuse


def apply_reuse(request: Request, reuse: Reuse, bm: BlockManager, sessions: SessionStore,
                swap: Optional[SwapSpace]) -> None:
    """Give ``request`` the KV of ``reuse`` (planned just now): it then holds blocks covering
    reuse.num_tokens, its num_computed_tokens, and no host blocks."""
    if reuse.from_session:
        sessions.hand_over(request)
    elif reuse.session is not None:
        sessions.drop_kv(reuse.session)
    if reuse.cached_blocks:
        bm.take_cached(request, reuse.cached_blocks, reuse.key_ids)
    host = request.host_block_ids
    if host:
        if reuse.swap_in:
            first = len(request.block_ids)
            if not bm.allocate(request, reuse.num_tokens):
                raise RuntimeError(f"no blocks to swap request {request.request_id} back in; the admission "
                                   f"check should have found them")
            swap.swap_in(host[first:], request.block_ids[first:])
        swap.release(host, read_this_step=reuse.swap_in)
        request.host_block_ids = []
        request.num_swapped_tokens = 0
    request.num_computed_tokens = reuse.num_tokens
