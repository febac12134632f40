"""Token-budget scheduler: which requests compute how many tokens in the next engine step.

Schedule tokens, not phases. Every request has ``num_computed_tokens`` catching up to
``num_tokens`` (prompt + output); each step hands out at most ``max_num_batched_tokens`` tokens:

    running, oldest first:   each takes min(uncomputed, budget left)   decodes take 1, prefills a chunk
    then waiting, FIFO:      the head takes min(uncomputed, budget left) while blocks, budget and
                             max_batch_size allow; the head blocks the rest (nothing starves)

A chunk that reaches the end of a request's known tokens is sampled; chunked prefill, mixed
prefill+decode steps, prefix-cache hits and recompute after preemption are all this one loop. What a
step hands the runner is a delta (outputs.py): a request goes out whole the first time the runner
sees it, then as its new blocks; ``Request.runner_blocks`` records what the runner holds.

Overlap: schedule() advances num_computed_tokens at once and counts the tokens its step will
sample as in flight (Request.num_inflight), so the engine may call schedule() for step N+1 before
update() has brought step N's tokens (engine.py's overlapped loop); update() takes the steps in the
order they were scheduled. A request whose in-flight tokens bring it to its length limit is not
scheduled again; one that stops on a token it receives after its next step was scheduled wastes
that step's token, which no one reads (its KV lies beyond the tokens the request keeps). A request
preempted while a token is in flight waits at the queue's head until the token arrives, so it comes
back to the runner whole. With update() called right after each schedule(), nothing is ever in
flight at schedule time: the plain loop.

KV reuse (kv_reuse.py): an admitted request may start with num_computed_tokens > 0, from its
session's pin, the prefix cache or a host copy; admission counts the free blocks that takes (hit
blocks need none, unless they are free-cached, which then stop being free). With prefix caching
(block_manager.py), update() registers each block a step fills. With a host swap pool (swap.py), a
preempted request's computed KV is copied to the host when the pool has room (sessions' host
copies are dropped to make room first), and copied back when it is admitted again; else it is
recomputed. The step's copies go to the runner in SchedulerOutput.swap_out / swap_in.

Queue invariants (checked by check_invariants):
- ``running`` and ``waiting`` are each in add order, and every running request was added before
  every waiting one. Admission pops the waiting head onto the running tail; preemption pops the
  running tail onto the waiting head. Both keep the order, so "newest running" is running[-1].
- Only RUNNING requests hold blocks; WAITING ones have num_computed_tokens == 0 and may hold host
  blocks (swapped out); no block a request or session will write into is in the prefix cache.
- The oldest running request is only preempted when it runs alone, which cannot happen since
  add_request rejects requests that could not fit the whole cache: the oldest request always
  progresses, so every request finishes.
- schedule() is never empty while a request is unfinished: with nothing running every block is
  free or pinned by a session, pins other than the head's own session's are released for it, and
  the watermark is off, so the waiting head's first chunk fits.

Cost per step: O(number of running requests + admitted requests) plus copying the tokens of the
requests the runner sees for the first time (once per admission); a running request costs O(1)
plus its new blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Set

from ..messages import FINISH_REASONS
from .block_manager import BlockManager
from .kv_reuse import apply_reuse, plan_reuse
from .outputs import CachedRequestData, NewRequestData, RunnerOutput, SchedulerOutput
from .request import Request, RequestStatus
from .sessions import SessionStore
from .swap import SwapSpace

_RUNNING = RequestStatus.RUNNING
_WAITING = RequestStatus.WAITING
_FINISHED = RequestStatus.FINISHED


@dataclass
class _ScheduledStep:
    """What update() needs of a scheduled step: per request its num_computed_tokens after the step,
    and which requests it samples."""

    out: SchedulerOutput
    computed_after: Dict[int, int]
    sampling: Set[int]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 watermark_blocks: Optional[int] = None, num_host_blocks: int = 0):
        """``watermark_blocks``: free blocks kept back when admitting a waiting request while others
        run, so that admission does not at once force preemption of running decodes (default 1% of
        the cache, at least 1). Ignored when nothing runs: then the whole cache is available.
        ``num_host_blocks``: size of the host swap pool (0: preemption always recomputes)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= 1")
        if watermark_blocks is None:
            watermark_blocks = max(1, block_manager.num_total_blocks // 100)
        if watermark_blocks < 0:
            raise ValueError(f"watermark_blocks={watermark_blocks} must be >= 0")
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks
        self._requests: Dict[int, Request] = {}  # every unfinished request (waiting or running)
        self._waiting: Deque[Request] = deque()
        self._running: List[Request] = []
        # Ids that left the running set (finished, aborted, preempted) since the last schedule().
        self._left_ids: List[int] = []
        self._add_order: Dict[int, int] = {}  # request_id -> add_request sequence number
        # Steps scheduled and not yet updated, oldest first (more than one only while overlapping).
        self._unapplied: Deque[_ScheduledStep] = deque()
        self._step_computed: Dict[int, int] = {}  # of the step being scheduled: request_id -> computed after it
        self._step_sampling: Set[int] = set()  # of the step being scheduled: the requests it samples
        self._num_added = 0
        # Over the scheduler's lifetime (metrics): preemptions; tokens of admitted requests and,
        # of those, tokens whose KV was already on the device (a session's pin or the prefix cache).
        self.num_preemptions = 0
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.swap = SwapSpace(num_host_blocks) if num_host_blocks else None
        self.sessions = SessionStore(block_manager, self.swap)

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError (message naming the fix) for a request that can
        never run: a duplicate id, nothing to generate, or more KV than the whole cache holds."""
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already queued or running; ids must be unique")
        if request.status is not _WAITING or request.num_computed_tokens or request.block_ids:
            raise ValueError(f"request {rid} is not fresh ({request!r}); build a new Request")
        if request.max_new_tokens < 1:
            raise ValueError(f"request {rid}: max_new_tokens=0 leaves nothing to generate; answer it "
                             f"without scheduling (finish_reason 'length')")
        bm = self.block_manager
        need = bm.blocks_for_tokens(request.max_kv_tokens)
        if need > bm.num_total_blocks:
            raise ValueError(
                f"request {rid} may need {request.max_kv_tokens} tokens of KV cache ({need} blocks of "
                f"{bm.block_size}) but the cache holds {bm.num_total_blocks} blocks; lower max_new_tokens "
                f"or session_len, or give the cache more memory (cache_max_entry_count / num_gpu_blocks)")
        if request.session_id is not None:
            self.sessions.start_turn(request)
        self._requests[rid] = request
        self._add_order[rid] = self._num_added
        self._num_added += 1
        self._waiting.append(request)

    def abort_request(self, request_id: int) -> bool:
        """End a request wherever it is (finish_reason "abort"); its blocks are free on return.
        False when no unfinished request has that id."""
        return self.finish_request(request_id, "abort")

    def finish_request(self, request_id: int, reason: str) -> bool:
        """End an unfinished request from outside the step (a stop string, an abort, an error):
        free its blocks now, mark it FINISHED with ``reason``. False when no such request.
        Call it between steps; update() skips sequences whose request ended after schedule()."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason {reason!r} is not one of {FINISH_REASONS}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is _RUNNING:
            self._running.remove(request)
            self._left_ids.append(request_id)
        else:
            self._waiting.remove(request)  # holds no blocks, unknown to the runner
        self._finish(request, reason)
        return True

    def end_session(self, session_id: int) -> Optional[Request]:
        """Forget a conversation and free its KV; a turn still running is aborted and returned."""
        request_id = self.sessions.end(session_id)
        request = self._requests.get(request_id) if request_id is not None else None
        if request is not None:
            self.finish_request(request_id, "abort")
        return request

    def get_request(self, request_id: int) -> Optional[Request]:
        """The unfinished request with that id, or None."""
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.swap is not None:
            self.swap.begin_step()
        budget, preempted = self._schedule_running(out, self.max_num_batched_tokens)
        if not preempted:  # a step that had to preempt is short of blocks: admit nobody
            self._admit_waiting(out, budget)
        out.finished_request_ids, self._left_ids = self._left_ids, []
        if self.swap is not None:
            out.swap_out, out.swap_in = self.swap.take_copies()
        if not out.is_empty:  # the engine runs and applies exactly the steps that are not empty
            self._unapplied.append(_ScheduledStep(out, self._step_computed, self._step_sampling))
        self._step_computed, self._step_sampling = {}, set()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int):
        """Give each running request, oldest first, min(uncomputed, budget left) tokens. Out of
        blocks, preempt the newest running request and retry; a request that has to preempt itself
        ends the pass. Returns (budget left, whether anything was preempted)."""
        running = self._running
        allocate = self.block_manager.allocate
        preempted = False
        i = 0
        # Requests before index i are scheduled this step; preemption only takes running[-1], so
        # it never takes one of them (i < len(running) while we look at running[i]).
        while i < len(running) and budget > 0:
            request = running[i]
            if request.ends_with_inflight_tokens:
                i += 1  # ends when its in-flight tokens arrive: no step of its own
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            while not allocate(request, request.num_computed_tokens + num_tokens):
                # Idle conversations give their KV back before running requests are preempted.
                need = self.block_manager.blocks_needed(request, request.num_computed_tokens + num_tokens)
                self.sessions.evict(need)
                if allocate(request, request.num_computed_tokens + num_tokens):
                    break
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    return budget, preempted
            self._emit(out, request, num_tokens)
            budget -= num_tokens
            i += 1
        return budget, preempted

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests in add order (preempted ones come first, being older) while the
        batch has room, budget is left and the head's first chunk fits above the watermark."""
        waiting = self._waiting
        running = self._running
        bm = self.block_manager
        while waiting and budget > 0 and len(running) < self.max_batch_size:
            request = waiting[0]
            if request.num_inflight:
                return  # preempted with a token in flight: readmitted once it has arrived
            # The KV it starts with: its session's, the prefix cache's or a host copy (kv_reuse.py).
            reuse = plan_reuse(request, bm, self.sessions)
            num_tokens = min(request.num_tokens - reuse.num_tokens, budget)
            reserve = self.watermark_blocks if running else 0
            need = reuse.blocks_to_admit(bm, num_tokens) + reserve
            if need > bm.num_free_blocks:
                self.sessions.evict(need, keep_session_id=request.session_id)
                # Released pins may have made hit blocks free-cached (or moved them to the host).
                reuse = plan_reuse(request, bm, self.sessions)
                num_tokens = min(request.num_tokens - reuse.num_tokens, budget)
                if reuse.blocks_to_admit(bm, num_tokens) + reserve > bm.num_free_blocks:
                    return  # the head waits for blocks; later requests wait behind it (no skipping)
            if request.session_id is not None and request.num_preemptions == 0:
                # What the turn reuses of its conversation (the interactive API's history_tokens).
                request.num_cached_tokens = min(reuse.num_tokens, len(self.sessions.history(request.session_id)))
            apply_reuse(request, reuse, bm, self.sessions, self.swap)
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += reuse.num_hit_tokens(bm.block_size)
            bm.allocate(request, reuse.num_tokens + num_tokens)
            waiting.popleft()
            request.status = _RUNNING
            running.append(request)
            self._emit(out, request, num_tokens)
            budget -= num_tokens

    def _emit(self, out: SchedulerOutput, request: Request, num_tokens: int) -> None:
        """Schedule ``num_tokens`` of ``request`` (blocks already allocated): the whole request if
        the runner does not hold it, else the blocks it gained since the runner last saw it. Its
        num_computed_tokens advances now; a chunk that reaches its end samples one token."""
        rid = request.request_id
        out.num_scheduled_tokens[rid] = num_tokens
        if request.runner_blocks is None:
            out.new_requests.append(NewRequestData(
                request_id=rid, prompt_token_ids=tuple(request.prompt_token_ids),
                output_token_ids=tuple(request.output_token_ids), sampling=request.sampling,
                block_ids=tuple(request.block_ids), num_computed_tokens=request.num_computed_tokens))
        else:
            out.cached_requests.append(CachedRequestData(
                request_id=rid, new_block_ids=tuple(request.block_ids[request.runner_blocks:]),
                num_computed_tokens=request.num_computed_tokens))
        request.runner_blocks = len(request.block_ids)
        request.num_computed_tokens += num_tokens
        self._step_computed[rid] = request.num_computed_tokens
        if request.num_computed_tokens == request.num_tokens + request.num_inflight:
            request.num_inflight += 1
            self._step_sampling.add(rid)

    def _preempt(self, request: Request) -> None:
        # Drop the KV, keep the tokens: its outputs stay in all_token_ids and are computed again as
        # prompt when it is readmitted (less what a host copy or the prefix cache gives back);
        # nothing already generated changes.
        if self.swap is not None and request.num_computed_tokens:
            self._swap_out(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.runner_blocks = None
        request.status = _WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Newer than every other running request, older than every waiting one: the front.
        self._waiting.appendleft(request)
        self._left_ids.append(request.request_id)

    def _swap_out(self, request: Request) -> None:
        """Copy the computed KV of ``request`` (being preempted) to the host pool, if it has room
        once sessions' host copies are dropped; else it is recomputed."""
        blocks = request.block_ids[:self.block_manager.blocks_for_tokens(request.num_computed_tokens)]
        if self.swap.num_free_blocks < len(blocks):
            self.sessions.drop_host_copies(len(blocks))
        host = self.swap.swap_out(blocks)
        if host is not None:
            request.host_block_ids = host
            request.num_swapped_tokens = request.num_computed_tokens

    def step_failed(self, scheduler_output: SchedulerOutput) -> None:
        """The runner failed on ``scheduler_output``; call before failing the step's requests. Its
        block copies may not have happened: the host copies its swap-outs were to fill are dropped
        (those requests and sessions recompute), and a request swapped in by it claims only the KV
        before its first swapped-in block (what an aborted turn gives back to its session). The
        step is never applied: update() must not be called for it."""
        self._unapplied = deque(step for step in self._unapplied if step.out is not scheduler_output)
        if not scheduler_output.swap_out and not scheduler_output.swap_in:
            return
        doomed = {host for _, host in scheduler_output.swap_out}
        for request in self._waiting:
            if doomed.intersection(request.host_block_ids):
                self.swap.release(request.host_block_ids, read_this_step=False)
                request.host_block_ids = []
                request.num_swapped_tokens = 0
        self.sessions.drop_host_blocks(doomed)
        not_copied = {device for _, device in scheduler_output.swap_in}
        for request in self._running:
            first = next((i for i, b in enumerate(request.block_ids) if b in not_copied), None)
            if first is not None:
                request.num_computed_tokens = min(request.num_computed_tokens, first * self.block_manager.block_size)

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> List[Request]:
        """Apply one executed step, the oldest not yet applied: append sampled tokens, register
        the blocks it filled, end the requests that stop. Returns the requests that received a
        token, in schedule order; the finished ones among them are FINISHED with a finish_reason and
        own no blocks."""
        record = self._take_step(scheduler_output)
        sampled = runner_output.sampled_token_ids
        received: List[Request] = []
        any_finished = False
        bm = self.block_manager
        caching, bs = bm.enable_prefix_caching, bm.block_size
        scheduled = scheduler_output.num_scheduled_tokens
        for request_id, computed in record.computed_after.items():
            request = self._requests.get(request_id)
            if request is None:
                continue  # ended (abort, stop string, error) after it was scheduled
            # A step that fills a block registers it (and any filled before without a step of their
            # own: blocks swapped back in at admission). Not when the request was preempted since.
            if caching and request.status is _RUNNING and request.num_computed_tokens >= computed \
                    and computed // bs != (computed - scheduled[request_id]) // bs:
                bm.cache_full_blocks(request, request.all_token_ids, computed, request.cache_salt)
            if request_id not in record.sampling:
                continue  # a prompt chunk that does not reach the end: nothing sampled
            try:
                token_id = sampled[request_id]
            except KeyError:
                raise RuntimeError(f"the runner sampled no token for request {request_id}, whose "
                                   f"computed tokens reached its end") from None
            request.num_inflight -= 1
            request.append_token(token_id)
            received.append(request)
            reason = request.stop_reason(token_id)
            if reason is not None:
                del self._requests[request_id]
                if request.status is _RUNNING:
                    self._left_ids.append(request_id)
                    any_finished = True
                else:  # preempted after this step was scheduled: the runner has forgotten it already
                    self._waiting.remove(request)
                self._finish(request, reason)
        if any_finished:
            self._running = [r for r in self._running if r.status is _RUNNING]
        return received

    def _take_step(self, scheduler_output: SchedulerOutput) -> _ScheduledStep:
        """The record of ``scheduler_output``, which must be the oldest step not yet applied."""
        if scheduler_output.is_empty:
            return _ScheduledStep(scheduler_output, {}, set())  # nothing ran: nothing to apply
        if not self._unapplied or self._unapplied[0].out is not scheduler_output:
            raise RuntimeError("update() must apply the scheduled steps in the order schedule() made them")
        return self._unapplied.popleft()

    def _finish(self, request: Request, reason: str) -> None:
        # KV kept (a session's) is that of known tokens only, and never of the last one, as when
        # nothing is in flight: steps scheduled past the end compute tokens no one reads.
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        request.num_inflight = 0
        if request.session_id is not None:
            # A completed turn keeps its KV in the session; an aborted one is forgotten.
            self.sessions.finish_turn(request, keep=reason in ("stop", "length"))
        self.block_manager.free(request)
        if request.host_block_ids:  # a preempted request swapped out, ended while waiting
            self.swap.release(request.host_block_ids, read_this_step=False)
            request.host_block_ids = []
            request.num_swapped_tokens = 0
        request.runner_blocks = None
        request.status = _FINISHED
        request.finish_reason = reason
        self._add_order.pop(request.request_id, None)

    # ------------------------------------------------------------------ checks (tests, debugging)

    def check_invariants(self) -> None:
        """Raise AssertionError when the queues, the requests' token regions or the blocks are
        inconsistent. O(requests + blocks): for tests and debugging, not for the step loop."""
        running, waiting = self._running, list(self._waiting)
        if len(running) > self.max_batch_size:
            raise AssertionError(f"{len(running)} running requests exceed max_batch_size={self.max_batch_size}")
        ids = [r.request_id for r in running] + [r.request_id for r in waiting]
        if len(ids) != len(set(ids)) or set(ids) != set(self._requests):
            raise AssertionError(f"queues {ids} do not match the unfinished requests {sorted(self._requests)}")
        order = [self._add_order[i] for i in ids]
        if order != sorted(order):
            raise AssertionError(f"queues are out of add order: running+waiting ids {ids}")
        bm = self.block_manager
        bs = bm.block_size
        for r in running:
            if r.status is not _RUNNING or not 0 <= r.num_computed_tokens < r.num_tokens + r.num_inflight \
                    or len(r.block_ids) * bs < r.num_computed_tokens or r.host_block_ids:
                raise AssertionError(f"bad running request {r!r}")
            bm.check_frontier(r, r.num_computed_tokens)
        for r in waiting:
            if r.status is not _WAITING or r.num_computed_tokens or r.block_ids or r.key_ids \
                    or len(r.host_block_ids) != bm.blocks_for_tokens(r.num_swapped_tokens) \
                    or r.num_swapped_tokens >= r.num_tokens + r.num_inflight:
                raise AssertionError(f"bad waiting request {r!r}")
        self.sessions.check_invariants(r.request_id for r in running)
        pins = list(self.sessions.holders())
        for session in pins:
            bm.check_frontier(session, session.num_cached)
        bm.check_invariants(list(running) + pins)
        if self.swap is not None:
            self.swap.check_invariants([r.host_block_ids for r in waiting] +
                                       [s.host_block_ids for s in self.sessions.host_holders()])
