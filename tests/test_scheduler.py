import random
import subprocess
import sys
from pathlib import Path

import pytest

from tidemind.core.request import RequestStatus

try:  # tests/ is on sys.path (rootdir-less layout) or is a package (tests/__init__.py added later)
    from fake_runner import EOS, flush, make_request, make_scheduler, run_all, run_alone, step, Stepper
except ImportError:
    from tests.fake_runner import EOS, flush, make_request, make_scheduler, run_all, run_alone, step, Stepper


def _records(runner):
    """What the last step computed: [(request_id, start_pos, num_tokens, sampled)]."""
    return runner.steps[-1]


def _assert_same_as_alone(requests):
    for r in requests:
        assert (r.output_token_ids, r.finish_reason) == run_alone(r), f"{r!r} differs from running alone"


# ------------------------------------------------------------------ chunking and mixed batches

def test_long_prompt_is_prefilled_in_chunks_of_the_budget():
    sched, runner = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    r = make_request(0, 20, max_new_tokens=3, eos=())
    sched.add_request(r)
    expected = [  # (start_pos, num_tokens, sample), blocks held after the step
        ((0, 8, False), 2), ((8, 8, False), 4), ((16, 4, True), 5), ((20, 1, True), 6), ((21, 1, True), 6)]
    for (start, n, sample), blocks in expected:
        out, received = step(sched, runner)
        assert _records(runner) == [(0, start, n, sample)]
        assert received == ([r] if sample else [])
        assert len(r.block_ids) == (blocks if not r.is_finished else 0)
    assert r.is_finished and r.finish_reason == "length" and r.num_output_tokens == 3
    flush(sched, runner)
    _assert_same_as_alone([r])


def test_mixed_step_serves_decodes_first_then_a_prefill_chunk():
    sched, runner = make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=10)
    a, b = make_request(0, 3, max_new_tokens=10, eos=()), make_request(1, 3, max_new_tokens=10, eos=())
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, runner)
    assert _records(runner) == [(0, 0, 3, True), (1, 0, 3, True)]
    c = make_request(2, 30, max_new_tokens=2, eos=())
    sched.add_request(c)
    chunks = [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True), (30, 1, True)]
    for i, chunk in enumerate(chunks):
        out, _ = step(sched, runner)
        assert _records(runner) == [(0, 3 + i, 1, True), (1, 3 + i, 1, True), (2, *chunk)]
    done = run_all(sched, runner)
    assert c.is_finished and set(done) >= {0, 1}
    _assert_same_as_alone([a, b, c])


def test_budget_smaller_than_batch_serves_oldest_first():
    sched, runner = make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=2)
    reqs = [make_request(i, 1, max_new_tokens=4, eos=()) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched, runner)
    assert _records(runner) == [(0, 0, 1, True), (1, 0, 1, True)]
    assert sched.num_running == 2 and sched.num_waiting == 1  # no budget left to admit the third
    run_all(sched, runner)
    _assert_same_as_alone(reqs)


# ------------------------------------------------------------------ preemption

def test_preempts_newest_and_resumes_by_recompute():
    # 6 blocks of 4: both fit at first, then A's growth pushes B out until A is done.
    sched, runner = make_scheduler(num_blocks=6, block_size=4)
    a, b = make_request(0, 8, max_new_tokens=12, eos=()), make_request(1, 8, max_new_tokens=12, eos=())
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):
        out, _ = step(sched, runner)
        assert list(out.num_scheduled_tokens) == [0, 1]
    assert sched.block_manager.num_free_blocks == 0
    out, _ = step(sched, runner)  # A needs its 4th block for 13 tokens: B (newest) is preempted
    assert _records(runner) == [(0, 12, 1, True)] and out.finished_request_ids == [1]
    assert b.status is RequestStatus.WAITING and b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_output_tokens == 5
    run_all(sched, runner)
    resumed = [rec for records in runner.steps[6:] for rec in records if rec[0] == 1]
    assert resumed[0] == (1, 0, 13, True)  # prompt + its 5 outputs recomputed as one prefill
    assert a.num_output_tokens == b.num_output_tokens == 12
    _assert_same_as_alone([a, b])


def test_newest_request_that_needs_a_block_preempts_itself():
    sched, runner = make_scheduler(num_blocks=5, block_size=4)
    a, b = make_request(0, 8, max_new_tokens=6, eos=()), make_request(1, 6, max_new_tokens=6, eos=())
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)  # A: 2 blocks, B: 2 blocks
    step(sched, runner)  # A grows to 9 tokens: the last block
    step(sched, runner)
    out, _ = step(sched, runner)  # B needs a 3rd block, none free, B is the newest: it yields
    assert _records(runner) == [(0, 10, 1, True)] and out.finished_request_ids == [1]
    assert b.status is RequestStatus.WAITING and b.num_output_tokens == 3 and a.num_preemptions == 0
    run_all(sched, runner)
    _assert_same_as_alone([a, b])


