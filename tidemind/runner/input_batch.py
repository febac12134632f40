"""The runner's own copy of the requests it holds, kept across steps (one row per request).

Built only from the step contract's deltas (core/outputs.py): a request arrives whole once
(NewRequestData) and takes a free row; later steps bring its new blocks (CachedRequestData); it
gives its row back when it leaves (finished_request_ids). The runner appends every token it samples,
so it never needs the scheduler's token lists again.

Per row (host numpy arrays, sized once at start-up):
    token_ids[row, :num_tokens[row]]          prompt then output tokens
    token_ids[row, :num_computed_tokens[row]] whose KV is in the cache (or being written by a step
                                              launched on the device)
    num_pending[row]                          the last num_pending tokens are placeholders: sampled by
                                              launched steps whose ids have not reached the host (at most
                                              2, one per launched step; the next step reads the newest on
                                              the device, step_inputs.py)
    block_table[row, :num_blocks[row]]         KV block ids, in position order
    params[row]                               SamplingParams (host objects: read by the sampler)
    plain_greedy[row]                         argmax alone picks its token (no bans, penalties,
                                              logit_bias, grammar, logprobs): such rows skip the
                                              full sampler
    grammar[row]                              the request's GrammarState (structured output), or
                                              None; it has consumed the row's output tokens
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ..core.outputs import CachedRequestData, NewRequestData
from ..core.sampling_params import SamplingParams
from .logits_processors import SamplingInputs
from .structured_output import GrammarCompiler, GrammarState


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int,
                 grammars: Optional[GrammarCompiler] = None, samples: bool = True):
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.max_blocks_per_req = max_blocks_per_req
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_pending = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.plain_greedy = np.zeros(max_num_reqs, dtype=bool)
        self.params: List[Optional[SamplingParams]] = [None] * max_num_reqs
        self.grammars = grammars  # None: requests with a grammar cannot run here (where this batch samples)
        # False on tensor-parallel ranks other than 0: they never sample (rank 0 sends them its
        # tokens), so rows keep no grammar state
        self.samples = samples
        self.grammar: List[Optional[GrammarState]] = [None] * max_num_reqs
        self.num_grammar_rows = 0  # rows whose grammar is set: the step pays for grammars only when > 0
        self._row_of: Dict[int, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))  # pop() hands out row 0 first

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._row_of

    def row(self, request_id: int) -> int:
        try:
            return self._row_of[request_id]
        except KeyError:
            raise RuntimeError(f"the runner holds no request {request_id}: the step contract sent a delta "
                               f"for a request it never sent whole") from None

    def add(self, new: NewRequestData) -> int:
        if new.request_id in self._row_of:
            raise RuntimeError(f"request {new.request_id} was sent whole twice")
        if not self._free_rows:
            raise RuntimeError(f"the runner holds {self.max_num_reqs} requests, its maximum (max_batch_size)")
        num_tokens = new.num_tokens
        if num_tokens > self.max_model_len or len(new.block_ids) > self.max_blocks_per_req:
            raise RuntimeError(f"request {new.request_id}: {num_tokens} tokens / {len(new.block_ids)} blocks "
                               f"exceed the runner's {self.max_model_len} / {self.max_blocks_per_req}")
        row = self._free_rows.pop()
        self._row_of[new.request_id] = row
        num_prompt = len(new.prompt_token_ids)
        self.token_ids[row, :num_prompt] = new.prompt_token_ids
        self.token_ids[row, num_prompt:num_tokens] = new.output_token_ids
        self.num_tokens[row] = num_tokens
        self.num_prompt_tokens[row] = num_prompt
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_pending[row] = 0
        self.block_table[row, :len(new.block_ids)] = new.block_ids
        self.num_blocks[row] = len(new.block_ids)
        params = new.sampling
        self.params[row] = params
        self.plain_greedy[row] = params.is_greedy and params.logprobs is None and not params.needs_logits_processing
        if params.grammar is not None and self.samples:
            if self.grammars is None:
                raise RuntimeError(f"request {new.request_id} asks for a grammar; this runner has no GrammarCompiler")
            self.grammar[row] = self.grammars.state(params.grammar, params.stop_token_ids, new.output_token_ids)
            self.num_grammar_rows += 1
        return row

    def update(self, cached: CachedRequestData) -> None:
        row = self.row(cached.request_id)
        if self.num_computed_tokens[row] != cached.num_computed_tokens:
            raise RuntimeError(f"request {cached.request_id}: the runner has {self.num_computed_tokens[row]} "
                               f"tokens in the cache, the scheduler {cached.num_computed_tokens}")
        if cached.new_block_ids:
            start = int(self.num_blocks[row])
            end = start + len(cached.new_block_ids)
            if end > self.max_blocks_per_req:
                raise RuntimeError(f"request {cached.request_id}: {end} blocks exceed {self.max_blocks_per_req}")
            self.block_table[row, start:end] = cached.new_block_ids
            self.num_blocks[row] = end

    def remove(self, request_id: int) -> None:
        row = self._row_of.pop(request_id, None)
        if row is None:
            return  # never scheduled on this runner (e.g. aborted while waiting)
        self.params[row] = None
        if self.grammar[row] is not None:
            self.grammar[row] = None
            self.num_grammar_rows -= 1
        self._free_rows.append(row)

    def holds(self, request_id: int, row: int) -> bool:
        return self._row_of.get(request_id) == row

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Append one sampled token to each of ``rows`` (distinct rows)."""
        self.fill_placeholders(rows, self.append_placeholders(rows), token_ids)

    def append_placeholders(self, rows: np.ndarray) -> np.ndarray:
        """Append one token whose id is not known yet to each of ``rows`` (distinct rows); returns
        their positions, for fill_placeholders."""
        positions = self.num_tokens[rows]
        if positions.size and int(positions.max()) >= self.max_model_len:
            raise RuntimeError("a request grew past the runner's max_model_len; the scheduler should have "
                               "ended it at session_len")
        self.num_tokens[rows] = positions + 1
        self.num_pending[rows] += 1
        return positions

    def fill_placeholders(self, rows: np.ndarray, positions: np.ndarray, token_ids: np.ndarray) -> None:
        """The ids of placeholders append_placeholders made, for rows that still hold the same
        requests (the caller drops rows whose request left since): the grammars consume them."""
        self.token_ids[rows, positions] = token_ids
        self.num_pending[rows] -= 1
        if self.num_grammar_rows:
            for row, token in zip(rows.tolist(), token_ids.tolist()):
                if self.grammar[row] is not None:
                    self.grammar[row].advance(token)

    def sampling_inputs(self, row: int) -> SamplingInputs:
        """The sampler's view of a row: its parameters and (views of) its prompt and output tokens."""
        num_prompt, num_tokens = int(self.num_prompt_tokens[row]), int(self.num_tokens[row])
        return SamplingInputs(self.params[row], self.token_ids[row, :num_prompt],
                              self.token_ids[row, num_prompt:num_tokens], self.grammar[row])
