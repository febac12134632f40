"""KV swap to host memory in the scheduler (no torch): a preempted request's KV goes to the host
pool and comes back when it is admitted again; idle sessions' pins go there before they would be
dropped; the step order of the copies; a failed step's copies are not trusted."""
import pytest

from tidemind.core.request import RequestStatus
from tidemind.core.swap import SwapSpace

try:
    from fake_runner import flush, make_request, make_scheduler, run_all, run_alone, step
except ImportError:
    from tests.fake_runner import flush, make_request, make_scheduler, run_all, run_alone, step


def test_swap_space_hands_out_blocks_and_frees_read_ones_only_at_the_next_step():
    swap = SwapSpace(4)
    host = swap.swap_out([10, 11, 12])
    assert host == [0, 1, 2] and swap.num_free_blocks == 1
    assert swap.swap_out([13, 14]) is None and swap.num_free_blocks == 1  # all or nothing
    swap.swap_in(host[:2], [20, 21])
    swap.release(host[:2], read_this_step=True)
    assert swap.num_free_blocks == 1  # read by this step's swap-ins: not yet free
    swap.release(host[2:], read_this_step=False)
    assert swap.num_free_blocks == 2
    assert swap.take_copies() == ([(10, 0), (11, 1), (12, 2)], [(0, 20), (1, 21)])
    swap.check_invariants([])
    swap.begin_step()
    assert swap.num_free_blocks == 4 and swap.take_copies() == ([], [])
    assert swap.num_blocks_swapped_out == 3 and swap.num_blocks_swapped_in == 2
    held = swap.swap_out([1])
    with pytest.raises(AssertionError, match="out of place"):
        swap.check_invariants([held, held])
    with pytest.raises(AssertionError, match="unaccounted"):
        swap.check_invariants([])


def _two_growing_requests(num_host_blocks, prefix_caching=False):
    """6 blocks of 4: A and B (8-token prompts, 12 new tokens) both fit for 5 steps, then A's growth
    preempts B, which has 12 tokens of KV in 3 blocks."""
    sched, runner = make_scheduler(num_blocks=6, block_size=4, num_host_blocks=num_host_blocks,
                                   prefix_caching=prefix_caching)
    a, b = make_request(0, 8, max_new_tokens=12, eos=()), make_request(1, 8, max_new_tokens=12, eos=())
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):
        step(sched, runner)
    return sched, runner, a, b


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_request_is_swapped_out_and_back_in(prefix_caching):
    sched, runner, a, b = _two_growing_requests(num_host_blocks=8, prefix_caching=prefix_caching)
    b_blocks = list(b.block_ids)
    hits_before = sched.num_hit_tokens
    out, _ = step(sched, runner)
    assert out.finished_request_ids == [1] and b.status is RequestStatus.WAITING
    assert [device for device, _ in out.swap_out] == b_blocks and out.swap_in == []
    assert b.host_block_ids == [host for _, host in out.swap_out] and b.num_swapped_tokens == 12
    swap_in_steps = []
    while sched.has_unfinished_requests():
        out, _ = step(sched, runner)
        if out.swap_in:
            swap_in_steps.append((out.swap_in, runner.steps[-1]))
    flush(sched, runner)
    [(pairs, records)] = swap_in_steps  # B came back once, after A finished (A frees its blocks)
    # With prefix caching B's first block was still cached (A's growth evicted the tail of B's
    # freed blocks first): only the two blocks after it are copied back.
    assert [host for host, _ in pairs] == ([1, 2] if prefix_caching else [0, 1, 2])
    assert records == [(1, 12, 1, True)]  # its 12 tokens of KV were copied back, not recomputed
    assert sched.num_hit_tokens - hits_before == (4 if prefix_caching else 0)  # swapped-in KV is no hit
    assert runner.num_swapped_out == 3 and runner.num_swapped_in == len(pairs)
    for r in (a, b):
        assert (r.output_token_ids, r.finish_reason) == run_alone(r)


def test_preemption_recomputes_when_the_host_pool_is_too_small():
    sched, runner, a, b = _two_growing_requests(num_host_blocks=2)
    out, _ = step(sched, runner)
    assert out.finished_request_ids == [1] and out.swap_out == [] and b.host_block_ids == []
    run_all(sched, runner)
    resumed = [rec for records in runner.steps[6:] for rec in records if rec[0] == 1]
    assert resumed[0] == (1, 0, 13, True)  # recomputed as before: prompt + its 5 outputs
    for r in (a, b):
        assert (r.output_token_ids, r.finish_reason) == run_alone(r)