def test_no_admission_in_a_step_that_preempted():
    sched, runner = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    a, b = make_request(0, 8, max_new_tokens=12, eos=()), make_request(1, 8, max_new_tokens=12, eos=())
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):
        step(sched, runner)
    sched.add_request(make_request(2, 1, max_new_tokens=1, eos=()))  # would fit in 1 block
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == [0] and sched.num_waiting == 2
    assert [r.request_id for r in sched._waiting] == [1, 2]  # the preempted one first
    run_all(sched, runner)


# ------------------------------------------------------------------ fairness and limits

def test_long_head_of_queue_is_not_starved_by_short_requests():
    sched, runner = make_scheduler(num_blocks=12, block_size=4)
    r0 = make_request(0, 30, max_new_tokens=4, eos=())  # 8 blocks, grows to 9
    long = make_request(1, 20, max_new_tokens=2, eos=())  # needs 5 blocks at once
    shorts = [make_request(i, 2, max_new_tokens=2, eos=()) for i in (2, 3, 4)]  # 1 block each
    for r in (r0, long, *shorts):
        sched.add_request(r)
    for _ in range(4):  # 4 free blocks while R0 runs: the shorts would fit, but may not skip
        out, _ = step(sched, runner)
        assert list(out.num_scheduled_tokens) == [0]
    assert r0.is_finished
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == [1, 2, 3, 4]
    run_all(sched, runner)
    _assert_same_as_alone([r0, long, *shorts])


