"""Prefix caching in the block manager and the scheduler (no torch): full blocks keyed on their
tokens and their prefix, shared by reference, kept in an LRU once free, hits at admission."""
import pytest

from tidemind.config import GenerationConfig
from tidemind.core.block_manager import BlockManager
from tidemind.core.request import Request

try:
    from fake_runner import flush, make_request, make_scheduler, run_all, run_alone, step
except ImportError:
    from tests.fake_runner import flush, make_request, make_scheduler, run_all, run_alone, step


def _req(rid, tokens, salt=None):
    return Request(rid, tokens, GenerationConfig(), seed=0, eos_token_ids=frozenset(), max_total_tokens=1000,
                   cache_salt=salt)


def _computed(bm, tokens, rid=0, salt=None):
    """A request holding blocks for ``tokens`` whose KV is computed and registered."""
    r = _req(rid, tokens, salt)
    assert bm.allocate(r, len(tokens))
    bm.cache_full_blocks(r, tokens, len(tokens), salt)
    return r


# ------------------------------------------------------------------ block manager

def test_dropping_the_cache_forgets_free_blocks_and_keeps_held_ones():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    kept = _computed(bm, list(range(8)), rid=0)
    gone = _computed(bm, list(range(100, 108)), rid=1)
    bm.free(gone)  # its two blocks stay cached, free
    assert bm.num_evictable_blocks == 2
    assert bm.drop_cached_blocks() == 2
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 14
    assert bm.find_cached_prefix(list(range(100, 109))) == ([], [])
    assert bm.find_cached_prefix(list(range(9)))[0] == kept.block_ids  # a held block keeps its key
    bm.check_invariants([kept])


def test_full_blocks_hit_by_prefix_and_never_the_last_token():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = _computed(bm, list(range(10)))  # 2 full blocks + 2 tokens
    assert bm.num_cached_blocks == 2 and len(a.key_ids) == 2
    assert bm.find_cached_prefix(list(range(12))) == (a.block_ids[:2], a.key_ids)
    assert bm.find_cached_prefix(list(range(8))) == (a.block_ids[:1], a.key_ids[:1])  # last token left out
    assert bm.find_cached_prefix(list(range(9)))[0] == a.block_ids[:2]
    assert bm.find_cached_prefix([0, 1, 2, 99, 4, 5, 6, 7, 8]) == ([], [])  # first block differs
    bm.check_invariants([a])


def test_same_block_tokens_after_a_different_prefix_do_not_hit():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = _computed(bm, [1, 1, 1, 1, 5, 6, 7, 8, 0])
    blocks, _ = bm.find_cached_prefix([2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert blocks == []
    b = _computed(bm, [2, 2, 2, 2, 5, 6, 7, 8, 0], rid=1)
    assert bm.num_cached_blocks == 4  # second blocks have equal tokens but their own keys
    assert bm.find_cached_prefix([2, 2, 2, 2, 5, 6, 7, 8, 0])[0] == b.block_ids[:2]
    bm.check_invariants([a, b])


def test_cache_salt_separates_requests():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(9))
    a = _computed(bm, tokens, salt="tenant-a")
    assert bm.find_cached_prefix(tokens)[0] == []
    assert bm.find_cached_prefix(tokens, salt="tenant-b")[0] == []
    assert bm.find_cached_prefix(tokens, salt="tenant-a")[0] == a.block_ids[:2]
    b = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9], rid=1)  # unsalted: key ids 2 and 3
    # a salt equal to a key id is no parent: block [5..8] after salt 2 is not block [5..8] after [1..4]
    assert bm.find_cached_prefix([5, 6, 7, 8, 0], salt=b.key_ids[0])[0] == []


def test_caching_off_registers_and_finds_nothing():
    bm = BlockManager(16, 4)
    a = _computed(bm, list(range(9)))
    assert a.key_ids == [] and bm.num_cached_blocks == 0 and bm.find_cached_prefix(list(range(9))) == ([], [])
    bm.free(a)
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 16


