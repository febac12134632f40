import pytest

from tidemind.config import GenerationConfig
from tidemind.core.block_manager import BlockManager
from tidemind.core.request import Request


def _req(rid: int) -> Request:
    return Request(rid, [1, 2, 3], GenerationConfig(), seed=0, eos_token_ids=frozenset(), max_total_tokens=1000)


def test_allocate_grows_block_table_to_cover_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = _req(0)
    assert bm.blocks_needed(r, 0) == 0
    assert bm.blocks_needed(r, 1) == 1
    assert bm.blocks_needed(r, 4) == 1
    assert bm.blocks_needed(r, 5) == 2
    assert bm.allocate(r, 5)
    assert r.block_ids == [0, 1]
    assert bm.num_free_blocks == 6
    assert bm.blocks_needed(r, 8) == 0  # already covered
    assert bm.allocate(r, 8) and r.block_ids == [0, 1]
    assert bm.blocks_needed(r, 9) == 1
    assert bm.allocate(r, 9) and r.block_ids == [0, 1, 2]
    assert bm.usage == pytest.approx(3 / 8)
    bm.check_invariants([r])


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _req(0), _req(1)
    assert bm.allocate(a, 5)  # 3 blocks
    assert not bm.allocate(b, 4)  # needs 2, 1 free
    assert b.block_ids == [] and bm.num_free_blocks == 1
    assert bm.allocate(b, 2)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    bm.check_invariants([a, b])


def test_free_returns_blocks_and_reuses_them_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b, c = _req(0), _req(1), _req(2)
    bm.allocate(a, 8)
    bm.allocate(b, 8)
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3]
    table_given_to_runner = a.block_ids
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 4
    assert table_given_to_runner == [0, 1]  # a table already handed out is not mutated
    bm.check_invariants([b])
    bm.allocate(c, 12)
    assert c.block_ids == [0, 1, 4]  # freed blocks first, in their old order
    bm.free(a)  # nothing held: no-op
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    bm.check_invariants([])


def test_invariant_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _req(0), _req(1)
    bm.allocate(a, 4)
    bm.allocate(b, 4)
    bm.check_invariants([a, b])
    with pytest.raises(AssertionError, match="held by"):
        bm.check_invariants([a])  # b's block is counted but has no owner
    b.block_ids.append(a.block_ids[0])  # two owners of one block with ref_count 1
    with pytest.raises(AssertionError):
        bm.check_invariants([a, b])
    b.block_ids.pop()
    stray = _req(2)
    stray.block_ids = [3]  # a block still in the free stack
    with pytest.raises(AssertionError, match="ref_count 0"):
        bm.check_invariants([a, b, stray])
    twice = _req(3)
    twice.block_ids = a.block_ids * 2
    with pytest.raises(AssertionError, match="twice"):
        bm.check_invariants([twice, b])


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = _req(0)
    bm.allocate(a, 4)
    copy = _req(1)
    copy.block_ids = list(a.block_ids)
    bm.free(a)
    with pytest.raises(RuntimeError, match="already free"):
        bm.free(copy)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_fill_and_drain_many_requests():
    bm = BlockManager(num_blocks=10, block_size=3)
    reqs = [_req(i) for i in range(5)]
    for i, r in enumerate(reqs):
        assert bm.allocate(r, 6)  # 2 blocks each
    assert bm.num_free_blocks == 0 and not bm.allocate(_req(9), 1)
    owned = sorted(b for r in reqs for b in r.block_ids)
    assert owned == list(range(10))
    for r in reqs[::2]:
        bm.free(r)
    bm.check_invariants(reqs[1::2])
    assert bm.num_free_blocks == 6
    for r in reqs[1::2]:
        bm.free(r)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_total_blocks == 10
