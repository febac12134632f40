"""Logit processing: bans, min_new_tokens, penalties, logit_bias and grammar masks (in place),
top_k/top_p/min_p thresholds.

Each function takes the batch's logits ``[num_rows, vocab]`` and the rows' ``SamplingInputs`` (same
order), does work only for the rows whose ``SamplingParams`` ask for it, and writes into
``logits`` in place (the sampler owns that tensor). Which rows need what is decided on the host
from the inputs, so nothing here waits for the device; each step sends its host data in as few
copies as it can (a copy costs tens of microseconds on a GPU host, more than most kernels here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np
import torch

from ..core.sampling_params import SamplingParams
from .device import from_host, to_device
from .structured_output import apply_grammar_masks

if TYPE_CHECKING:
    from .structured_output import GrammarState


@dataclass(frozen=True)
class SamplingInputs:
    """One row to sample: its request's parameters and tokens so far (numpy views of the runner's
    InputBatch row, or plain lists); the step of its noise is len(output_token_ids)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    grammar: Optional["GrammarState"] = None  # the row's matcher when params.grammar is set


def _banned_ids(inp: SamplingInputs) -> List[int]:
    cfg = inp.params
    out = inp.output_token_ids
    banned = list(cfg.bad_token_ids)
    for word in cfg.bad_word_token_ids:
        # word = [prefix..., last]: `last` is banned when the output ends with `prefix`.
        num_prefix = len(word) - 1
        if num_prefix < 0 or num_prefix > len(out):
            continue
        if num_prefix == 0 or list(out[len(out) - num_prefix:]) == list(word[:num_prefix]):
            banned.append(word[-1])
    if cfg.min_new_tokens and len(out) < cfg.min_new_tokens:
        banned.extend(cfg.stop_token_ids)
    return banned


def apply_bans(logits: torch.Tensor, inputs: Sequence[SamplingInputs]) -> torch.Tensor:
    """Set to -inf: bad_token_ids, the next token of bad words, stop ids before min_new_tokens."""
    vocab = logits.shape[1]
    rows: List[int] = []
    cols: List[int] = []
    for row, inp in enumerate(inputs):
        if not inp.params.has_bans:
            continue
        # Ids outside the model's vocabulary can never be produced: nothing to ban.
        banned = [t for t in _banned_ids(inp) if t < vocab]
        rows.extend([row] * len(banned))
        cols.extend(banned)
    if rows:
        rows_cols = to_device([rows, cols], torch.long, logits.device)  # [2, n]
        logits[rows_cols[0], rows_cols[1]] = float("-inf")
    return logits