def test_shared_blocks_are_counted_and_outlive_one_holder():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = _computed(bm, list(range(9)))
    b = _req(1, list(range(9)) + [50])
    blocks, key_ids = bm.find_cached_prefix(b.all_token_ids)
    bm.take_cached(b, blocks, key_ids)
    assert bm.num_free_blocks == 8 - 3  # nothing new allocated for the two shared blocks
    bm.check_invariants([a, b])
    bm.free(a)  # the shared blocks stay referenced by b; a's partial third block is free
    assert bm.num_free_blocks == 8 - 2 and bm.num_evictable_blocks == 0
    bm.check_invariants([b])
    with pytest.raises(AssertionError, match="held by"):
        bm.check_invariants([])


def test_freed_cached_blocks_wait_in_the_lru_and_are_evicted_last_block_first():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = _computed(bm, [1, 2, 3, 4, 5, 6])  # 3 full blocks
    first, second, third = a.block_ids
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_evictable_blocks == 3 and bm.usage == 0.0
    bm.check_invariants([])
    b = _req(1, [9])
    assert bm.allocate(b, 2) and b.block_ids == [3]  # the uncached block goes first
    assert bm.allocate(b, 4) and b.block_ids == [3, third]  # then the tail of a's sequence
    assert bm.num_cached_blocks == 2 and bm.num_evictions == 1
    assert bm.find_cached_prefix([1, 2, 3, 4, 5, 6, 7])[0] == [first, second]  # the head still hits
    c = _req(2, [1, 2, 3, 4, 0])
    blocks, key_ids = bm.find_cached_prefix(c.all_token_ids)
    assert bm.num_evictable_among(blocks) == 2
    bm.take_cached(c, blocks, key_ids)
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 0
    assert not bm.allocate(c, 6)
    bm.check_invariants([b, c])


def test_a_block_computed_twice_is_cached_once_and_the_chains_agree():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(13))
    a, b = _req(0, tokens), _req(1, tokens)
    bm.allocate(a, 13)
    bm.allocate(b, 13)  # both computed the same prefix in the same steps
    bm.cache_full_blocks(a, tokens, 13)
    bm.cache_full_blocks(b, tokens, 13)
    assert bm.num_cached_blocks == 3 and a.key_ids == b.key_ids
    bm.check_invariants([a, b])
    cached = a.block_ids[:3]
    bm.free(a)  # b's blocks are duplicates: free-uncached when b goes; a's are the cached ones
    bm.free(b)
    assert bm.num_evictable_blocks == 3 and bm.find_cached_prefix(tokens + [1])[0] == cached
    bm.check_invariants([])


def test_trim_drops_a_cached_block_the_holder_would_write_into():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = _computed(bm, list(range(12)))
    with pytest.raises(AssertionError, match="write into cached"):
        bm.check_frontier(a, 10)
    assert bm.trim(a, 10) == 8  # block 2 holds positions 8..11 and is cached: it goes too
    assert len(a.block_ids) == 2 and len(a.key_ids) == 2
    bm.check_frontier(a, 8)
    b = _computed(bm, list(range(20, 30)), rid=1)  # 2 cached blocks and a partial one, not cached
    assert bm.trim(b, 10) == 10 and len(b.block_ids) == 3 and len(b.key_ids) == 2
    assert bm.trim(b, 9) == 9 and len(b.block_ids) == 3
    bm.check_invariants([a, b])


def test_invariant_check_catches_a_broken_cache():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = _computed(bm, list(range(9)))
    bm.check_invariants([a])
    a.key_ids.reverse()  # a chain that does not follow the blocks
    with pytest.raises(AssertionError, match="chain"):
        bm.check_invariants([a])
    a.key_ids.reverse()
    bm.free(a)
    evictable = next(iter(bm._evictable))
    bm._free.append(evictable)  # one block in two states
    with pytest.raises(AssertionError, match="exactly one"):
        bm.check_invariants([])
    bm._free.pop()
    key = bm._key_of[evictable]
    del bm._cached[key]  # a key that maps nowhere
    with pytest.raises(AssertionError, match="maps to block None|keys map"):
        bm.check_invariants([])


# ------------------------------------------------------------------ scheduler

def _shared(rid, prefix, suffix_len, seed=None, **gen):
    gen.setdefault("max_new_tokens", 5)
    return make_request(rid, list(prefix) + [(rid * 7 + i) % 50 for i in range(suffix_len)], eos=(), seed=seed,
                        **gen)