def test_idle_session_pin_goes_to_the_host_under_pressure_and_comes_back():
    sched, runner = make_scheduler(num_blocks=4, block_size=4, num_host_blocks=4)
    sched.add_request(_turn(0, 1, [], [1, 2, 3, 4, 5, 6], max_new_tokens=3))
    run_all_turns(sched, runner)
    pinned = list(sched.sessions.get(1).block_ids)
    assert len(pinned) == 2  # 8 of its 9 tokens
    other = make_request(5, 13, max_new_tokens=2, eos=())  # needs all 4 blocks
    sched.add_request(other)
    out, _ = step(sched, runner)
    # The pin's blocks are copied out before this step's forward pass writes other's KV into them.
    assert [device for device, _ in out.swap_out] == pinned and set(pinned) <= set(other.block_ids)
    session = sched.sessions.get(1)
    assert session.block_ids == [] and len(session.host_block_ids) == 2 and session.num_cached == 8
    host = list(session.host_block_ids)
    run_all_turns(sched, runner)
    history = sched.sessions.history(1)
    second = _turn(1, 1, history, [9], max_new_tokens=3)
    sched.add_request(second)
    out, _ = step(sched, runner)
    assert [h for h, _ in out.swap_in] == host and [d for _, d in out.swap_in] == second.block_ids[:2]
    assert runner.steps[-1] == [(1, 8, 2, True)] and second.num_cached_tokens == 8  # the history came back
    run_all_turns(sched, runner)
    assert (second.output_token_ids, second.finish_reason) == run_alone(
        make_request(1, history + [9], eos=(), seed=99, max_new_tokens=3))
    sched.end_session(1)
    flush(sched, runner)


def _sessions_trading_places(sched, runner):
    """Session 2's second turn is admitted in the step that swaps session 1's pin out, into blocks
    that pin releases; session 1's third turn then reads its copy back. Returns (that step's
    SchedulerOutput, session 1's third turn)."""
    for rid, sid in ((0, 1), (1, 2)):  # each pins 2 blocks: the cache is full
        sched.add_request(_turn(rid, sid, [], [sid] * 6, max_new_tokens=3))
        run_all_turns(sched, runner)
    sched.add_request(make_request(5, 13, max_new_tokens=2, eos=()))  # both pins go to the host
    run_all_turns(sched, runner)
    sched.add_request(_turn(2, 1, sched.sessions.history(1), [9], max_new_tokens=3))
    run_all_turns(sched, runner)  # session 1 back on the device, 3 blocks pinned
    sched.add_request(_turn(3, 2, sched.sessions.history(2), [9], max_new_tokens=3))
    trading, _ = step(sched, runner)
    run_all_turns(sched, runner)
    third = _turn(4, 1, sched.sessions.history(1), [5], max_new_tokens=3)
    sched.add_request(third)
    run_all_turns(sched, runner)
    return trading, third


def test_a_step_copies_swap_outs_before_swap_ins_that_reuse_their_blocks():
    sched, runner = make_scheduler(num_blocks=4, block_size=4, num_host_blocks=5)
    trading, third = _sessions_trading_places(sched, runner)
    out_sources = {device for device, _ in trading.swap_out}
    assert len(trading.swap_out) == 3 and {device for _, device in trading.swap_in} & out_sources
    assert third.num_cached_tokens == 12  # read back from the host: the fake runner checked its KV
    assert (third.output_token_ids, third.finish_reason) == run_alone(
        make_request(4, third.prompt_token_ids, eos=(), seed=99, max_new_tokens=3))
    for sid in (1, 2):
        sched.end_session(sid)
    flush(sched, runner)


def test_the_fake_runner_catches_swap_ins_copied_before_swap_outs(monkeypatch):
    from fake_runner import FakeRunner

    def ins_first(self, out):
        for host, device in out.swap_in:
            self.kv[device], self.host_kv[host] = self.host_kv[host], None
        for device, host in out.swap_out:
            self.host_kv[host] = list(self.kv[device])

    monkeypatch.setattr(FakeRunner, "_swap", ins_first)
    sched, runner = make_scheduler(num_blocks=4, block_size=4, num_host_blocks=5)
    with pytest.raises(AssertionError, match="is not that of its tokens"):
        _sessions_trading_places(sched, runner)


def _turn(request_id, session_id, history, new_tokens, **gen):
    gen.setdefault("max_new_tokens", 6)
    r = make_request(request_id, list(history) + list(new_tokens), eos=(), seed=99, **gen)
    r.session_id = session_id
    return r


def run_all_turns(sched, runner):
    while sched.has_unfinished_requests():
        step(sched, runner)


def _host_block_read_and_wanted_in_one_step(sched, runner):
    """Sessions 1 and 2 wait on the host (1 block each, the whole pool); session 3 is pinned. Turns
    of 1 and 2 are admitted in one step: 1's swap-in releases its host block, then 2's admission
    evicts 3's pin, whose swap-out would like a host block. Returns session 1's second turn."""
    for rid, sid in ((0, 1), (1, 2)):
        sched.add_request(_turn(rid, sid, [], [sid, sid], max_new_tokens=2))  # 3 tokens of KV: 1 block
        run_all_turns(sched, runner)
    sched.add_request(make_request(5, 30, max_new_tokens=2, eos=()))  # all 8 blocks: both to the host
    run_all_turns(sched, runner)
    sched.add_request(_turn(2, 3, [], [3, 3], max_new_tokens=2))
    run_all_turns(sched, runner)
    second = _turn(3, 1, sched.sessions.history(1), [9])  # 5 tokens: 2 blocks
    sched.add_request(second)
    sched.add_request(_turn(4, 2, sched.sessions.history(2), [9] * 20))  # 24 tokens: 6 blocks, 5 free
    run_all_turns(sched, runner)
    return second


