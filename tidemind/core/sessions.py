"""Conversations that keep their KV cache between turns (interactive sessions). Pure Python.

A session holds the token ids of its conversation so far and, while memory allows, the KV blocks
of all of them but the last (the last sampled token's KV is computed by the next turn):

    token_ids  [0 .......................... num_cached)[num_cached .. len)
                KV in block_ids                           not computed yet

The next turn's request is the conversation plus the new turn's tokens. When it is admitted it
adopts the session's blocks and starts at num_cached instead of recomputing the conversation.
When blocks run short, idle sessions give theirs back, least recently used first, and keep their
tokens: a later turn then recomputes them. A turn that is aborted leaves the conversation as it
was before the turn.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, List, Optional

from .block_manager import BlockManager
from .request import Request


class Session:
    __slots__ = ("session_id", "token_ids", "block_ids", "num_cached", "active_request_id")

    def __init__(self, session_id: int):
        self.session_id = session_id
        self.token_ids: List[int] = []
        self.block_ids: List[int] = []
        self.num_cached = 0  # leading token_ids whose KV is in block_ids
        self.active_request_id: Optional[int] = None  # the request running this session's turn

    def __repr__(self) -> str:
        return (f"Session(id={self.session_id}, tokens={len(self.token_ids)}, cached={self.num_cached}, "
                f"blocks={len(self.block_ids)}, active={self.active_request_id})")


class SessionStore:
    def __init__(self, block_manager: BlockManager):
        self._block_manager = block_manager
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

    def adoptable(self, request: Request) -> tuple:
        """(tokens, blocks) of KV the request could take over from its session at admission."""
        session = self._sessions.get(request.session_id) if request.session_id is not None else None
        if session is None or not session.block_ids or request.num_computed_tokens:
            return 0, 0
        return session.num_cached, len(session.block_ids)

    def adopt(self, request: Request) -> None:
        """Hand the session's cached KV to its (waiting, blockless) request being admitted."""
        session = self._sessions[request.session_id]
        request.block_ids, session.block_ids = session.block_ids, []
        request.num_computed_tokens = request.num_cached_tokens = session.num_cached
        session.num_cached = 0

    def finish_turn(self, request: Request, keep: bool) -> None:
        """End the request's turn. keep: the conversation becomes the request's tokens and keeps
        its KV (the request's blocks move to the session); else the turn is forgotten."""
        session = self._sessions.get(request.session_id)
        if session is None or session.active_request_id != request.request_id:
            return  # the session was ended while the turn ran
        session.active_request_id = None
        if not keep:
            # The conversation is as before the turn. Positions below the KV the turn adopted are
            # still valid in the request's blocks (unless a preemption has not recomputed them
            # yet), so they go back to the session and the next turn still reuses them.
            cached = request.num_cached_tokens
            if cached and request.num_computed_tokens >= cached and not session.block_ids:
                self._block_manager.trim(request, cached)
                session.block_ids, request.block_ids = request.block_ids, []
                session.num_cached = cached
            return
        self._block_manager.free(session)  # stale KV of an earlier turn, if any
        session.token_ids = request.all_token_ids
        session.num_cached = request.num_computed_tokens
        self._block_manager.trim(request, request.num_computed_tokens)
        session.block_ids, request.block_ids = request.block_ids, []

    def evict(self, num_blocks: int, keep_session_id: Optional[int] = None) -> None:
        """Free idle sessions' KV, least recently used first, until ``num_blocks`` blocks are free
        (or no idle session holds any). Their tokens stay: a later turn recomputes them."""
        bm = self._block_manager
        for session in list(self._sessions.values()):
            if bm.num_free_blocks >= num_blocks:
                return
            if session.active_request_id is None and session.block_ids and session.session_id != keep_session_id:
                bm.free(session)
                session.num_cached = 0

    def end(self, session_id: int) -> Optional[int]:
        """Forget a session and free its KV; returns the id of its running request, if any (the
        caller aborts it)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        self._block_manager.free(session)
        return session.active_request_id

    def holders(self) -> Iterable[Session]:
        return [s for s in self._sessions.values() if s.block_ids]

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(s.block_ids) for s in self._sessions.values())