def test_second_request_starts_after_the_cached_prefix():
    sched, runner = make_scheduler(num_blocks=32, block_size=4, prefix_caching=True)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 2 full blocks + 2 tokens
    a = _shared(0, prefix, 3)
    sched.add_request(a)
    run_all(sched, runner)
    b = _shared(1, prefix, 4)
    sched.add_request(b)
    step(sched, runner)
    assert runner.steps[-1] == [(1, 8, len(b.prompt_token_ids) - 8, True)]  # computes from position 8
    assert sched.num_hit_tokens == 8 and b.num_cached_tokens == 0  # no session: no conversation reused
    assert sched.num_queried_tokens == len(a.prompt_token_ids) + len(b.prompt_token_ids)
    run_all(sched, runner)
    assert (b.output_token_ids, b.finish_reason) == run_alone(b)


def test_identical_prompt_recomputes_only_its_last_token():
    sched, runner = make_scheduler(num_blocks=32, block_size=4, prefix_caching=True)
    a, b = _shared(0, list(range(12)), 0, seed=5), _shared(1, list(range(12)), 0, seed=5)
    sched.add_request(a)
    run_all(sched, runner)
    sched.add_request(b)
    step(sched, runner)
    assert runner.steps[-1] == [(1, 8, 4, True)]  # 12 tokens = 3 full blocks: the third is recomputed
    run_all(sched, runner)
    assert b.output_token_ids == a.output_token_ids == run_alone(a)[0]


def test_requests_running_together_share_blocks_by_reference():
    sched, runner = make_scheduler(num_blocks=32, block_size=4, prefix_caching=True)
    prefix = list(range(16))
    a = _shared(0, prefix, 2, max_new_tokens=20)
    sched.add_request(a)
    step(sched, runner)
    b = _shared(1, prefix, 3)
    sched.add_request(b)
    step(sched, runner)
    assert b.block_ids[:4] == a.block_ids[:4] and sched.num_hit_tokens == 16
    run_all(sched, runner)
    for r in (a, b):
        assert (r.output_token_ids, r.finish_reason) == run_alone(r)


def test_admission_counts_hit_blocks_as_taking_no_new_blocks():
    # 6 blocks: A (12 tokens + 1 output) holds 4; B (16 tokens) shares A's 3 full blocks and needs
    # 1 more of the 2 free: it fits only because its hits need no allocation.
    sched, runner = make_scheduler(num_blocks=6, block_size=4, prefix_caching=True)
    a = make_request(0, list(range(12)), max_new_tokens=3, eos=())
    sched.add_request(a)
    step(sched, runner)
    step(sched, runner)
    b = make_request(1, list(range(12)) + [7, 7, 7, 7], max_new_tokens=3, eos=())
    sched.add_request(b)
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == [0, 1] and sched.num_preemptions == 0
    run_all(sched, runner)
    for r in (a, b):
        assert (r.output_token_ids, r.finish_reason) == run_alone(r)


def test_free_cached_hit_blocks_count_against_the_free_blocks():
    # A's 3 full blocks wait in the LRU; C, running, holds 1 block. B hits A's 3 blocks and needs
    # 2 more: taking the hits out of the LRU leaves 1 free block, so B must wait for C.
    sched, runner = make_scheduler(num_blocks=5, block_size=4, prefix_caching=True)
    a = make_request(0, list(range(12)), max_new_tokens=1, eos=())
    sched.add_request(a)
    run_all(sched, runner)
    assert sched.block_manager.num_evictable_blocks == 3
    c = make_request(2, [9], max_new_tokens=2, eos=())
    sched.add_request(c)
    step(sched, runner)
    assert sched.block_manager.num_evictable_blocks == 3  # C's block came from the uncached ones
    b = make_request(1, list(range(12)) + [7, 7, 7, 7, 7], max_new_tokens=2, eos=())
    sched.add_request(b)
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == [2]  # B waits: 3 hits leave the LRU + 2 new > 4 free
    run_all(sched, runner)
    assert [rec for records in runner.steps for rec in records if rec[0] == 1][0][1] == 12  # B began at 12
    for r in (b, c):
        assert (r.output_token_ids, r.finish_reason) == run_alone(r)
    flush(sched, runner)
