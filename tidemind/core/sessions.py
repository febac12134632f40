"""Conversations that keep their KV cache between turns (interactive sessions). Pure Python.

A session holds the token ids of its conversation so far and, while memory allows, the KV of all of
them but the last (the last sampled token's KV is computed by the next turn):

    token_ids  [0 .......................... num_cached)[num_cached .. len)
                KV pinned on the device, or on the host   not computed yet

Where that KV is (exactly one of):
- pinned: ``block_ids`` is a block table holding a reference on each block, like a request's,
  so none of them can be freed or evicted. With prefix caching its full blocks are ordinary
  cached blocks (``key_ids`` their chain): a pin is what keeps a conversation's history in the
  cache, not a copy of it, and another request with the same prefix shares those blocks.
- swapped: ``host_block_ids`` hold a copy in the host swap pool (swap.py).
- nowhere: num_cached == 0; the next turn computes the conversation again, less what the prefix
  cache still holds.

A turn's request is the conversation plus the new turn's tokens. When the scheduler admits it, the
session hands its KV over (hand_over): the pin's references move to the request, which starts at
num_cached; a host copy moves to the request, which the scheduler swaps back in. When the turn
ends, the request's computed KV becomes the new pin (its references move back to the session).
Under memory pressure (evict) pins are released, least recently used session first, except the
one whose turn is being admitted: with a swap pool the pinned KV is first copied to the host; a
released pin's full blocks stay in the prefix cache's LRU until they are evicted. When the swap
pool is short of room for a preempted request, sessions' host copies are dropped first
(drop_host_copies). A turn that is aborted leaves the conversation as it was before the turn, and
gives back the conversation's KV it holds.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

from .block_manager import BlockManager
from .request import Request
from .swap import SwapSpace


class Session:
    __slots__ = ("session_id", "token_ids", "block_ids", "key_ids", "host_block_ids", "num_cached",
                 "active_request_id")

    def __init__(self, session_id: int):
        self.session_id = session_id
        self.token_ids: List[int] = []
        self.block_ids: List[int] = []  # the pin: a reference on each block
        self.key_ids: List[int] = []  # prefix-cache key ids of the pin's leading full blocks
        self.host_block_ids: List[int] = []  # a copy in the host swap pool
        self.num_cached = 0  # leading token_ids whose KV is pinned or swapped
        self.active_request_id: Optional[int] = None  # the request running this session's turn

    def __repr__(self) -> str:
        return (f"Session(id={self.session_id}, tokens={len(self.token_ids)}, cached={self.num_cached}, "
                f"blocks={len(self.block_ids)}, host_blocks={len(self.host_block_ids)}, "
                f"active={self.active_request_id})")


class SessionStore:
    def __init__(self, block_manager: BlockManager, swap: Optional[SwapSpace] = None):
        self._block_manager = block_manager
        self._swap = swap
        self._sessions: "OrderedDict[int, Session]" = OrderedDict()  # least recently used first

    def history(self, session_id: int) -> List[int]:
        """The conversation's token ids so far ([] for a new session)."""
        session = self._sessions.get(session_id)
        return session.token_ids if session is not None else []

    def get(self, session_id: int) -> Optional[Session]:
        return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions)

    def start_turn(self, request: Request) -> None:
        """Bind a new request to its session (opened if new); one turn at a time per session."""
        session = self._sessions.get(request.session_id)
        if session is None:
            session = self._sessions[request.session_id] = Session(request.session_id)
        if session.active_request_id is not None:
            raise ValueError(f"session {session.session_id} is busy with another request: wait for it "
                             f"to finish, or cancel it, before the next turn")
        if request.prompt_token_ids[:len(session.token_ids)] != session.token_ids:
            raise ValueError(f"request {request.request_id} does not continue session {session.session_id}: "
                             f"its prompt must start with the conversation's tokens")
        session.active_request_id = request.request_id
        self._sessions.move_to_end(request.session_id)

    def holding_kv(self, request: Request) -> Optional[Session]:
        """The session of ``request`` (WAITING, nothing computed) if it holds KV the request can take."""
        if request.session_id is None or request.num_computed_tokens:
            return None
        session = self._sessions.get(request.session_id)
        return session if session is not None and session.num_cached else None

    def hand_over(self, request: Request) -> None:
        """Move the session's KV to its request being admitted (holding no blocks): the pin's
        references and key ids (the request starts at num_cached), or the host copy (the
        scheduler swaps it in)."""
        session = self._sessions[request.session_id]
        if session.block_ids:
            request.block_ids, session.block_ids = session.block_ids, []
            request.key_ids, session.key_ids = session.key_ids, []
            request.num_computed_tokens = session.num_cached
        else:
            request.host_block_ids, session.host_block_ids = session.host_block_ids, []
            request.num_swapped_tokens = session.num_cached
        session.num_cached = 0

    def finish_turn(self, request: Request, keep: bool) -> None:
        """End the request's turn. keep: the conversation becomes the request's tokens and keeps its
        KV (the request's blocks or host copy move to the session); else the turn is forgotten and
        the conversation's part of the request's KV goes back to the session."""
        session = self._sessions.get(request.session_id)
        if session is None or session.active_request_id != request.request_id:
            return  # the session was ended while the turn ran
        session.active_request_id = None
        if keep:
            self.drop_kv(session)  # KV of an earlier turn the request did not take over, if any
            session.token_ids = request.all_token_ids
            self._take_kv(session, request, request.num_tokens)
        elif not session.num_cached and session.token_ids:
            # The conversation is as before the turn: the request's KV of its first
            # len(token_ids) - 1 positions is the conversation's own.
            self._take_kv(session, request, len(session.token_ids) - 1)

    def _take_kv(self, session: Session, request: Request, num_tokens: int) -> None:
        """Move the KV of the request's first ``num_tokens`` tokens (at most what it holds) to the
        session, which holds none."""
        bm = self._block_manager
        if request.block_ids:
            num_tokens = bm.trim(request, min(num_tokens, request.num_computed_tokens))
            session.block_ids, request.block_ids = request.block_ids, []
            session.key_ids, request.key_ids = request.key_ids, []
        elif request.host_block_ids:
            num_tokens = min(num_tokens, request.num_swapped_tokens)
            keep = bm.blocks_for_tokens(num_tokens)
            self._swap.release(request.host_block_ids[keep:], read_this_step=False)
            session.host_block_ids, request.host_block_ids = request.host_block_ids[:keep], []
            request.num_swapped_tokens = 0
        else:
            num_tokens = 0
        session.num_cached = num_tokens if session.block_ids or session.host_block_ids else 0

    def evict(self, num_blocks: int, keep_session_id: Optional[int] = None) -> None:
        """Release sessions' pins, least recently used first, until ``num_blocks`` device blocks
        are free (or no other pin is left); never the pin of ``keep_session_id``. A pinned KV goes
        to the host swap pool if it has room, else only its tokens stay: a later turn recomputes it
        (less what the prefix cache still holds)."""
        bm = self._block_manager
        for session in list(self._sessions.values()):
            if bm.num_free_blocks >= num_blocks:
                return
            if session.block_ids and session.session_id != keep_session_id:
                host = self._swap.swap_out(session.block_ids) if self._swap is not None else None
                bm.free(session)
                if host is None:
                    session.num_cached = 0
                else:
                    session.host_block_ids = host

    def drop_host_copies(self, num_host_blocks: int) -> None:
        """Drop sessions' host copies, least recently used first, until ``num_host_blocks`` host
        blocks are free (or no copy is left)."""
        for session in self._sessions.values():
            if self._swap.num_free_blocks >= num_host_blocks:
                return
            if session.host_block_ids:
                self._drop_host_copy(session)

    def drop_host_blocks(self, host_blocks: Sequence[int]) -> None:
        """Drop the host copies that use any of ``host_blocks`` (copies a failed step never made)."""
        doomed = set(host_blocks)
        for session in self._sessions.values():
            if doomed.intersection(session.host_block_ids):
                self._drop_host_copy(session)

    def _drop_host_copy(self, session: Session) -> None:
        self._swap.release(session.host_block_ids, read_this_step=False)
        session.host_block_ids = []
        session.num_cached = 0

    def drop_kv(self, session: Session) -> None:
        """Release the session's pin or host copy; only its tokens stay."""
        self._block_manager.free(session)
        if session.host_block_ids:
            self._drop_host_copy(session)
        session.num_cached = 0

    def end(self, session_id: int) -> Optional[int]:
        """Forget a session and free its KV; returns the id of its running request, if any (the
        caller aborts it)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        self.drop_kv(session)
        return session.active_request_id

    def check_invariants(self, admitted_request_ids: Iterable[int]) -> None:
        """Raise AssertionError unless every session's KV is in one place and covers num_cached
        tokens, fewer than its conversation has, and no session whose turn was admitted (one of
        ``admitted_request_ids``, the running requests) holds any."""
        admitted = set(admitted_request_ids)
        bm = self._block_manager
        for s in self._sessions.values():
            places = [bool(s.block_ids), bool(s.host_block_ids)]
            blocks = s.block_ids or s.host_block_ids
            if sum(places) > 1 or len(blocks) != bm.blocks_for_tokens(s.num_cached) \
                    or (s.num_cached and s.num_cached >= len(s.token_ids)) \
                    or (s.num_cached and s.active_request_id in admitted):
                raise AssertionError(f"bad session {s!r}")

    def holders(self) -> Iterable[Session]:
        """Sessions pinning device blocks."""
        return [s for s in self._sessions.values() if s.block_ids]

    def host_holders(self) -> Iterable[Session]:
        """Sessions holding a host copy."""
        return [s for s in self._sessions.values() if s.host_block_ids]

    @property
    def num_cached_blocks(self) -> int:
        """Distinct device blocks pinned by sessions (sessions with a common prefix share blocks).
        Read by metrics from other threads: list() copies the sessions in one step under the GIL."""
        pinned = set()
        for session in list(self._sessions.values()):
            pinned.update(session.block_ids)
        return len(pinned)