def test_max_batch_size_bounds_running_requests():
    sched, runner = make_scheduler(num_blocks=64, block_size=4, max_batch_size=3)
    reqs = [make_request(i, 3, max_new_tokens=2 + i % 3, eos=()) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == [0, 1, 2]
    assert sched.num_running == 3 and sched.num_waiting == 7
    first_seen = {0: -1, 1: -1, 2: -1}
    for n in range(100):
        if not sched.has_unfinished_requests():
            break
        out, _ = step(sched, runner)  # step() checks len(sequences) <= max_batch_size
        assert sched.num_running <= 3
        for rid in out.num_scheduled_tokens:
            first_seen.setdefault(rid, n)
    assert sorted(first_seen, key=first_seen.get) == list(range(10))  # admitted in arrival order
    flush(sched, runner)


def test_watermark_holds_back_admission_only_while_others_run():
    sched, runner = make_scheduler(num_blocks=4, block_size=4, watermark_blocks=1)
    a = make_request(0, 16, max_new_tokens=1, eos=())  # exactly the whole cache
    sched.add_request(a)
    out, _ = step(sched, runner)  # nothing runs: the watermark does not apply
    assert _records(runner) == [(0, 0, 16, True)] and a.is_finished
    b, c = make_request(1, 8, max_new_tokens=4, eos=()), make_request(2, 5, max_new_tokens=2, eos=())
    sched.add_request(b)
    sched.add_request(c)
    out, _ = step(sched, runner)  # B takes 2 blocks; C needs 2 + 1 kept back > 2 free
    assert list(out.num_scheduled_tokens) == [1] and sched.num_waiting == 1
    run_all(sched, runner)
    _assert_same_as_alone([b, c])


# ------------------------------------------------------------------ aborts

def test_abort_running_request_frees_blocks_at_once():
    sched, runner = make_scheduler(num_blocks=16, block_size=4)
    a, b = make_request(0, 9, max_new_tokens=8, eos=()), make_request(1, 4, max_new_tokens=8, eos=())
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    free_before, held = sched.block_manager.num_free_blocks, len(a.block_ids)
    assert sched.abort_request(0)
    assert sched.block_manager.num_free_blocks == free_before + held == 16 - len(b.block_ids)
    assert a.status is RequestStatus.FINISHED and a.finish_reason == "abort" and a.block_ids == []
    assert not sched.abort_request(0) and not sched.abort_request(99)
    assert sched.get_request(0) is None and sched.get_request(1) is b
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish_request(1, "done")
    out, _ = step(sched, runner)
    assert out.finished_request_ids == [0] and list(out.num_scheduled_tokens) == [1]
    run_all(sched, runner)
    assert b.finish_reason == "length"


def test_abort_waiting_and_preempted_requests():
    sched, runner = make_scheduler(num_blocks=6, block_size=4, max_batch_size=2)
    a, b = make_request(0, 8, max_new_tokens=12, eos=()), make_request(1, 8, max_new_tokens=12, eos=())
    w = make_request(2, 3, max_new_tokens=2, eos=())
    for r in (a, b, w):
        sched.add_request(r)
    for _ in range(6):  # the 6th step preempts B
        out, _ = step(sched, runner)
    assert out.finished_request_ids == [1] and sched.num_waiting == 2
    free = sched.block_manager.num_free_blocks
    assert sched.abort_request(2) and sched.abort_request(1)  # waiting, then preempted
    assert sched.block_manager.num_free_blocks == free and sched.num_waiting == 0
    assert w.finish_reason == b.finish_reason == "abort"
    out, _ = step(sched, runner)
    assert out.finished_request_ids == []  # neither is running: nothing for the runner to drop
    run_all(sched, runner)
    _assert_same_as_alone([a])


def test_request_ended_between_schedule_and_update_is_skipped():
    sched, runner = make_scheduler(num_blocks=16, block_size=4)
    a, b = make_request(0, 5, max_new_tokens=8, eos=()), make_request(1, 5, max_new_tokens=8, eos=())
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    out = sched.schedule()
    assert sched.finish_request(0, "stop")  # e.g. the engine matched a stop string
    received = sched.update(out, runner.execute(out))
    assert received == [b] and a.finish_reason == "stop" and a.num_output_tokens == 1
    run_all(sched, runner)


# ------------------------------------------------------------------ endings

@pytest.mark.parametrize("gen, script, expected, reason", [
    (dict(), [3, 5, EOS, 9], [3, 5, EOS], "stop"),
    (dict(stop_token_ids=[5]), [3, 5, EOS], [3, 5], "stop"),
    (dict(ignore_eos=True, max_new_tokens=4), [EOS, 3, EOS, 4, 5], [EOS, 3, EOS, 4], "length"),
    (dict(ignore_eos=True, stop_token_ids=[4]), [EOS, 3, 4, 5], [EOS, 3, 4], "stop"),
    # stop ids count only once min_new_tokens tokens precede them (the sampler's backstop)
    (dict(min_new_tokens=2), [EOS, 5, EOS, 1], [EOS, 5, EOS], "stop"),
    (dict(min_new_tokens=2, stop_token_ids=[5]), [5, 5, 1, 5], [5, 5, 1, 5], "stop"),
    (dict(max_new_tokens=3), [1, 2, 3, 4], [1, 2, 3], "length"),
    (dict(max_new_tokens=3), [1, 2, EOS], [1, 2, EOS], "stop"),  # stop wins a tie with length
])
def test_finish_conditions(gen, script, expected, reason):
    gen.setdefault("max_new_tokens", 10)
    sched, runner = make_scheduler(num_blocks=8, block_size=4, script={0: script})
    r = make_request(0, 4, **gen)
    sched.add_request(r)
    run_all(sched, runner)
    assert (r.output_token_ids, r.finish_reason) == (expected, reason)
    assert r.all_token_ids == r.prompt_token_ids + expected


def test_session_length_ends_with_length():
    sched, runner = make_scheduler(num_blocks=8, block_size=4)
    r = make_request(0, 10, max_new_tokens=100, max_total_tokens=13, eos=())
    sched.add_request(r)
    run_all(sched, runner)
    assert r.finish_reason == "length" and r.num_output_tokens == 3 and r.num_tokens == 13


def test_stop_token_ids_of_sampling_params():
    r = make_request(0, 3, eos=(7, 8), stop_token_ids=[2])
    assert r.sampling.stop_token_ids == {2, 7, 8}
    assert make_request(1, 3, eos=(7, 8), ignore_eos=True, stop_token_ids=[2]).sampling.stop_token_ids == {2}


def test_min_new_tokens_with_masking_sampler_yields_no_early_stop():
    sched, runner = make_scheduler(num_blocks=32, block_size=4)
    r = make_request(0, 4, eos=range(49), min_new_tokens=5, max_new_tokens=20)  # only 49 is no stop
    sched.add_request(r)
    run_all(sched, runner)
    out = r.output_token_ids
    assert out[:5] == [49] * 5 and r.finish_reason == "stop" and out[-1] != 49 and len(out) >= 6


def test_finished_ids_are_reported_once_in_the_next_step():
    sched, runner = make_scheduler(num_blocks=32, block_size=4)
    reqs = [make_request(i, 3, max_new_tokens=1 + i, eos=()) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    run_all(sched, runner)  # FakeRunner.drop fails on a second report; flush on a missing one
    reported = [rid for ids in runner.left_ids for rid in ids]
    assert sorted(reported[:2]) == [0, 1] and runner.left_ids[1] == [0] and runner.left_ids[2] == [1]


def test_add_request_rejects_requests_that_cannot_run():
    sched, _ = make_scheduler(num_blocks=4, block_size=4)
    sched.add_request(make_request(0, 3))
    with pytest.raises(ValueError, match="unique"):
        sched.add_request(make_request(0, 3))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        sched.add_request(make_request(1, 3, max_new_tokens=0))
    with pytest.raises(ValueError, match="cache holds 4 blocks"):
        sched.add_request(make_request(2, 10, max_new_tokens=8))  # 17 KV tokens > 16 slots
    sched.add_request(make_request(3, 10, max_new_tokens=7))  # 16 KV tokens: fits exactly
    with pytest.raises(ValueError, match="session length"):
        make_request(4, 10, max_total_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        make_request(5, [])
    assert sched.num_waiting == 2


# ------------------------------------------------------------------ randomized stress

def _random_request(rng, rid, max_prompt):
    prompt = rng.randint(1, max_prompt)
    gen = dict(max_new_tokens=rng.randint(1, 25))
    if rng.random() < 0.3:
        gen["min_new_tokens"] = rng.randint(0, 10)
    if rng.random() < 0.2:
        gen["ignore_eos"] = True
    if rng.random() < 0.3:
        gen["stop_token_ids"] = [rng.randrange(50)]
    session = prompt + rng.randint(1, 30) if rng.random() < 0.3 else 10_000
    return make_request(rid, prompt, max_total_tokens=session, seed=rng.randrange(1000), **gen)


def _stress(seed, prefix_caching=False, num_host_blocks=0, overlap=False):
    """Random arrivals, lengths, endings and aborts on a cache barely big enough for the largest
    request; every step is checked by step(). With overlap, each step is scheduled before the
    previous one's tokens arrive, as in the engine's overlapped loop, so every abort lands between
    a schedule() and the update() of the step before it. Returns (preemptions, stop-id endings,
    unsampled prompt chunks)."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    requests = [_random_request(rng, rid, max_prompt=40) for rid in range(40)]
    biggest = max(-(-r.max_kv_tokens // block_size) for r in requests)
    sched, runner = make_scheduler(
        num_blocks=biggest + rng.randint(0, 3), block_size=block_size,
        max_batch_size=rng.randint(1, 6), max_num_batched_tokens=rng.choice([1, 3, 8, 16, 64]),
        watermark_blocks=rng.randint(0, 2), prefix_caching=prefix_caching, num_host_blocks=num_host_blocks)
    arrivals = sorted(rng.randrange(60) for _ in requests)
    pending = list(zip(arrivals, requests))
    aborted = set()
    stepper = Stepper(sched, runner, overlap)
    for n in range(20_000):
        while pending and pending[0][0] <= n:
            sched.add_request(pending.pop(0)[1])
        if not pending and not stepper.busy:
            break
        live = [r.request_id for r in requests if sched.get_request(r.request_id) is not None]
        if live and rng.random() < 0.03:
            rid = rng.choice(live)
            assert sched.abort_request(rid)
            aborted.add(rid)
        if not overlap and live and rng.random() < 0.02:  # an abort that lands between schedule() and update()
            out = sched.schedule()
            rid = rng.choice(live)
            if sched.abort_request(rid):
                aborted.add(rid)
            sched.update(out, runner.execute(out))
            sched.check_invariants()
            continue
        stepper.step()
    else:
        raise AssertionError("stress run did not finish")
    flush(sched, runner)
    assert all(r.is_finished for r in requests)
    for r in requests:
        alone_output, alone_reason = run_alone(r)
        if r.request_id in aborted and r.finish_reason == "abort":
            assert r.output_token_ids == alone_output[:r.num_output_tokens]
        else:
            assert (r.output_token_ids, r.finish_reason) == (alone_output, alone_reason), r
    chunks = sum(not rec[3] for records in runner.steps for rec in records)
    return sched.num_preemptions, sum(r.finish_reason == "stop" for r in requests), chunks


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("prefix_caching, num_host_blocks", [(False, 0), (True, 0), (True, 40)])
def test_randomized_stress_matches_running_alone(prefix_caching, num_host_blocks, overlap):
    # a failure's traceback names its seed
    results = {seed: _stress(seed, prefix_caching, num_host_blocks, overlap) for seed in range(8)}
    preemptions, stops, chunks = (sum(column) for column in zip(*results.values()))
    assert preemptions > 20 and stops > 20 and chunks > 20, f"scenarios too tame to test much: {results}"


def test_bookkeeping_never_imports_torch():
    code = ("import sys; import tidemind.core.scheduler, tidemind.core.block_manager, "
            "tidemind.core.request, tidemind.core.sessions, tidemind.core.outputs; sys.exit('torch' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)})
    assert result.returncode == 0, "the engine bookkeeping (or a package __init__ above it) imports torch"
