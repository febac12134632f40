"""A model runner stand-in for scheduler tests (no torch) and the helpers that drive it.

FakeRunner holds what a real runner holds, built only from the step contract's deltas: per request
its tokens (sent once, then the tokens it sampled itself), its block table (sent once, then the new
blocks) and num_computed_tokens. It keeps a simulated paged KV cache with one value per (block,
slot) that, like real KV, depends on the whole prefix: the value at position p is
kv_value(value at p - 1, token p), and writing it reads the value at p - 1 back through the block
table (as attention reads the cache). For every request that samples it reads the whole sequence
back through the block table and checks it against the values its own tokens give, so a wrong
block table, a block shared by two live requests, a chunk at the wrong position, a delta that lost
blocks, a prefix-cache hit on a block of another prefix (even one with the same tokens), or a block
that was not swapped back in fails the test.

The host swap pool is simulated the same way: before computing, the runner applies the step's
swap-outs (device block -> host block), then its swap-ins (host -> device), exactly in the real
runner's order; a swap-in must read a host block that a swap-out filled and nothing read since
(each host copy is read once, then released).

step() also checks that the runner's tokens equal the scheduler's. The "sampled" token is a hash of
the sequence and the request's seed: deterministic, and independent of batching, chunking,
preemption, prefix caching and swapping, exactly like greedy decoding of a real model.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from tidemind.config import GenerationConfig
from tidemind.core.block_manager import BlockManager
from tidemind.core.outputs import NewRequestData, RunnerOutput, SchedulerOutput
from tidemind.core.request import Request, RequestStatus
from tidemind.core.scheduler import Scheduler

VOCAB_SIZE = 50
EOS = 7

StepRecord = List[Tuple[int, int, int, bool]]  # (request_id, start_pos, num_tokens, sample) per request


_KV_START = 12_345
_MOD = 2**61 - 1


def kv_value(previous: int, token: int) -> int:
    """The simulated KV of a token: a function of the token and of the KV before it."""
    return (previous * 1_000_003 + token + 1) % _MOD


def kv_values(tokens: Sequence[int]) -> List[int]:
    values, value = [], _KV_START
    for token in tokens:
        value = kv_value(value, token)
        values.append(value)
    return values


def reference_token(seed: int, tokens: Sequence[int], vocab_size: int = VOCAB_SIZE) -> int:
    h = (seed * 1_000_003 + 12_345) % (2**61 - 1)
    for t in tokens:
        h = (h * 31 + t + 1) % (2**61 - 1)
    return h % vocab_size


class _HeldRequest:
    """The runner's copy of one request."""

    def __init__(self, new: NewRequestData):
        self.data = new
        self.tokens: List[int] = list(new.prompt_token_ids) + list(new.output_token_ids)
        self.num_outputs = len(new.output_token_ids)
        self.block_table: List[int] = list(new.block_ids)
        self.num_computed = new.num_computed_tokens


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = VOCAB_SIZE,
                 script: Optional[Dict[int, List[int]]] = None, num_host_blocks: int = 0):
        """``script``: request_id -> the tokens to return for it, by output index, bypassing the
        hash and the min_new_tokens masking (to feed the scheduler tokens a sampler would not)."""
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: List[List[Optional[int]]] = [[None] * block_size for _ in range(num_blocks)]
        self.host_kv: List[Optional[List[Optional[int]]]] = [None] * num_host_blocks  # None: nothing to read
        self.num_swapped_out = self.num_swapped_in = 0
        self.script = dict(script or {})
        self.steps: List[StepRecord] = []
        self.left_ids: List[List[int]] = []  # SchedulerOutput.finished_request_ids, per step
        # The requests the runner holds: each departure must be reported exactly once, and only for
        # a request the runner holds; a request arrives whole only when the runner lacks it.
        self.held: Dict[int, _HeldRequest] = {}

    @property
    def live(self) -> set:
        return set(self.held)

    def drop(self, left_ids: List[int]) -> None:
        for rid in left_ids:
            assert rid in self.held, f"request {rid} reported as left, but the runner holds nothing for it"
            del self.held[rid]

    def _apply_deltas(self, out: SchedulerOutput) -> None:
        for new in out.new_requests:
            assert new.request_id not in self.held, f"request {new.request_id} sent whole twice"
            self.held[new.request_id] = _HeldRequest(new)
        for cached in out.cached_requests:
            held = self.held.get(cached.request_id)
            assert held is not None, f"delta for request {cached.request_id}, which the runner does not hold"
            assert held.num_computed == cached.num_computed_tokens, \
                f"request {cached.request_id}: runner at {held.num_computed}, scheduler at {cached.num_computed_tokens}"
            held.block_table.extend(cached.new_block_ids)
        sent = [d.request_id for d in out.new_requests] + [d.request_id for d in out.cached_requests]
        assert sorted(sent) == sorted(out.num_scheduled_tokens), "scheduled requests and deltas differ"

    def _swap(self, out: SchedulerOutput) -> None:
        """The step's block copies, swap-outs first (the real runner's order)."""
        for device, host in out.swap_out:
            assert self.kv[device][0] is not None, f"swap-out of device block {device}, which holds no KV"
            self.host_kv[host] = list(self.kv[device])
        for host, device in out.swap_in:
            assert self.host_kv[host] is not None, f"swap-in of host block {host}: no copy to read"
            self.kv[device], self.host_kv[host] = self.host_kv[host], None
        self.num_swapped_out += len(out.swap_out)
        self.num_swapped_in += len(out.swap_in)

    def _read(self, table: List[int], pos: int) -> int:
        value = self.kv[table[pos // self.block_size]][pos % self.block_size]
        assert value is not None, f"position {pos} read through {table} holds no KV"
        return value

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.drop(out.finished_request_ids)
        assert not set(out.num_scheduled_tokens) & set(out.finished_request_ids), \
            "a request leaves and runs in one step"
        self._swap(out)
        self._apply_deltas(out)
        bs = self.block_size
        record: StepRecord = []
        sampled: Dict[int, int] = {}
        for rid, num_tokens in out.num_scheduled_tokens.items():
            held = self.held[rid]
            start, end, table = held.num_computed, held.num_computed + num_tokens, held.block_table
            assert end <= len(held.tokens), f"request {rid}: {end} tokens scheduled, {len(held.tokens)} held"
            assert len(table) * bs >= end, f"block table of {rid} too short for {end} tokens"
            value = self._read(table, start - 1) if start else _KV_START
            for pos in range(start, end):
                value = kv_value(value, held.tokens[pos])
                self.kv[table[pos // bs]][pos % bs] = value
            held.num_computed = end
            sample = end == len(held.tokens)
            record.append((rid, start, num_tokens, sample))
            if sample:
                seen = [self._read(table, p) for p in range(end)]
                assert seen == kv_values(held.tokens), \
                    f"request {rid}: the KV read through {table} is not that of its tokens {held.tokens}"
                token = self._sample(rid, held, held.tokens)
                held.tokens.append(token)
                held.num_outputs += 1
                sampled[rid] = token
        self.steps.append(record)
        self.left_ids.append(list(out.finished_request_ids))
        return RunnerOutput(sampled_token_ids=sampled)

    def _sample(self, request_id: int, held: _HeldRequest, tokens: List[int]) -> int:
        index = held.num_outputs
        script = self.script.get(request_id)
        if script is not None:
            return script[index]
        params = held.data.sampling
        token = reference_token(params.seed, tokens, self.vocab_size)
        # What the real sampler does: stop ids are masked while fewer than min_new_tokens exist.
        if index < params.min_new_tokens and token in params.stop_token_ids:
            allowed = [t for t in range(self.vocab_size) if t not in params.stop_token_ids]
            token = allowed[token % len(allowed)]
        return token


def make_request(request_id: int, prompt: Iterable[int] | int, *, max_total_tokens: int = 10_000,
                 seed: Optional[int] = None, eos: Iterable[int] = (EOS,), **gen) -> Request:
    """A request; ``prompt`` is a token list, or a length (tokens derived from the id)."""
    if isinstance(prompt, int):
        prompt = [(request_id * 13 + i * 7) % VOCAB_SIZE for i in range(prompt)]
    gen.setdefault("max_new_tokens", 8)
    return Request(request_id, list(prompt), GenerationConfig(**gen),
                   seed=request_id if seed is None else seed,
                   eos_token_ids=frozenset(eos), max_total_tokens=max_total_tokens)


def make_scheduler(num_blocks: int, block_size: int, max_batch_size: int = 8,
                   max_num_batched_tokens: int = 64, watermark_blocks: int = 0,
                   script: Optional[Dict[int, List[int]]] = None, prefix_caching: bool = False,
                   num_host_blocks: int = 0) -> Tuple[Scheduler, FakeRunner]:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(bm, max_batch_size, max_num_batched_tokens, watermark_blocks=watermark_blocks,
                          num_host_blocks=num_host_blocks)
    return scheduler, FakeRunner(num_blocks, block_size, script=script, num_host_blocks=num_host_blocks)


def step(scheduler: Scheduler, runner: FakeRunner) -> Tuple[SchedulerOutput, List[Request]]:
    """One engine step, with the per-step contract checked before and after."""
    out = scheduler.schedule()
    _check_schedule(scheduler, out)
    scheduler.check_invariants()
    return out, _apply(scheduler, runner, out, runner.execute(out))


class Stepper:
    """Drives scheduler and runner one engine step at a time, as the engine's plain loop does
    (overlap=False: schedule, execute, update) or as its overlapped loop does (overlap=True: step N+1
    is scheduled and executed before update() brings step N's tokens, engine/engine.py). The fake
    runner stands for the device: it knows a step's tokens at once, the scheduler one step later."""

    def __init__(self, scheduler: Scheduler, runner: FakeRunner, overlap: bool = False):
        self.scheduler, self.runner, self.overlap = scheduler, runner, overlap
        self.in_flight: Optional[Tuple[SchedulerOutput, RunnerOutput]] = None

    @property
    def busy(self) -> bool:
        """Requests unfinished, or a step whose tokens the scheduler has not received."""
        return self.scheduler.has_unfinished_requests() or self.in_flight is not None

    def step(self) -> Tuple[SchedulerOutput, List[Request]]:
        if not self.overlap:
            return step(self.scheduler, self.runner)
        scheduler, runner = self.scheduler, self.runner
        out = scheduler.schedule()
        _check_schedule(scheduler, out, allow_empty=self.in_flight is not None)
        scheduler.check_invariants()
        runner_output = runner.execute(out)
        received = self.drain()
        self.in_flight = None if out.is_empty else (out, runner_output)
        return out, received

    def drain(self) -> List[Request]:
        """Apply the step in flight, if any; the requests that received a token."""
        if self.in_flight is None:
            return []
        (out, runner_output), self.in_flight = self.in_flight, None
        return _apply(self.scheduler, self.runner, out, runner_output)


def _check_schedule(scheduler: Scheduler, out: SchedulerOutput, allow_empty: bool = False) -> None:
    assert len(out.num_scheduled_tokens) <= scheduler.max_batch_size
    assert out.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert all(n >= 1 for n in out.num_scheduled_tokens.values())
    assert allow_empty or not out.is_empty or not scheduler.has_unfinished_requests(), "an empty step: livelock"


def _apply(scheduler: Scheduler, runner: FakeRunner, out: SchedulerOutput,
           runner_output: RunnerOutput) -> List[Request]:
    received = scheduler.update(out, runner_output)
    scheduler.check_invariants()
    for rid in out.num_scheduled_tokens:  # the runner's copy of every running request holds the scheduler's tokens
        request = scheduler.get_request(rid)
        if request is not None and request.status is RequestStatus.RUNNING:
            assert runner.held[rid].tokens[:request.num_tokens] == request.all_token_ids, f"request {rid}"
    for request in received:
        if request.is_finished:
            assert request.finish_reason in ("stop", "length") and not request.block_ids
    return received


def run_all(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000,
            between_steps: Optional[Callable[[int], None]] = None, overlap: bool = False) -> Dict[int, Request]:
    """Step until no request is left; returns the finished requests by id. Checks that every
    request leaves once per time it ran, and that the cache ends empty."""
    finished: Dict[int, Request] = {}
    stepper = Stepper(scheduler, runner, overlap)
    for n in range(max_steps):
        if between_steps is not None:
            between_steps(n)
        if not stepper.busy:
            break
        _, received = stepper.step()
        for request in received:
            if request.is_finished:
                assert request.request_id not in finished, f"{request!r} finished twice"
                finished[request.request_id] = request
    else:
        raise AssertionError(f"requests still unfinished after {max_steps} steps")
    flush(scheduler, runner)
    return finished


def flush(scheduler: Scheduler, runner: FakeRunner) -> None:
    """After the last request ended: the next schedule() is empty and reports the last departures,
    after which the runner must hold nothing and every block must be free."""
    out = scheduler.schedule()
    assert out.is_empty
    runner.drop(out.finished_request_ids)
    assert not runner.live, f"departures never reported: {sorted(runner.live)}"
    assert_all_blocks_free(scheduler)


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks, f"{bm.num_free_blocks}/{bm.num_total_blocks} free"
    assert bm.usage == 0.0
    bm.check_invariants([])
    scheduler.check_invariants()
    swap = scheduler.swap
    assert swap is None or swap.num_free_blocks == swap.num_total_blocks, \
        f"{swap.num_free_blocks}/{swap.num_total_blocks} host blocks free"


def all_blocks_free_soon(block_manager, timeout: float = 5.0) -> bool:
    """Whether every KV block of a running engine is free within timeout seconds (the engine's
    thread frees a finished request's blocks after its last output was delivered)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if block_manager.num_free_blocks == block_manager.num_total_blocks:
            return True
        time.sleep(0.02)
    return False


def run_alone(request: Request, block_size: int = 4) -> Tuple[List[int], str]:
    """Output and finish reason of a copy of ``request`` served on its own with a roomy cache and
    budget: no chunking, no preemption."""
    alone = Request(request.request_id, request.prompt_token_ids, request.gen_config, request.seed,
                    request.eos_token_ids, request.max_total_tokens)
    num_blocks = -(-alone.max_kv_tokens // block_size) + 1
    scheduler, runner = make_scheduler(num_blocks, block_size, max_batch_size=1,
                                       max_num_batched_tokens=alone.max_total_tokens)
    scheduler.add_request(alone)
    done = run_all(scheduler, runner)
    assert runner.steps[0] == [(alone.request_id, 0, alone.num_prompt_tokens, True)], "not one prefill"
    return done[alone.request_id].output_token_ids, done[alone.request_id].finish_reason
