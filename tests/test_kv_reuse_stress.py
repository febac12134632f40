"""Randomized: prefix sharing, sessions, preemption, swap to host and aborts together, every step
checked (fake_runner.step: invariants, block tables, the KV read back through them), every answer
compared with the same request run alone. Then the same scenarios with one bookkeeping rule broken
and the invariant checks switched off: the fake runner and the comparison alone must catch each."""
import random

import pytest

from tidemind.core import block_manager as block_manager_module
from tidemind.core.block_manager import BlockManager
from tidemind.core.scheduler import Scheduler
from tidemind.core.swap import SwapSpace

try:
    from fake_runner import VOCAB_SIZE, flush, make_request, make_scheduler, run_alone, Stepper
except ImportError:
    from tests.fake_runner import VOCAB_SIZE, flush, make_request, make_scheduler, run_alone, Stepper

MAX_NEW = 8
NEW_TURN_TOKENS = 6
TURNS = 4


def _prefixes(rng):
    """Shared prefixes; the first two end with the same 8 tokens after different 8-token heads, so
    blocks with equal tokens follow different prefixes (a key without its parent would mix them)."""
    tail = [rng.randrange(VOCAB_SIZE) for _ in range(8)]
    heads = [[rng.randrange(VOCAB_SIZE) for _ in range(8)] for _ in range(2)]
    other = [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(0, 20))]
    return [heads[0] + tail, heads[1] + tail, other, []]


