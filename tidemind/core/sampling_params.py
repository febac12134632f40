"""The flat, frozen sampling parameters of one request: what the runner needs to pick its tokens.

Built once when a request is added (from its GenerationConfig, seed, EOS ids and tokenized bad
words) and sent to the runner once, with the request's first step: plain values only, so the step
contract can cross a process boundary. Attribute names follow GenerationConfig's where they mean
the same thing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence, Tuple

from ..config import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool  # argmax, no noise (do_sample off or temperature 0)
    temperature: float
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    min_p: float  # 0.0 = off
    repetition_penalty: float  # 1.0 = off; applies to prompt and output tokens
    presence_penalty: float  # 0.0 = off; output tokens
    frequency_penalty: float  # 0.0 = off; output tokens
    seed: int  # resolved: GenerationConfig.random_seed, or one drawn when the request was added
    logprobs: Optional[int]  # top alternatives to return besides the chosen token; None = none
    # Ids that end the sequence (EOS unless ignore_eos, plus stop_token_ids); the sampler bans them
    # while fewer than min_new_tokens tokens were generated.
    stop_token_ids: FrozenSet[int] = frozenset()
    min_new_tokens: int = 0
    bad_token_ids: Tuple[int, ...] = ()
    # Banned token sequences from bad_words, tokenized: a word's last token is banned when the
    # output ends with all the tokens before it.
    bad_word_token_ids: Tuple[Tuple[int, ...], ...] = ()
    # (token id, bias) pairs added to the logits (OpenAI's logit_bias), sorted by token id.
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    # Structured output: the response_format as canonical JSON (chat/grammar.py reads it), compiled
    # into a matcher runner-side, keyed by request; None: free decoding.
    grammar: Optional[str] = None
    # Log-probabilities of every prompt token after the first (that many top alternatives with each);
    # None: none. Computed while the prompt is prefilled (runner/prompt_logprobs.py).
    prompt_logprobs: Optional[int] = None

    @property
    def is_greedy(self) -> bool:
        return self.greedy

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def needs_logits_processing(self) -> bool:
        """Anything beyond argmax / the sampler's filters: such rows leave the greedy fast path."""
        return self.has_bans or self.has_penalties or bool(self.logit_bias) or self.grammar is not None

    @property
    def has_bans(self) -> bool:
        return bool(self.bad_token_ids or self.bad_word_token_ids or self.min_new_tokens)

    @classmethod
    def from_generation_config(cls, gen_config: GenerationConfig, seed: int,
                               eos_token_ids: FrozenSet[int] = frozenset(),
                               bad_word_token_ids: Sequence[Sequence[int]] = ()) -> "SamplingParams":
        stop_ids = set(gen_config.stop_token_ids or ())
        if not gen_config.ignore_eos:
            stop_ids |= set(eos_token_ids)
        return cls(
            greedy=gen_config.is_greedy, temperature=gen_config.temperature, top_k=gen_config.top_k,
            top_p=gen_config.top_p, min_p=gen_config.min_p, repetition_penalty=gen_config.repetition_penalty,
            presence_penalty=gen_config.presence_penalty, frequency_penalty=gen_config.frequency_penalty,
            seed=seed, logprobs=gen_config.logprobs, stop_token_ids=frozenset(stop_ids),
            min_new_tokens=gen_config.min_new_tokens or 0, bad_token_ids=tuple(gen_config.bad_token_ids or ()),
            bad_word_token_ids=tuple(tuple(word) for word in bad_word_token_ids),
            logit_bias=tuple(sorted((gen_config.logit_bias or {}).items())),
            grammar=json.dumps(gen_config.response_format, sort_keys=True) if gen_config.response_format else None,
            prompt_logprobs=gen_config.prompt_logprobs)
