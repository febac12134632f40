"""The step contract between the scheduler and the model runner: plain data, no torch.

One engine step:  Scheduler.schedule() -> SchedulerOutput -> executor / runner -> RunnerOutput
-> Scheduler.update().

The contract is a delta, so that it can cross a process boundary cheaply (tensor-parallel workers
each keep their own copy of the batch):
- a request the runner does not hold yet arrives once, whole, as NewRequestData (its tokens so far,
  flat sampling parameters, block table, how much of it is already in the KV cache);
- a request the runner already holds arrives as CachedRequestData: the blocks appended to its
  table since the previous step and its num_computed_tokens (a check that both sides agree);
- the tokens to compute are named by count: the runner holds every token of a request it knows,
  since it sampled all of them after the first step;
- finished_request_ids: requests that left the running set since the previous step (finished,
  aborted or preempted); the runner forgets them before it reads the new requests. A preempted
  request comes back later as NewRequestData again, with its generated tokens in output_token_ids.

- swap_out / swap_in: KV block copies the runner makes before the step's forward pass, all
  swap-outs first, as (source, destination) id pairs: (device block, host block) to save a
  preempted request's or an idle session's KV in the host pool, (host block, device block) to bring
  it back for a request admitted in this step (core/swap.py says why that order).

Token region of a scheduled request in one step:
    [0 .............. num_computed_tokens)[num_computed_tokens .. + num_scheduled_tokens)
     already in the KV cache               computed now: a prompt chunk or the last sampled token
A request is sampled when its computed region reaches the end of the tokens the runner holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..messages import TokenLogprobs
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    request_id: int
    prompt_token_ids: Tuple[int, ...]
    # Tokens generated before a preemption (recomputed now as if prompt); () for a fresh request.
    output_token_ids: Tuple[int, ...]
    sampling: SamplingParams
    block_ids: Tuple[int, ...]
    # Tokens whose KV is already in block_ids' blocks (a session's pin, prefix-cache hits, blocks
    # swapped back in by this step's swap_in), else 0.
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class CachedRequestData:
    request_id: int
    new_block_ids: Tuple[int, ...]  # appended to the request's block table, in order
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: List[NewRequestData] = field(default_factory=list)
    cached_requests: List[CachedRequestData] = field(default_factory=list)
    # request_id -> tokens computed for it this step; insertion order is the schedule order
    # (running requests oldest first, then the admitted ones).
    num_scheduled_tokens: Dict[int, int] = field(default_factory=dict)
    finished_request_ids: List[int] = field(default_factory=list)
    swap_out: List[Tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: List[Tuple[int, int]] = field(default_factory=list)  # (host block, device block)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner to do: no tokens to compute and no blocks to copy."""
        return not self.num_scheduled_tokens and not self.swap_out and not self.swap_in


@dataclass
class RunnerOutput:
    # request_id -> the token sampled for it (only requests whose computed region reached the end)
    sampled_token_ids: Dict[int, int]
    # request_id -> log-probabilities of that token and the top alternatives (only where asked)
    logprobs: Dict[int, TokenLogprobs] = field(default_factory=dict)
    # request_id -> one entry per prompt token (None where not computed), with the request's first
    # sampled token, for requests whose SamplingParams.prompt_logprobs is set
    prompt_logprobs: Dict[int, List[Optional[TokenLogprobs]]] = field(default_factory=dict)
