"""One generation request as the scheduler sees it: its tokens, how far its KV cache has got, its
blocks and its state. Pure Python, no torch: only the scheduler mutates a Request.

Token regions of a request (``all_token_ids`` = prompt + output, always kept in step):

    [0 ..................... num_computed_tokens)[num_computed_tokens ......... num_tokens + num_inflight)
     KV in the cache (in block_ids' blocks), or   still to compute: prompt chunks, the last
     being written by a step already scheduled    sampled token, or, after a preemption, the
                                                  whole sequence again (recomputed as prompt)

num_computed_tokens advances when a step is scheduled, not when its output comes back, so the next
step can be scheduled while the device still runs this one (the engine's overlapped loop,
engine/engine.py). num_inflight counts the tokens scheduled steps will sample whose values have not
come back yet: the scheduler treats them as known tokens whose ids only the runner holds.

Invariants (checked by Scheduler.check_invariants in tests):
- 0 <= num_computed_tokens <= num_tokens + num_inflight, and a RUNNING request has
  num_computed_tokens < num_tokens + num_inflight (there is always at least the last sampled token
  left to compute). num_inflight is 0 once every scheduled step's output has come back.
- block_ids cover at least num_computed_tokens tokens; a WAITING or FINISHED request holds none.
- key_ids (prefix caching) name the leading full blocks of computed KV, at most
  num_computed_tokens // block_size of them (block_manager.py).
- host_block_ids (KV swapped out to host memory at a preemption, swap.py) cover
  num_swapped_tokens tokens; only a WAITING request holds any, and then num_computed_tokens == 0.
"""
from __future__ import annotations

import enum
import time
from typing import FrozenSet, List, Optional, Sequence

from ..config import GenerationConfig
from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued: never admitted, or preempted (holds no blocks)
    RUNNING = "running"  # admitted: holds blocks, gets tokens scheduled every step the budget allows
    FINISHED = "finished"  # done for good: finish_reason says why, blocks already returned


class Request:
    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "all_token_ids", "gen_config", "seed",
        "eos_token_ids", "max_total_tokens", "max_new_tokens", "min_new_tokens", "arrival",
        "num_computed_tokens", "block_ids", "status", "finish_reason", "num_preemptions", "sampling",
        "session_id", "num_cached_tokens", "runner_blocks", "key_ids", "host_block_ids",
        "num_swapped_tokens", "cache_salt", "num_inflight",
    )

    def __init__(
        self,
        request_id: int,
        prompt_token_ids: Sequence[int],
        gen_config: GenerationConfig,
        seed: int,
        eos_token_ids: FrozenSet[int],
        max_total_tokens: int,
        bad_word_token_ids: Sequence[Sequence[int]] = (),
        arrival: Optional[float] = None,
        session_id: Optional[int] = None,
        cache_salt: Optional[str] = None,
    ):
        """``max_total_tokens`` is the session length: prompt + output never exceed it.
        ``arrival`` is when the request came in (time.monotonic() seconds unless given); it is
        informational (queueing metrics): the scheduler serves requests in add_request order.
        ``session_id``: the conversation this request is a turn of; its prompt starts with the
        conversation's tokens, whose KV it takes over when admitted (see sessions.py).
        ``cache_salt``: requests share prefix-cache blocks only with requests of the same salt
        (None for all by default); the place for a LoRA adapter id or a tenant that must not share."""
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError(f"request {request_id}: the prompt is empty; give at least one token")
        if len(prompt) >= max_total_tokens:
            raise ValueError(
                f"request {request_id}: the prompt has {len(prompt)} tokens but the session length is "
                f"{max_total_tokens}, which leaves no room for an answer; shorten the prompt or raise "
                f"session_len")
        self.request_id = request_id
        self.prompt_token_ids: List[int] = prompt
        self.output_token_ids: List[int] = []
        # prompt + output, appended in step with output_token_ids (a second list so that slicing
        # chunks out of it stays O(chunk), with no concatenation per step)
        self.all_token_ids: List[int] = list(prompt)
        self.gen_config = gen_config
        self.seed = seed
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_total_tokens = max_total_tokens
        self.max_new_tokens = gen_config.max_new_tokens
        self.min_new_tokens = gen_config.min_new_tokens or 0
        self.arrival = time.monotonic() if arrival is None else arrival
        self.num_computed_tokens = 0
        self.num_inflight = 0  # tokens scheduled steps will sample, not yet received (see above)
        self.block_ids: List[int] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.num_preemptions = 0
        self.session_id = session_id
        # Of a session's turn: tokens of the conversation so far whose KV was reused at its first
        # admission (the session's pin or host copy, or the prefix cache), not computed.
        self.num_cached_tokens = 0
        self.key_ids: List[int] = []  # prefix-cache key ids of the leading full blocks
        self.host_block_ids: List[int] = []  # KV swapped out to host memory while WAITING
        self.num_swapped_tokens = 0  # tokens of KV in host_block_ids
        self.cache_salt = cache_salt
        # Block ids of block_ids the runner holds (sent in earlier steps); None while the runner
        # does not hold the request (never scheduled, or preempted / finished since).
        self.runner_blocks: Optional[int] = None
        # Built once; sent to the runner with the request's first step.
        self.sampling = SamplingParams.from_generation_config(gen_config, seed, self.eos_token_ids,
                                                              bad_word_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.all_token_ids) + self.num_inflight - self.num_computed_tokens

    @property
    def ends_with_inflight_tokens(self) -> bool:
        """Whether the tokens already scheduled to be sampled bring it to its length limit: it ends
        then, whatever they are, so it needs no further step."""
        return bool(self.num_inflight) and (
            len(self.output_token_ids) + self.num_inflight >= self.max_new_tokens
            or len(self.all_token_ids) + self.num_inflight >= self.max_total_tokens)

    @property
    def max_kv_tokens(self) -> int:
        """Most tokens this request can ever need in the KV cache: the longest it can grow to, less
        the final token, which ends it before its KV is computed."""
        return min(self.max_total_tokens, len(self.prompt_token_ids) + self.max_new_tokens) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def stop_reason(self, token_id: int) -> Optional[str]:
        """Why the request ends now that ``token_id`` was appended as its newest output, or None.

        A stop id counts only once min_new_tokens tokens came BEFORE it (the sampler masks stop ids
        while len(output_token_ids) < min_new_tokens); this check is the backstop for that rule.
        """
        if token_id in self.sampling.stop_token_ids and len(self.output_token_ids) > self.min_new_tokens:
            return "stop"
        if len(self.output_token_ids) >= self.max_new_tokens or len(self.all_token_ids) >= self.max_total_tokens:
            return "length"
        return None

    def __repr__(self) -> str:
        return (f"Request(id={self.request_id}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, inflight={self.num_inflight}, outputs={self.num_output_tokens}, "
                f"blocks={len(self.block_ids)}, finish_reason={self.finish_reason})")
