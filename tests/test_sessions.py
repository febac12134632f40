"""Interactive sessions in the scheduler: a turn takes over the conversation's KV blocks, idle
sessions give them back under memory pressure, aborted turns are forgotten (no torch)."""
import pytest

try:
    from fake_runner import flush, make_request, make_scheduler, run_alone, step
except ImportError:
    from tests.fake_runner import flush, make_request, make_scheduler, run_alone, step


def _turn(request_id, history, new_tokens, session_id=1, **gen):
    gen.setdefault("max_new_tokens", 6)
    r = make_request(request_id, list(history) + list(new_tokens), eos=(), seed=99, **gen)
    r.session_id = session_id
    return r


def _end_all(sched, runner, *session_ids):
    for sid in session_ids:
        sched.end_session(sid)
    flush(sched, runner)


def test_second_turn_reuses_the_first_turns_kv_and_matches_a_fresh_full_prompt():
    sched, runner = make_scheduler(num_blocks=32, block_size=4)
    first = _turn(0, [], [3, 4, 5, 6, 7])
    sched.add_request(first)
    while sched.has_unfinished_requests():
        step(sched, runner)
    history = sched.sessions.history(1)
    assert history == first.all_token_ids and len(history) == 5 + 6
    session = sched.sessions.get(1)
    assert session.num_cached == len(history) - 1 and len(session.block_ids) == 3  # ceil(10 / 4)

    second = _turn(1, history, [8, 9])
    sched.add_request(second)
    out, _ = step(sched, runner)
    # Only the uncached tail is computed: the last answer token and the two new ones.
    assert [(start, n) for _, start, n, _ in runner.steps[-1]] == [(len(history) - 1, 3)]
    assert second.num_cached_tokens == len(history) - 1
    while sched.has_unfinished_requests():
        step(sched, runner)
    fresh = make_request(1, history + [8, 9], eos=(), seed=99, max_new_tokens=6)
    assert (second.output_token_ids, second.finish_reason) == run_alone(fresh)
    assert sched.sessions.history(1) == second.all_token_ids
    _end_all(sched, runner, 1)


def test_idle_sessions_give_their_kv_back_under_pressure_and_recompute_later():
    sched, runner = make_scheduler(num_blocks=8, block_size=4)
    first = _turn(0, [], [1, 2, 3, 4, 5, 6])
    sched.add_request(first)
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert len(sched.sessions.get(1).block_ids) == 3
    big = make_request(5, 24, max_new_tokens=4, eos=())  # needs 7 of the 8 blocks
    sched.add_request(big)
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert sched.sessions.get(1).block_ids == [] and sched.sessions.get(1).num_cached == 0
    history = sched.sessions.history(1)
    second = _turn(1, history, [9])
    sched.add_request(second)
    out, _ = step(sched, runner)
    assert runner.steps[-1][0][1] == 0 and second.num_cached_tokens == 0  # recomputed
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert (second.output_token_ids, second.finish_reason) == run_alone(
        make_request(1, history + [9], eos=(), seed=99, max_new_tokens=6))
    _end_all(sched, runner, 1)


def test_aborted_turn_is_forgotten_and_the_session_goes_on():
    sched, runner = make_scheduler(num_blocks=32, block_size=4)
    sched.add_request(_turn(0, [], [1, 2, 3]))
    while sched.has_unfinished_requests():
        step(sched, runner)
    history = list(sched.sessions.history(1))
    turn = _turn(1, history, [4], max_new_tokens=20)
    sched.add_request(turn)
    step(sched, runner)
    step(sched, runner)
    assert sched.abort_request(1)
    session = sched.sessions.get(1)
    assert sched.sessions.history(1) == history and session.active_request_id is None
    # The conversation's KV survives the aborted turn: the next turn still reuses it.
    assert session.num_cached == len(history) - 1 and len(session.block_ids) == 2  # ceil(8 / 4)
    again = _turn(2, history, [4])
    sched.add_request(again)
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert again.finish_reason == "length" and again.num_cached_tokens == len(history) - 1
    assert (again.output_token_ids, again.finish_reason) == run_alone(
        make_request(2, history + [4], eos=(), seed=99, max_new_tokens=6))
    _end_all(sched, runner, 1)


