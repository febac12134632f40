"""The runner's persistent batch and a step's inputs, against values worked out by hand: the delta
contract applied to InputBatch rows, then prepare_step's token ids, positions, cache slots,
lengths, block tables, sampling rows and CUDA-graph padding rows (CPU buffers; the GPU copies the
same bytes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tidemind.config import GenerationConfig
from tidemind.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from tidemind.core.sampling_params import SamplingParams
from tidemind.runner.input_batch import InputBatch
from tidemind.runner.step_inputs import StepBuffers, prepare_step

BLOCK = 4
GREEDY = SamplingParams.from_generation_config(GenerationConfig(), seed=0)


def _new(rid, prompt, blocks, computed=0, outputs=()):
    return NewRequestData(rid, tuple(prompt), tuple(outputs), GREEDY, tuple(blocks), computed)


def _read(buffers, name, n):
    return buffers.host(name, n).tolist()


def test_a_mixed_step_lays_out_decodes_first_with_slots_through_block_tables():
    batch = InputBatch(max_num_reqs=4, max_model_len=32, max_blocks_per_req=8)
    buffers = StepBuffers(max_tokens=16, max_seqs=4, max_blocks_per_seq=8, device=torch.device("cpu"))
    # request 7: a 6-token prompt, 5 already cached (a session's turn): its last token is a decode.
    # request 9: a 10-token prompt in blocks [3, 0, 5], chunk of 6 from the start.
    scheduled = SchedulerOutput(new_requests=[_new(9, range(100, 110), [3, 0, 5]), _new(7, range(20, 26), [6, 1], 5)],
                                num_scheduled_tokens={9: 6, 7: 1})
    for new in scheduled.new_requests:
        batch.add(new)
    step = prepare_step(batch, scheduled, buffers, BLOCK)
    assert (step.num_seqs, step.num_decodes, step.num_tokens) == (2, 1, 7)
    assert _read(buffers, "input_ids", 7) == [25, 100, 101, 102, 103, 104, 105]
    assert _read(buffers, "positions", 7) == [5, 0, 1, 2, 3, 4, 5]
    # slot = block_table[pos // 4] * 4 + pos % 4
    assert _read(buffers, "slot_mapping", 7) == [1 * 4 + 1, 12, 13, 14, 15, 0, 1]
    assert _read(buffers, "seq_lens", 2) == [6, 6] and _read(buffers, "query_start_loc", 3) == [0, 1, 7]
    tables = buffers.block_tables_host(2)
    assert tables[0, :2].tolist() == [6, 1] and tables[1, :3].tolist() == [3, 0, 5]  # decode row first
    # only request 7 reached its last token: it samples, from hidden row 0
    assert step.sampled_request_ids == [7] and _read(buffers, "logits_indices", 1) == [0]
    batch.num_computed_tokens[step.scheduled_rows] += step.num_scheduled
    batch.append_tokens(step.sampled_rows, np.array([42], dtype=np.int32))

    # Next step: 9's second chunk (4 tokens, no new block); 7 decodes 42 at position 6 in a new block 2.
    nxt = SchedulerOutput(cached_requests=[CachedRequestData(7, (2,), 6), CachedRequestData(9, (), 6)],
                          num_scheduled_tokens={7: 1, 9: 4})
    for cached in nxt.cached_requests:
        batch.update(cached)
    step = prepare_step(batch, nxt, buffers, BLOCK)
    assert _read(buffers, "input_ids", 5) == [42, 106, 107, 108, 109]
    assert _read(buffers, "slot_mapping", 5) == [1 * 4 + 2, 0 * 4 + 2, 0 * 4 + 3, 5 * 4 + 0, 5 * 4 + 1]
    assert step.sampled_request_ids == [7, 9] and _read(buffers, "logits_indices", 2) == [0, 4]


def test_a_token_still_on_the_device_is_named_for_the_next_step_to_copy():
    # Overlapped steps: request 7's sampled token is a placeholder when the next step is prepared;
    # the step names where its id is (the previous step's sampled ids, index 1) and where it goes.
    batch = InputBatch(max_num_reqs=4, max_model_len=32, max_blocks_per_req=8)
    buffers = StepBuffers(max_tokens=16, max_seqs=4, max_blocks_per_seq=8, device=torch.device("cpu"))
    first = SchedulerOutput(new_requests=[_new(9, [1, 2, 3], [0]), _new(7, [4, 5], [1])],
                            num_scheduled_tokens={9: 3, 7: 2})
    for new in first.new_requests:
        batch.add(new)
    step = prepare_step(batch, first, buffers, BLOCK)
    batch.num_computed_tokens[step.scheduled_rows] += step.num_scheduled
    positions = batch.append_placeholders(step.sampled_rows)  # sampled: 9 (index 0) and 7 (index 1)
    sampled_rows = step.sampled_rows
    nxt = SchedulerOutput(cached_requests=[CachedRequestData(7, (), 2)], num_scheduled_tokens={7: 1})
    batch.update(nxt.cached_requests[0])
    step = prepare_step(batch, nxt, buffers, BLOCK, previous_sampled_rows=sampled_rows)
    assert step.num_pending == 1
    assert _read(buffers, "pending_dst", 1) == [0] and _read(buffers, "pending_src", 1) == [1]
    assert _read(buffers, "positions", 1) == [2] and step.sampled_request_ids == [7]
    batch.fill_placeholders(np.array([batch.row(7)]), positions[1:], np.array([55], dtype=np.int32))
    step = prepare_step(batch, nxt, buffers, BLOCK)  # once the id is on the host, nothing is pending
    assert step.num_pending == 0 and _read(buffers, "input_ids", 1) == [55]
    with pytest.raises(RuntimeError, match="no launched step samples"):
        batch.append_placeholders(np.array([batch.row(7)]))
        prepare_step(batch, SchedulerOutput(cached_requests=[], num_scheduled_tokens={7: 1}), buffers, BLOCK)


def test_decode_steps_padded_for_a_graph_write_nothing_and_read_nothing():
    batch = InputBatch(max_num_reqs=8, max_model_len=16, max_blocks_per_req=4)
    buffers = StepBuffers(max_tokens=8, max_seqs=8, max_blocks_per_seq=4, device=torch.device("cpu"))
    buffers.host("slot_mapping", 8)[:] = 99  # stale values of an earlier step
    scheduled = SchedulerOutput(new_requests=[_new(1, [5, 6], [2], computed=1), _new(2, [7], [3])],
                                num_scheduled_tokens={1: 1, 2: 1})
    for new in scheduled.new_requests:
        batch.add(new)
    step = prepare_step(batch, scheduled, buffers, BLOCK, decode_padding=lambda n: 4)
    assert step.is_decode_only and step.num_seqs == 2
    assert _read(buffers, "slot_mapping", 4) == [2 * 4 + 1, 3 * 4 + 0, -1, -1]
    assert _read(buffers, "seq_lens", 4) == [2, 1, 0, 0] and _read(buffers, "input_ids", 4)[2:] == [0, 0]


def test_deltas_that_disagree_with_the_runner_are_refused():
    batch = InputBatch(max_num_reqs=2, max_model_len=8, max_blocks_per_req=2)
    batch.add(_new(1, [1, 2, 3], [0]))
    with pytest.raises(RuntimeError, match="sent whole twice"):
        batch.add(_new(1, [1, 2, 3], [0]))
    with pytest.raises(RuntimeError, match="scheduler 2"):
        batch.update(CachedRequestData(1, (), 2))  # the runner has 0 tokens in the cache
    with pytest.raises(RuntimeError, match="never sent whole"):
        batch.update(CachedRequestData(5, (), 0))
    batch.add(_new(2, [1], [1]))
    with pytest.raises(RuntimeError, match="its maximum"):
        batch.add(_new(3, [1], [1]))
    batch.remove(1)
    batch.add(_new(3, [1], [1]))  # the freed row is taken again
