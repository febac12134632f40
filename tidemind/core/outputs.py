"""Plain-data contracts between the scheduler and the model runner (no torch here).

One engine step:  Scheduler.schedule() -> SchedulerOutput -> ModelRunner.execute() -> RunnerOutput
-> Scheduler.update().  Lists inside these objects may be shared references to a request's own
lists (prompt / output token ids): the runner reads them and never mutates them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Sequence

from ..config import GenerationConfig
from ..messages import TokenLogprobs


@dataclass(frozen=True)
class SamplingInputs:
    """What the sampler needs to know about one request; built once when the request is added.

    ``prompt_token_ids`` and ``output_token_ids`` are the request's live lists (read-only here):
    repetition penalties look at both, presence/frequency penalties at the output only.
    """

    gen_config: GenerationConfig
    seed: int  # resolved seed: gen_config.random_seed, or one drawn when the request was added
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Ids that end the sequence (EOS + stop_token_ids); masked until min_new_tokens are generated.
    stop_token_ids: FrozenSet[int]
    # Banned token sequences from bad_words, tokenized: a last token is banned when the output ends
    # with all the tokens before it.
    bad_word_token_ids: Sequence[Sequence[int]] = ()


@dataclass
class ScheduledSequence:
    """One request's share of an engine step.

    Token region of the request after this step:
        [0 ............ start_pos)[start_pos ....... start_pos + len(token_ids))
         already in the KV cache   computed now (prompt chunk, or the last sampled token)
    """

    request_id: int
    token_ids: List[int]  # tokens whose KV is computed this step
    start_pos: int  # number of the request's tokens already in the KV cache
    block_table: List[int]  # KV block ids, covering start_pos + len(token_ids) tokens
    sample: bool  # True when this chunk reaches the end of the known tokens: sample the next one
    sampling: SamplingInputs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    sequences: List[ScheduledSequence]
    # Requests that left the engine since the previous step (finished, aborted, preempted):
    # the runner may drop any per-request state it keeps.
    finished_request_ids: List[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass
class RunnerOutput:
    # request_id -> the token sampled for it (only sequences with sample=True appear)
    sampled_token_ids: Dict[int, int]
    # request_id -> log-probabilities of that token and the top alternatives (only where asked)
    logprobs: Dict[int, TokenLogprobs] = field(default_factory=dict)