def test_a_host_block_read_by_a_swap_in_is_not_reused_in_the_same_step():
    sched, runner = make_scheduler(num_blocks=8, block_size=4, num_host_blocks=2)
    second = _host_block_read_and_wanted_in_one_step(sched, runner)
    assert second.num_cached_tokens == 3 and sched.sessions.get(3).num_cached == 0  # 3's pin was dropped
    assert (second.output_token_ids, second.finish_reason) == run_alone(
        make_request(3, second.prompt_token_ids, eos=(), seed=99, max_new_tokens=6))
    for sid in (1, 2, 3):
        sched.end_session(sid)
    flush(sched, runner)


def test_the_fake_runner_catches_a_host_block_reused_in_the_step_that_reads_it(monkeypatch):
    monkeypatch.setattr(SwapSpace, "release", lambda self, blocks, read_this_step: self._free.extend(blocks))
    sched, runner = make_scheduler(num_blocks=8, block_size=4, num_host_blocks=2)
    with pytest.raises(AssertionError, match="is not that of its tokens"):
        _host_block_read_and_wanted_in_one_step(sched, runner)


def test_session_host_copies_make_room_for_a_preempted_request():
    # A session swapped to the host fills the pool; then a preemption needs the pool: the
    # session's copy is dropped (its next turn recomputes) and the running request is swapped.
    sched, runner = make_scheduler(num_blocks=6, block_size=4, num_host_blocks=3)
    sched.add_request(_turn(0, 1, [], list(range(10)), max_new_tokens=3))  # 12 tokens of KV: 3 blocks
    run_all_turns(sched, runner)
    big = make_request(5, 21, max_new_tokens=2, eos=())  # needs 6 blocks: the pin goes to the host
    sched.add_request(big)
    step(sched, runner)
    assert len(sched.sessions.get(1).host_block_ids) == 3
    run_all_turns(sched, runner)
    a, b = make_request(10, 8, max_new_tokens=12, eos=()), make_request(11, 8, max_new_tokens=12, eos=())
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(6):  # the 6th step preempts B (12 tokens of KV in 3 blocks)
        out, _ = step(sched, runner)
    assert out.finished_request_ids == [11] and len(b.host_block_ids) == 3
    assert sched.sessions.get(1).host_block_ids == [] and sched.sessions.get(1).num_cached == 0
    run_all_turns(sched, runner)
    for r in (a, b):
        assert (r.output_token_ids, r.finish_reason) == run_alone(r)
    sched.end_session(1)
    flush(sched, runner)


def test_a_failed_step_drops_the_host_copies_it_was_to_make():
    sched, runner, a, b = _two_growing_requests(num_host_blocks=8)
    out = sched.schedule()  # preempts B and asks for its KV to be copied out; the runner fails
    assert out.swap_out and b.host_block_ids
    sched.step_failed(out)
    assert b.host_block_ids == [] and b.num_swapped_tokens == 0
    sched.finish_request(0, "error")  # what the engine does to the failed step's requests
    runner.drop(out.finished_request_ids)
    run_all(sched, runner)  # B recomputes from scratch: nothing reads the copy that was never made
    assert (b.output_token_ids, b.finish_reason) == run_alone(b)


def test_a_failed_step_does_not_give_a_session_kv_it_never_copied_back():
    sched, runner = make_scheduler(num_blocks=4, block_size=4, num_host_blocks=4)
    sched.add_request(_turn(0, 1, [], [1, 2, 3, 4, 5, 6], max_new_tokens=3))
    run_all_turns(sched, runner)
    sched.add_request(make_request(5, 13, max_new_tokens=2, eos=()))  # the pin goes to the host
    run_all_turns(sched, runner)
    history = sched.sessions.history(1)
    second = _turn(1, 1, history, [9], max_new_tokens=3)
    sched.add_request(second)
    out = sched.schedule()
    assert out.swap_in and out.new_requests[0].num_computed_tokens == 8  # the KV it starts with
    runner.drop(out.finished_request_ids)  # the runner read the step, then failed before its copies
    runner._apply_deltas(out)
    sched.step_failed(out)
    assert second.num_computed_tokens == 0
    sched.finish_request(1, "error")  # what the engine does next: the turn is forgotten
    assert sched.sessions.get(1).num_cached == 0  # nothing valid to give back
    third = _turn(2, 1, history, [9], max_new_tokens=3)
    sched.add_request(third)
    run_all_turns(sched, runner)
    assert (third.output_token_ids, third.finish_reason) == run_alone(
        make_request(2, history + [9], eos=(), seed=99, max_new_tokens=3))
    sched.end_session(1)
    flush(sched, runner)