class _Scenario:
    def __init__(self, seed, prefix_caching, host_blocks, overlap=False):
        rng = self.rng = random.Random(seed)
        self.prefixes = _prefixes(rng)
        block_size = rng.choice([1, 2, 4, 8])
        self.one_offs = []
        for rid in range(40):
            prompt = rng.choice(self.prefixes) + [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 12))]
            self.one_offs.append((rng.randrange(30), make_request(
                rid, prompt, max_new_tokens=rng.randint(1, MAX_NEW), seed=rng.randrange(1000),
                eos=(rng.randrange(VOCAB_SIZE),))))
        self.one_offs.sort(key=lambda pair: pair[0])
        num_blocks = -(-max(r.max_kv_tokens for _, r in self.one_offs) // block_size) + rng.randint(0, 2)
        # As in the engine, no sequence outgrows the cache: a conversation that would ends.
        self.max_total_tokens = num_blocks * block_size
        self.sched, self.runner = make_scheduler(
            num_blocks=num_blocks, block_size=block_size, max_batch_size=rng.randint(2, 6),
            max_num_batched_tokens=rng.choice([3, 8, 16, 64]), watermark_blocks=rng.randint(0, 1),
            prefix_caching=prefix_caching, num_host_blocks=host_blocks(num_blocks))
        self.stepper = Stepper(self.sched, self.runner, overlap)
        self.sessions = {sid: {"turns": 0, "request": None, "ended": False} for sid in (101, 102, 103)}
        self.finished, self.aborted = [], []
        self.next_id = 1000

    def _add_turn(self, sid, state):
        history = self.sched.sessions.history(sid)
        if not history:  # a first turn starts with one of the shared prefixes
            history = self.rng.choice(self.prefixes)
        new = [self.rng.randrange(VOCAB_SIZE) for _ in range(self.rng.randint(1, NEW_TURN_TOKENS))]
        if len(history) + len(new) >= self.max_total_tokens:
            self.sched.end_session(sid)
            state["ended"] = True
            return
        request = make_request(self.next_id, list(history) + new, max_new_tokens=self.rng.randint(1, MAX_NEW),
                               seed=sid, eos=(self.rng.randrange(VOCAB_SIZE),), max_total_tokens=self.max_total_tokens)
        request.session_id = sid
        self.next_id += 1
        self.sched.add_request(request)
        state["request"], state["turns"] = request, state["turns"] + 1

    def _between_steps(self, n):
        rng, sched = self.rng, self.sched
        while self.one_offs and self.one_offs[0][0] <= n:
            sched.add_request(self.one_offs.pop(0)[1])
        for sid, state in self.sessions.items():
            request = state["request"]
            if request is not None and request.is_finished:
                (self.finished if request.finish_reason in ("stop", "length") else self.aborted).append(request)
                state["request"] = None
            if state["request"] is None and not state["ended"] and state["turns"] < TURNS and rng.random() < 0.3:
                self._add_turn(sid, state)
            elif state["request"] is None and state["turns"] and not state["ended"] and rng.random() < 0.01:
                sched.end_session(sid)
                state["ended"] = True
        live = [rid for rid in range(self.next_id) if sched.get_request(rid) is not None]
        if live and rng.random() < 0.03:
            sched.abort_request(rng.choice(live))

    def run(self):
        sched, runner = self.sched, self.runner
        for n in range(20_000):
            self._between_steps(n)
            busy = any(s["request"] is not None or (s["turns"] < TURNS and not s["ended"])
                       for s in self.sessions.values())
            if not self.one_offs and not busy and not self.stepper.busy:
                break
            _, received = self.stepper.step()
            self.finished += [r for r in received if r.is_finished and r.session_id is None]
        else:
            raise AssertionError("scenario did not finish")
        for sid in self.sessions:
            sched.end_session(sid)
        flush(sched, runner)
        for r in self.finished:
            assert (r.output_token_ids, r.finish_reason) == run_alone(r), r
        for r in self.aborted:
            assert r.output_token_ids == run_alone(r)[0][:r.num_output_tokens], r
        swap = sched.swap
        return dict(hits=sched.num_hit_tokens, preemptions=sched.num_preemptions,
                    turns=sum(r.session_id is not None for r in self.finished),
                    swapped_in=swap.num_blocks_swapped_in if swap else 0,
                    swapped_out=swap.num_blocks_swapped_out if swap else 0)


def _run(seeds, prefix_caching=True, host_blocks=lambda n: n // 2, overlap=False):
    totals = {}
    for seed in seeds:  # a failure's traceback names its seed
        for key, value in _Scenario(seed, prefix_caching, host_blocks, overlap).run().items():
            totals[key] = totals.get(key, 0) + value
    return totals


@pytest.mark.parametrize("prefix_caching, host_blocks", [
    (True, lambda n: n // 2), (True, lambda n: 0), (False, lambda n: n // 2), (True, lambda n: 3)],
    ids=["cache+swap", "cache", "swap", "cache+tiny-swap"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_randomized_reuse_matches_running_alone(prefix_caching, host_blocks, overlap):
    totals = _run(range(10), prefix_caching, host_blocks, overlap)
    assert totals["preemptions"] > 30 and totals["turns"] > 40, f"scenarios too tame: {totals}"
    if prefix_caching:
        assert totals["hits"] > 500, f"too few prefix-cache hits: {totals}"
    if host_blocks(100):
        assert totals["swapped_in"] > 30, f"too little swapping: {totals}"


# ------------------------------------------------------------------ the tests catch broken rules

def _unparented_key(parent, tokens):
    return None, tuple(tokens)


def _take_cached_without_counting(self, holder, block_ids, key_ids):
    for block_id in block_ids:
        if self._ref_counts[block_id] == 0:  # only blocks nobody holds are counted: sharing is lost
            del self._evictable[block_id]
            self._ref_counts[block_id] = 1
    holder.block_ids, holder.key_ids = list(block_ids), list(key_ids)


BROKEN = {
    "hash chain without the parent": (block_manager_module, "block_key", _unparented_key),
    "shared blocks not counted": (BlockManager, "take_cached", _take_cached_without_counting),
    "swap-in copies never made": (SwapSpace, "swap_in", lambda self, host, device: None),
}  # host blocks reused in the step that reads them: too rare here, see test_swap.py


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_rule_is_caught_without_the_invariant_checks(broken, monkeypatch):
    owner, name, replacement = BROKEN[broken]
    monkeypatch.setattr(owner, name, replacement)
    monkeypatch.setattr(Scheduler, "check_invariants", lambda self: None)
    monkeypatch.setattr(BlockManager, "check_invariants", lambda self, owners: None)
    with pytest.raises((AssertionError, RuntimeError)):
        _run(range(10))
