"""One step's model inputs, built on the host in numpy and sent to the device in one copy.

StepBuffers owns one int32 buffer on the device (pinned host staging buffer beside it on a GPU; on
the CPU the staging buffer is the device buffer) with every per-step field at a fixed offset:

    [ seq_lens | query_start_loc | logits_indices | pending_dst | pending_src |
      max_seqs   max_seqs + 1      max_seqs         max_seqs      max_seqs
      input_ids | positions | slot_mapping | block_tables ]
      max_tokens  max_tokens  max_tokens     max_seqs x max_blocks

Fixed offsets make the device views the static inputs that CUDA graphs replay; block tables come
last, row by row, so a step's used region is always a prefix of the buffer and one copy of that
prefix sends it all. The host must not rewrite the staging buffer while the copy from it may still
be in flight: prepare_step() waits for the previous step's copy (an event recorded after it) before
it writes; usually long done, since a step that samples synchronizes for its token ids anyway.

Step order: sequences with one new token first (the decode group), then prompt chunks, each group in
schedule order.

Tokens not on the host yet: when the engine overlaps steps, the step is prepared while the device
still runs the previous one, whose sampled ids the host does not have. Such a token (only ever the
one input of a decode row, InputBatch.num_pending) is written as a placeholder, and the step names
where its id comes from: input token pending_dst[i] takes the previous step's sampled id number
pending_src[i], copied on the device before the forward pass (ModelRunner.launch).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..attention.base import StepLayout
from ..core.outputs import SchedulerOutput
from .input_batch import InputBatch

_FIELDS = ("seq_lens", "query_start_loc", "logits_indices", "pending_dst", "pending_src", "input_ids", "positions",
           "slot_mapping", "block_tables")


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        sizes = {"seq_lens": max_seqs, "query_start_loc": max_seqs + 1, "logits_indices": max_seqs,
                 "pending_dst": max_seqs, "pending_src": max_seqs, "input_ids": max_tokens, "positions": max_tokens,
                 "slot_mapping": max_tokens,
                 "block_tables": max_seqs * max_blocks_per_seq}
        self._offsets: Dict[str, int] = {}
        total = 0
        for name in _FIELDS:
            self._offsets[name] = total
            total += sizes[name]
        self._size = total
        on_gpu = device.type == "cuda"
        self._host = torch.zeros(total, dtype=torch.int32, pin_memory=on_gpu)
        self._host_np = self._host.numpy()
        self._device = torch.zeros(total, dtype=torch.int32, device=device) if on_gpu else self._host
        self._copied = torch.cuda.Event() if on_gpu else None  # recorded after each upload

    def wait_until_writable(self) -> None:
        """Block until the last upload has read the staging buffer (no-op on the CPU)."""
        if self._copied is not None:
            self._copied.synchronize()

    def host(self, name: str, length: int) -> np.ndarray:
        start = self._offsets[name]
        return self._host_np[start:start + length]

    def device_view(self, name: str, length: int) -> torch.Tensor:
        start = self._offsets[name]
        return self._device[start:start + length]

    def block_tables_host(self, num_seqs: int) -> np.ndarray:
        return self.host("block_tables", num_seqs * self.max_blocks_per_seq).reshape(num_seqs, -1)

    def block_tables_device(self, num_seqs: int) -> torch.Tensor:
        return self.device_view("block_tables", num_seqs * self.max_blocks_per_seq).view(num_seqs, -1)

    def upload(self, num_seqs: int) -> None:
        """Send the fields of a step with num_seqs sequences to the device (one copy)."""
        if self._device is self._host:
            return
        end = self._offsets["block_tables"] + num_seqs * self.max_blocks_per_seq
        self._device[:end].copy_(self._host[:end], non_blocking=True)
        self._copied.record()


@dataclass
class PreparedStep:
    """A step whose inputs are on the device. The device views (and the StepLayout over them) are
    made only when asked for: a decode step replayed from a CUDA graph needs none of them."""

    buffers: StepBuffers
    block_size: int
    num_tokens: int
    num_seqs: int
    num_decodes: int
    max_query_len: int
    seq_lens: np.ndarray  # [num_seqs] tokens of each sequence in the cache after the step
    query_start_loc: np.ndarray  # [num_seqs + 1]
    sampled_rows: np.ndarray  # [num_sampled] InputBatch rows, in logits order
    sampled_request_ids: List[int]
    scheduled_rows: np.ndarray  # [num_seqs] InputBatch rows in step order
    num_scheduled: np.ndarray  # [num_seqs] tokens computed for each
    num_pending: int = 0  # input tokens whose ids come from the previous step's sampled ids (see above)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs

    @functools.cached_property
    def layout(self) -> StepLayout:
        b, num_seqs = self.buffers, self.num_seqs
        return StepLayout(
            num_tokens=self.num_tokens, num_seqs=num_seqs, num_decodes=self.num_decodes,
            max_query_len=self.max_query_len, max_seq_len=int(self.seq_lens.max()) if num_seqs else 0,
            block_size=self.block_size, slot_mapping=b.device_view("slot_mapping", self.num_tokens),
            seq_lens=b.device_view("seq_lens", num_seqs), query_start_loc=b.device_view("query_start_loc", num_seqs + 1),
            block_tables=b.block_tables_device(num_seqs), seq_lens_host=self.seq_lens,
            query_start_loc_host=self.query_start_loc)

    @property
    def input_ids(self) -> torch.Tensor:  # [num_tokens] int32, on the device
        return self.buffers.device_view("input_ids", self.num_tokens)

    @property
    def positions(self) -> torch.Tensor:  # [num_tokens] int32
        return self.buffers.device_view("positions", self.num_tokens)

    @property
    def pending_dst(self) -> torch.Tensor:  # [num_pending] int32: input token indices
        return self.buffers.device_view("pending_dst", self.num_pending)

    @property
    def pending_src(self) -> torch.Tensor:  # [num_pending] int32: indices into the previous step's sampled ids
        return self.buffers.device_view("pending_src", self.num_pending)

    @property
    def logits_indices(self) -> torch.Tensor:  # [num_sampled] int32: the hidden row each sample reads
        return self.buffers.device_view("logits_indices", len(self.sampled_request_ids))


def prepare_step(batch: InputBatch, scheduled: SchedulerOutput, buffers: StepBuffers, block_size: int,
                 decode_padding: Optional[Callable[[int], int]] = None,
                 previous_sampled_rows: Optional[np.ndarray] = None) -> PreparedStep:
    """Fill the buffers for the scheduled requests (whose deltas the batch has applied) and upload.

    decode_padding(num_seqs) -> the row count a decode-only step is replayed with (a CUDA graph's
    size): rows past num_seqs are filled as padding (token 0 at position 0, slot -1, seq_len 0).
    previous_sampled_rows: the InputBatch rows the previous launched step sampled, in the order of
    its sampled ids (needed when any scheduled row has a pending token, see above)."""
    request_ids = list(scheduled.num_scheduled_tokens)
    counts_in_schedule = np.fromiter(scheduled.num_scheduled_tokens.values(), dtype=np.int64,
                                     count=len(request_ids))
    rows_in_schedule = np.fromiter((batch.row(rid) for rid in request_ids), dtype=np.int64, count=len(request_ids))
    # Decode group first; a stable sort keeps schedule order inside each group.
    order = np.argsort(counts_in_schedule != 1, kind="stable")
    rows, counts = rows_in_schedule[order], counts_in_schedule[order]
    num_seqs, num_decodes = len(rows), int(np.count_nonzero(counts == 1))
    num_tokens = int(counts.sum())
    if num_tokens > buffers.max_tokens or num_seqs > buffers.max_seqs:
        raise RuntimeError(f"a step of {num_tokens} tokens / {num_seqs} sequences exceeds the runner's "
                           f"buffers ({buffers.max_tokens} / {buffers.max_seqs})")

    buffers.wait_until_writable()
    starts = batch.num_computed_tokens[rows]  # [S] tokens already in the cache
    seq_lens = starts + counts
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start_loc[1:])
    # Per token: its sequence's row and its position in that sequence.
    token_rows = np.repeat(rows, counts)
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - query_start_loc[:-1], counts)
    block_ids = batch.block_table[token_rows, positions // block_size]

    buffers.host("seq_lens", num_seqs)[:] = seq_lens
    buffers.host("query_start_loc", num_seqs + 1)[:] = query_start_loc
    buffers.host("input_ids", num_tokens)[:] = batch.token_ids[token_rows, positions]
    buffers.host("positions", num_tokens)[:] = positions
    buffers.host("slot_mapping", num_tokens)[:] = block_ids.astype(np.int64) * block_size + positions % block_size
    width = int(batch.num_blocks[rows].max()) if num_seqs else 0
    buffers.block_tables_host(num_seqs)[:, :width] = batch.block_table[rows, :width]
    # A sequence samples when this step computes up to its last known token.
    samples = seq_lens == batch.num_tokens[rows]
    num_sampled = int(np.count_nonzero(samples))
    buffers.host("logits_indices", num_sampled)[:] = query_start_loc[1:][samples] - 1
    # A pending token is the last of its row: only a decode row (one token, at its index) has one.
    pending = np.flatnonzero(batch.num_pending[rows[:num_decodes]])
    if pending.size:
        index_of_row = np.full(batch.max_num_reqs, -1, dtype=np.int64)  # row -> its id's index, or -1
        if previous_sampled_rows is not None:
            index_of_row[previous_sampled_rows] = np.arange(len(previous_sampled_rows))
        src = index_of_row[rows[pending]]
        if (src < 0).any():
            raise RuntimeError("a step reads a token that no launched step samples")
        buffers.host("pending_dst", pending.size)[:] = pending
        buffers.host("pending_src", pending.size)[:] = src
    padded = decode_padding(num_seqs) if decode_padding is not None and num_decodes == num_seqs else num_seqs
    if padded > num_seqs:
        for name, value in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 0)):
            buffers.host(name, padded)[num_seqs:] = value
    buffers.upload(padded)

    ordered_ids = [request_ids[i] for i in order]
    return PreparedStep(
        buffers=buffers, block_size=block_size, num_tokens=num_tokens, num_seqs=num_seqs, num_decodes=num_decodes,
        max_query_len=int(counts.max()) if num_seqs else 0, seq_lens=seq_lens, query_start_loc=query_start_loc,
        sampled_rows=rows[samples], sampled_request_ids=[rid for rid, s in zip(ordered_ids, samples) if s],
        scheduled_rows=rows, num_scheduled=counts, num_pending=int(pending.size))
