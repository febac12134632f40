"""A model runner stand-in for scheduler tests (no torch) and the helpers that drive it.

FakeRunner keeps a simulated paged KV cache: one token id per (block, slot). Each step it writes
the scheduled tokens through the block table, and for every sequence that samples it reads the
whole sequence back through the block table and checks it against the request's true tokens, so a
wrong block table, a block shared by two live requests or a chunk at the wrong position fails the
test. The "sampled" token is a hash of that sequence and the request's seed: deterministic, and
independent of batching, chunking and preemption, exactly like greedy decoding of a real model.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from tidemind.config import GenerationConfig
from tidemind.core.block_manager import BlockManager
from tidemind.core.outputs import RunnerOutput, SchedulerOutput
from tidemind.core.request import Request
from tidemind.core.scheduler import Scheduler

VOCAB_SIZE = 50
EOS = 7

StepRecord = List[Tuple[int, int, int, bool]]  # (request_id, start_pos, num_tokens, sample) per sequence


def reference_token(seed: int, tokens: Sequence[int], vocab_size: int = VOCAB_SIZE) -> int:
    h = (seed * 1_000_003 + 12_345) % (2**61 - 1)
    for t in tokens:
        h = (h * 31 + t + 1) % (2**61 - 1)
    return h % vocab_size


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = VOCAB_SIZE,
                 script: Optional[Dict[int, List[int]]] = None):
        """``script``: request_id -> the tokens to return for it, by output index, bypassing the
        hash and the min_new_tokens masking (to feed the scheduler tokens a sampler would not)."""
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: List[List[Optional[int]]] = [[None] * block_size for _ in range(num_blocks)]
        self.script = dict(script or {})
        self.steps: List[StepRecord] = []
        self.left_ids: List[List[int]] = []  # SchedulerOutput.finished_request_ids, per step
        # Ids the runner has seen scheduled and not yet been told have left: each departure must be
        # reported exactly once, and only for a request the runner knows.
        self.live: set = set()

    def drop(self, left_ids: List[int]) -> None:
        for rid in left_ids:
            assert rid in self.live, f"request {rid} reported as left, but the runner holds nothing for it"
            self.live.remove(rid)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.drop(out.finished_request_ids)
        scheduled = {seq.request_id for seq in out.sequences}
        assert not scheduled & set(out.finished_request_ids), "a request leaves and runs in one step"
        bs = self.block_size
        record: StepRecord = []
        sampled: Dict[int, int] = {}
        for seq in out.sequences:
            end = seq.start_pos + seq.num_tokens
            table = seq.block_table
            assert len(table) * bs >= end, f"block table of {seq.request_id} too short for {end} tokens"
            for pos, token in enumerate(seq.token_ids, start=seq.start_pos):
                self.kv[table[pos // bs]][pos % bs] = token
            record.append((seq.request_id, seq.start_pos, seq.num_tokens, seq.sample))
            self.live.add(seq.request_id)
            if seq.sample:
                seen = [self.kv[table[p // bs]][p % bs] for p in range(end)]
                truth = list(seq.sampling.prompt_token_ids) + list(seq.sampling.output_token_ids)
                assert seen == truth, f"request {seq.request_id}: KV cache holds {seen}, expected {truth}"
                sampled[seq.request_id] = self._sample(seq.request_id, seq.sampling, seen)
        self.steps.append(record)
        self.left_ids.append(list(out.finished_request_ids))
        return RunnerOutput(sampled_token_ids=sampled)

    def _sample(self, request_id: int, sampling, tokens: List[int]) -> int:
        index = len(sampling.output_token_ids)
        script = self.script.get(request_id)
        if script is not None:
            return script[index]
        token = reference_token(sampling.seed, tokens, self.vocab_size)
        min_new = sampling.gen_config.min_new_tokens or 0
        # What the real sampler does: stop ids are masked while fewer than min_new_tokens exist.
        if index < min_new and token in sampling.stop_token_ids:
            allowed = [t for t in range(self.vocab_size) if t not in sampling.stop_token_ids]
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
                   script: Optional[Dict[int, List[int]]] = None) -> Tuple[Scheduler, FakeRunner]:
    bm = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(bm, max_batch_size, max_num_batched_tokens, watermark_blocks=watermark_blocks)
    return scheduler, FakeRunner(num_blocks, block_size, script=script)


def step(scheduler: Scheduler, runner: FakeRunner) -> Tuple[SchedulerOutput, List[Request]]:
    """One engine step, with the per-step contract checked before and after."""
    out = scheduler.schedule()
    ids = [s.request_id for s in out.sequences]
    assert len(ids) == len(set(ids)), f"a request scheduled twice in one step: {ids}"
    assert len(ids) <= scheduler.max_batch_size
    assert out.num_tokens <= scheduler.max_num_batched_tokens
    assert all(s.num_tokens >= 1 for s in out.sequences)
    assert out.sequences or not scheduler.has_unfinished_requests(), "an empty step: livelock"
    scheduler.check_invariants()
    received = scheduler.update(out, runner.execute(out))
    scheduler.check_invariants()
    for request in received:
        if request.is_finished:
            assert request.finish_reason in ("stop", "length") and not request.block_ids
    return out, received


def run_all(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000,
            between_steps: Optional[Callable[[int], None]] = None) -> Dict[int, Request]:
    """Step until no request is left; returns the finished requests by id. Checks that every
    request leaves once per time it ran, and that the cache ends empty."""
    finished: Dict[int, Request] = {}
    for n in range(max_steps):
        if between_steps is not None:
            between_steps(n)
        if not scheduler.has_unfinished_requests():
            break
        _, received = step(scheduler, runner)
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