def _tokens(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def token_pairs(rows: Sequence[int], arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Every token of ``arrays[i]`` with ``rows[i]``: int64 [2, n], (rows, tokens), in one copy."""
    pairs = np.empty((2, sum(len(a) for a in arrays)), dtype=np.int64)
    if arrays:
        pairs[0] = np.repeat(np.asarray(rows, dtype=np.int64), [len(a) for a in arrays])
        np.concatenate(arrays, out=pairs[1])
    return from_host(torch.from_numpy(pairs), device)


def _repetition(logits: torch.Tensor, inputs: Sequence[SamplingInputs], rows: List[int]) -> None:
    # Each (row, token) of prompt + output; a token seen several times appears several times, and
    # every copy writes the same value computed from the unpenalized logit: idempotent.
    arrays = [_tokens(a) for r in rows for a in (inputs[r].prompt_token_ids, inputs[r].output_token_ids)]
    pair_rows, pair_tokens = token_pairs([r for r in rows for _ in (0, 1)], arrays, logits.device)
    penalty = to_device([inp.params.repetition_penalty for inp in inputs], torch.float32,
                        logits.device)[pair_rows]  # [n]
    values = logits[pair_rows, pair_tokens]  # [n]
    logits[pair_rows, pair_tokens] = torch.where(values > 0, values / penalty, values * penalty)


def _presence_frequency(logits: torch.Tensor, inputs: Sequence[SamplingInputs], rows: List[int]) -> None:
    device = logits.device
    pair_rows, pair_tokens = token_pairs(rows, [_tokens(inputs[r].output_token_ids) for r in rows], device)
    # Occurrences of each pair's (row, token) in the output, by binary search in the sorted keys.
    keys = pair_rows * logits.shape[1] + pair_tokens  # [n]
    sorted_keys = keys.sort().values
    counts = (torch.searchsorted(sorted_keys, keys, right=True) - torch.searchsorted(sorted_keys, keys))
    presence, frequency = to_device([[inp.params.presence_penalty for inp in inputs],
                                     [inp.params.frequency_penalty for inp in inputs]],
                                    torch.float32, device)  # [num_rows] each
    values = logits[pair_rows, pair_tokens]  # [n]; duplicates write the same value, as above
    logits[pair_rows, pair_tokens] = values - (presence[pair_rows] + frequency[pair_rows] * counts)


def apply_penalties(logits: torch.Tensor, inputs: Sequence[SamplingInputs]) -> torch.Tensor:
    """Repetition penalty (HF: prompt + output tokens), then presence/frequency (OpenAI: output).

    Work is proportional to the number of tokens of the penalized sequences, not to the vocabulary.
    """
    repetition_rows = [i for i, inp in enumerate(inputs) if inp.params.repetition_penalty != 1.0]
    if repetition_rows:
        _repetition(logits, inputs, repetition_rows)
    additive_rows = [i for i, inp in enumerate(inputs)
                     if inp.params.presence_penalty != 0.0 or inp.params.frequency_penalty != 0.0]
    if additive_rows:
        _presence_frequency(logits, inputs, additive_rows)
    return logits


def apply_logit_bias(logits: torch.Tensor, inputs: Sequence[SamplingInputs]) -> torch.Tensor:
    """Add each row's logit_bias (OpenAI's: -100 effectively bans a token) to its logits, in place."""
    vocab = logits.shape[1]
    rows, cols, amounts = [], [], []
    for row, inp in enumerate(inputs):
        for token, amount in inp.params.logit_bias:
            if token < vocab:
                rows.append(row)
                cols.append(token)
                amounts.append(amount)
    if rows:
        rows_cols = to_device([rows, cols], torch.long, logits.device)  # [2, n]
        logits.index_put_((rows_cols[0], rows_cols[1]), to_device(amounts, torch.float32, logits.device),
                          accumulate=True)
    return logits


def process_logits(logits: torch.Tensor, inputs: Sequence[SamplingInputs]) -> torch.Tensor:
    """Steps 1-3 of the sampler (bans, min_new_tokens, penalties, logit_bias), then the grammar masks of
    structured output (last, so that nothing lifts a token it forbids); in place; returns ``logits``."""
    apply_bans(logits, inputs)
    apply_penalties(logits, inputs)
    apply_logit_bias(logits, inputs)
    apply_grammar_masks(logits, inputs)
    return logits


def keep_threshold(values: torch.Tensor, top_k: torch.Tensor, top_p: Optional[torch.Tensor],
                   log_min_p: Optional[torch.Tensor], full_lse: Optional[torch.Tensor]) -> torch.Tensor:
    """Per row, the smallest value the top_k -> top_p -> min_p filters keep: float32 [R].

    values: [R, C] temperature-scaled logits in decreasing order: a row's C best tokens (C == vocab:
    the whole row). top_k: int64 [R], 0 = off. top_p: float32 [R], or None when no row sets it.
    log_min_p: float32 [R] (-inf where off), or None. full_lse: [R] logsumexp of the whole scaled
    row; needed where top_k is off and C < vocab.
    The kept set is {x >= threshold}: equal values are all kept or all dropped, whatever order a
    sort put them in (the definitions are in sampler.py's docstring).
    """
    num_cand = values.shape[1]
    # top_k off counts as k = C: the threshold is then the last candidate, which (unless C == vocab)
    # fails the sampler's exactness check, so a nucleus not found among the candidates gets redone.
    k_index = torch.where(top_k > 0, top_k.clamp(max=num_cand), num_cand) - 1  # [R]
    threshold = values.gather(1, k_index.unsqueeze(1)).squeeze(1)  # [R]
    if top_p is not None:
        kept = values.masked_fill(values < threshold.unsqueeze(1), float("-inf"))  # [R, C]
        lse = torch.logsumexp(kept, dim=-1)  # [R]: normalizer over the top_k-kept tokens
        if full_lse is not None:
            lse = torch.where(top_k == 0, full_lse, lse)
        cumulative = torch.exp(kept - lse.unsqueeze(1)).cumsum(dim=-1)  # [R, C], non-decreasing
        # The first position whose cumulative probability reaches top_p, and its value.
        crossing = (cumulative < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_(max=num_cand - 1)
        top_p_threshold = values.gather(1, crossing).squeeze(1)  # [R]
        reached = (cumulative[:, -1] >= top_p) & (top_p < 1.0)
        threshold = torch.where(reached, torch.maximum(threshold, top_p_threshold), threshold)
    if log_min_p is not None:
        threshold = torch.maximum(threshold, values[:, 0] + log_min_p)
    return threshold