def test_one_turn_at_a_time_and_prompts_must_continue_the_conversation():
    sched, runner = make_scheduler(num_blocks=32, block_size=4)
    sched.add_request(_turn(0, [], [1, 2, 3]))
    with pytest.raises(ValueError, match="busy"):
        sched.add_request(_turn(1, [], [1, 2, 3]))
    while sched.has_unfinished_requests():
        step(sched, runner)
    with pytest.raises(ValueError, match="does not continue"):
        sched.add_request(_turn(2, [9, 9], [1]))
    _end_all(sched, runner, 1)


def test_ending_a_session_aborts_its_running_turn_and_frees_everything():
    sched, runner = make_scheduler(num_blocks=32, block_size=4)
    sched.add_request(_turn(0, [], [1, 2, 3], max_new_tokens=50))
    step(sched, runner)
    step(sched, runner)
    aborted = sched.end_session(1)
    assert aborted is not None and aborted.finish_reason == "abort"
    assert sched.sessions.get(1) is None
    flush(sched, runner)


def test_preempted_turn_of_a_session_still_matches_running_alone():
    sched, runner = make_scheduler(num_blocks=7, block_size=4, max_num_batched_tokens=8)
    sched.add_request(_turn(0, [], [1, 2, 3, 4]))
    while sched.has_unfinished_requests():
        step(sched, runner)
    history = list(sched.sessions.history(1))
    turn = _turn(1, history, [5, 6], max_new_tokens=8)
    other = make_request(7, 10, max_new_tokens=10, eos=())
    sched.add_request(other)
    sched.add_request(turn)
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert sched.num_preemptions > 0
    assert (turn.output_token_ids, turn.finish_reason) == run_alone(
        make_request(1, history + [5, 6], eos=(), seed=99, max_new_tokens=8))
    _end_all(sched, runner, 1)


# ------------------------------------------------------------------ sessions as pins in the prefix cache

def test_a_released_pin_leaves_the_history_in_the_prefix_cache():
    sched, runner = make_scheduler(num_blocks=8, block_size=4, prefix_caching=True)
    sched.add_request(_turn(0, [], [1, 2, 3, 4, 5, 6]))  # 12 tokens: 11 of KV, 2 full blocks cached
    while sched.has_unfinished_requests():
        step(sched, runner)
    big = make_request(5, 21, max_new_tokens=4, eos=())  # needs 6 blocks: the pin is released
    sched.add_request(big)
    while sched.has_unfinished_requests():
        step(sched, runner)
    session = sched.sessions.get(1)
    assert session.block_ids == [] and session.num_cached == 0
    assert sched.block_manager.num_evictable_blocks == 2 + 6  # the history's 2 full blocks, big's 6
    history = sched.sessions.history(1)
    second = _turn(1, history, [9])
    sched.add_request(second)
    step(sched, runner)
    assert runner.steps[-1][0][1] == 8 and second.num_cached_tokens == 8  # hits, less the partial block
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert (second.output_token_ids, second.finish_reason) == run_alone(
        make_request(1, history + [9], eos=(), seed=99, max_new_tokens=6))
    _end_all(sched, runner, 1)


def test_sessions_with_a_common_prefix_pin_the_same_blocks():
    sched, runner = make_scheduler(num_blocks=32, block_size=4, prefix_caching=True)
    system = [3, 1, 4, 1, 5, 9, 2, 6]
    for rid, sid in ((0, 1), (1, 2)):
        sched.add_request(_turn(rid, [], system + [sid, sid], session_id=sid))
        while sched.has_unfinished_requests():
            step(sched, runner)
    first, second = sched.sessions.get(1), sched.sessions.get(2)
    assert first.block_ids[:2] == second.block_ids[:2]  # the system prompt, by reference
    assert sched.sessions.num_cached_blocks == len(set(first.block_ids) | set(second.block_ids))  # no double count
    sched.end_session(1)
    assert sched.block_manager.num_free_blocks == 32 - len(second.block_ids)  # still pinned by 2
    sched.check_invariants()
    third = _turn(2, sched.sessions.history(2), [7], session_id=2)
    sched.add_request(third)
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert (third.output_token_ids, third.finish_reason) == run_alone(
        make_request(2, third.prompt_token_ids, eos=(), seed=99, max_new_tokens=6))
    _end_all(sched, runner, 2)
