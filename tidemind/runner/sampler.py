"""The sampler: from one logits row per sequence to one token per sequence (plus logprobs).

Per row, only where its SamplingParams ask: bans and min_new_tokens, penalties
(logits_processors.py), then argmax for greedy rows, or temperature -> top_k -> top_p -> min_p ->
draw for sampled rows. Rows that need the same work are batched; which rows need what is decided
on the host from the inputs, and the device->host copy of the results is the one synchronization
(a second one only for the rare rows whose kept set reaches past their first candidates).

Filtering is defined by thresholds on the temperature-scaled logits x of a row, so that the kept
set never depends on how a sort orders equal values (bfloat16 logits tie often):
    top_k:  keep x >= (k-th largest x)                        (ties at the boundary kept, like HF)
    top_p:  keep x >= x of the token at which the cumulative probability, in decreasing order
            over the top_k-kept tokens, first reaches top_p   (the top token is always kept)
    min_p:  keep x >= max(x) + log(min_p)
The kept set is the intersection: x >= max of the three thresholds.

The draw is a Gumbel-max race with counter-based noise: the noise of vocab entry i is a hash of
(seed, step = len(output_token_ids), i), so a row's token depends only on its own logits, seed and
step, never on the rest of the batch, the device or the order candidates come in. top_k == 1 is
answered by argmax, so that it settles ties exactly as greedy decoding does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.sampling_params import SamplingParams
from ..messages import TokenLogprobs
from .device import to_device
from .logits_processors import SamplingInputs, keep_threshold, process_logits

# Rows with top_k take candidates from one topk(max top_k + slack) call; the slack lets the
# exactness check see ties at the k-th value without a full sort.
TOP_K_SLACK = 16
# Rows with top_p but no top_k look for their nucleus among this many best tokens first; rows whose
# nucleus is larger are redone, after the device->host copy, with FALLBACK_CANDIDATES, then all.
NUCLEUS_CANDIDATES = 256
FALLBACK_CANDIDATES = (4096,)

_MASK32 = 0xFFFFFFFF
# A 32-bit integer hash (xorshift-multiply, constants from Wellons' hash-prospector). Both
# multipliers are below 2**31, so a 32-bit value times one stays below 2**63: the int64 tensor
# version never overflows and gives the same bits as the host version on every device.
_MUL_A, _MUL_B = 0x21F0AAAD, 0x735A2D97


def hash32(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL_A) & _MASK32
    x ^= x >> 15
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 15)


def hash32_tensor(x: torch.Tensor) -> torch.Tensor:
    """``hash32`` elementwise on an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 15)


def noise_keys(seed: int, step: int) -> Tuple[int, int]:
    """Two 32-bit keys for the noise of one (seed, step); any Python int is a valid seed.

    The host statement of what noise_keys_tensor computes on the device.
    """
    seed &= (1 << 64) - 1
    h = hash32((seed & _MASK32) ^ 0x9E3779B9)
    h = hash32(h ^ (seed >> 32))
    key_a = hash32(h ^ (step & _MASK32))
    return key_a, hash32(key_a ^ 0x85EBCA6B)


def seed_words(seed: int, step: int) -> Tuple[int, int, int]:
    """(low 32 bits of the seed, its high 32 bits, step): what noise_keys_tensor reads."""
    seed &= (1 << 64) - 1
    return seed & _MASK32, seed >> 32, step & _MASK32


def noise_keys_tensor(words: torch.Tensor) -> torch.Tensor:
    """noise_keys for many rows at once: int64 [R, 3] seed_words -> int64 [R, 2] keys."""
    low, high, step = words.unbind(1)
    h = hash32_tensor(hash32_tensor(low ^ 0x9E3779B9) ^ high)
    key_a = hash32_tensor(h ^ step)
    return torch.stack([key_a, hash32_tensor(key_a ^ 0x85EBCA6B)], dim=1)


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise, float32 with the shape of ``token_ids``.

    keys: int64 [R, 2] from noise_keys; token_ids: int64 [R, C] (or [1, C], broadcast over rows).
    """
    key_a, key_b = keys[:, :1], keys[:, 1:]  # [R, 1] each
    bits = hash32_tensor(hash32_tensor(token_ids ^ key_a) ^ key_b)  # [R, C] in [0, 2**32)
    # 23 bits -> u = (j + 0.5) / 2**23, exact in float32 and strictly inside (0, 1).
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(uniform))


@dataclass
class SamplerOutput:
    token_ids: List[int]  # one per logits row
    # {token_id: logprob} (chosen token + top alternatives) where params.logprobs is set
    logprobs: List[Optional[TokenLogprobs]]


@dataclass
class _SampledRows:
    """A group of sampled rows: batch row indices, their configs and seed words (same order)."""

    rows: List[int]
    cfgs: List[SamplingParams]
    words: List[Tuple[int, int, int]]  # seed_words(seed, step) per row
    vocab: int

    @classmethod
    def build(cls, rows: List[int], inputs: Sequence[SamplingInputs], vocab: int) -> "_SampledRows":
        return cls(rows, [inputs[r].params for r in rows],
                   [seed_words(inputs[r].params.seed, len(inputs[r].output_token_ids)) for r in rows], vocab)

    def subset(self, positions: List[int]) -> "_SampledRows":
        return _SampledRows([self.rows[p] for p in positions], [self.cfgs[p] for p in positions],
                            [self.words[p] for p in positions], self.vocab)

    def __add__(self, other: "_SampledRows") -> "_SampledRows":
        return _SampledRows(self.rows + other.rows, self.cfgs + other.cfgs, self.words + other.words, self.vocab)

    @property
    def top_k(self) -> List[int]:  # 0 = off; top_k >= vocab is off too
        return [c.top_k if c.top_k < self.vocab else 0 for c in self.cfgs]

    def upload(self, device: torch.device) -> "_GroupTensors":
        """The group's parameters on the device, in one copy (float64 holds every field exactly)."""
        log_min_p = [math.log(c.min_p) if c.min_p > 0 else float("-inf") for c in self.cfgs]
        table = to_device([(row, c.temperature, k, c.top_p, m, *w) for row, c, k, m, w
                           in zip(self.rows, self.cfgs, self.top_k, log_min_p, self.words)],
                          torch.float64, device)  # [R, 8]
        return _GroupTensors(
            rows=table[:, 0].long(), temperature=table[:, 1:2].float(), top_k=table[:, 2].long(),
            top_p=table[:, 3].float() if any(c.top_p < 1.0 for c in self.cfgs) else None,
            log_min_p=table[:, 4].float() if any(c.min_p > 0.0 for c in self.cfgs) else None,
            keys=noise_keys_tensor(table[:, 5:8].long()))


@dataclass
class _GroupTensors:
    rows: torch.Tensor  # int64 [R], batch row indices
    temperature: torch.Tensor  # float32 [R, 1]
    top_k: torch.Tensor  # int64 [R], 0 = off
    top_p: Optional[torch.Tensor]  # float32 [R]; None when no row sets top_p
    log_min_p: Optional[torch.Tensor]  # float32 [R], -inf where off; None when no row sets min_p
    keys: torch.Tensor  # int64 [R, 2], noise keys


def _select_rows(tensor: torch.Tensor, rows: List[int], rows_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """tensor[rows]; rows_t: the same indices already on the device, when at hand."""
    if len(rows) == tensor.shape[0] and rows == list(range(len(rows))):
        return tensor
    if rows_t is None:
        rows_t = to_device(rows, torch.long, tensor.device)
    return tensor.index_select(0, rows_t)


def _sample_candidates(logits: torch.Tensor, group: _SampledRows, num_cand: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw for rows with top_k and/or top_p among their ``num_cand`` best tokens.

    Returns (token ids int64 [R], exact bool [R], the group's rows on the device int64 [R]).
    exact is False where the kept set might reach past the candidates (every token outside them
    has a value <= the last candidate's): such rows must be redone with more candidates. The noise
    of a token depends on its id only, so a redone row gets the token that enough candidates would
    have given in the first place.
    """
    params = group.upload(logits.device)
    sub = _select_rows(logits, group.rows, params.rows)  # [R, vocab]
    vocab = sub.shape[1]
    if num_cand >= vocab:
        num_cand = vocab
        values, token_ids = sub.sort(dim=-1, descending=True)  # [R, vocab]
    else:
        values, token_ids = sub.topk(num_cand, dim=-1)  # [R, C], decreasing
    values = values / params.temperature  # the same as topk of the scaled row: temperature > 0
    full_lse = None
    if num_cand < vocab and params.top_p is not None and 0 in group.top_k:
        full_lse = torch.logsumexp(sub / params.temperature, dim=-1)
    threshold = keep_threshold(values, params.top_k, params.top_p, params.log_min_p, full_lse)
    threshold = threshold.unsqueeze(1)  # [R, 1]
    if num_cand < vocab:
        exact = threshold[:, 0] > values[:, -1]
    else:
        exact = torch.ones_like(params.rows, dtype=torch.bool)
    scores = torch.where(values >= threshold, values + gumbel_noise(params.keys, token_ids), float("-inf"))
    return token_ids.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1), exact, params.rows


def block_size(vocab: int) -> int:
    """The power of two nearest above sqrt(vocab): 256 for 49152 ids, 512 for 262144."""
    return 1 << ((max(vocab, 2) - 1).bit_length() + 1) // 2


def _sample_full(logits: torch.Tensor, group: _SampledRows) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw for rows with neither top_k nor top_p, in two races that need noise for few entries.

    First a block of block_size(vocab) consecutive ids, raced on its log-mass; then a token inside
    that block, raced on its logit: P(block) * P(token | block) = P(token). Noise: ~2 * sqrt(vocab)
    entries per row instead of vocab. Returns (token ids int64 [R], the group's rows int64 [R]).
    """
    params = group.upload(logits.device)
    sub = _select_rows(logits, group.rows, params.rows)  # [R, vocab]
    num_rows, vocab = sub.shape
    device = sub.device
    values = sub / params.temperature  # [R, vocab]
    if params.log_min_p is not None:
        threshold = values.amax(dim=-1) + params.log_min_p  # [R]
        values = values.masked_fill(values < threshold.unsqueeze(1), float("-inf"))
    block_len = block_size(vocab)
    num_blocks = -(-vocab // block_len)
    blocks = F.pad(values, (0, num_blocks * block_len - vocab), value=float("-inf"))
    blocks = blocks.view(num_rows, num_blocks, block_len)  # [R, num_blocks, block_len]
    keys = params.keys  # [R, 2]
    # Block noise uses ids from 2**31 up, apart from token ids.
    block_ids = torch.arange(num_blocks, device=device).unsqueeze(0) + (1 << 31)  # [1, num_blocks]
    block = (torch.logsumexp(blocks, dim=-1) + gumbel_noise(keys, block_ids)).argmax(dim=-1)  # [R]
    inner = blocks.gather(1, block.view(-1, 1, 1).expand(-1, 1, block_len)).squeeze(1)  # [R, block_len]
    token_ids = block.unsqueeze(1) * block_len + torch.arange(block_len, device=device)  # [R, block_len]
    position = (inner + gumbel_noise(keys, token_ids)).argmax(dim=-1, keepdim=True)
    return token_ids.gather(1, position).squeeze(1), params.rows


def _to_host(*tensors: torch.Tensor) -> List[list]:
    """One device->host copy (one synchronization) for several tensors, each back as (nested) lists.

    Everything travels as float64, exact for token ids (< 2**53), flags and float32 values.
    """
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        part = flat[start:start + t.numel()]
        start += t.numel()
        if t.dim() == 2:  # [rows, width] -> list of rows (width may be 0)
            width = t.shape[1]
            part = [part[i * width:(i + 1) * width] for i in range(t.shape[0])]
        out.append(part)
    return out


@dataclass
class _RawLogprobs:
    """log_softmax of the raw (unprocessed) logits of the rows that asked for logprobs."""

    rows: List[int]
    rows_t: torch.Tensor  # int64 [L], the same on the device
    num_top: List[int]  # params.logprobs per row
    logprobs: torch.Tensor  # [L, vocab]
    top_values: torch.Tensor  # [L, max(num_top)], decreasing
    top_ids: torch.Tensor  # [L, max(num_top)]

    @classmethod
    def build(cls, logits: torch.Tensor, inputs: Sequence[SamplingInputs]) -> Optional["_RawLogprobs"]:
        rows = [i for i, inp in enumerate(inputs) if inp.params.logprobs is not None]
        if not rows:
            return None
        num_top = [inputs[r].params.logprobs for r in rows]
        rows_t = to_device(rows, torch.long, logits.device)
        # A new tensor: the later in-place processing of `logits` does not reach it.
        logprobs = torch.log_softmax(_select_rows(logits, rows, rows_t), dim=-1)
        top_values, top_ids = logprobs.topk(min(max(num_top), logprobs.shape[1]), dim=-1)
        return cls(rows, rows_t, num_top, logprobs, top_values, top_ids)

    def chosen(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logprob of each row's chosen token: [L]. token_ids: [num_rows], the whole batch."""
        chosen_ids = token_ids.index_select(0, self.rows_t)
        return self.logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)

    def as_dicts(self, token_ids: List[int], chosen: List[float], top_values: List[list],
                 top_ids: List[list]) -> List[Optional[TokenLogprobs]]:
        out: List[Optional[TokenLogprobs]] = [None] * len(token_ids)
        for i, row in enumerate(self.rows):
            entry = {token_ids[row]: chosen[i]}
            for token, value in zip(top_ids[i][:self.num_top[i]], top_values[i][:self.num_top[i]]):
                entry.setdefault(int(token), value)
            out[row] = entry
        return out


def _split_rows(inputs: Sequence[SamplingInputs], vocab: int
                ) -> Tuple[List[int], List[int], List[int], List[int]]:
    """Rows by the work they need: (greedy, top_k, top_p without top_k, neither)."""
    greedy, top_k, nucleus, full = [], [], [], []
    for row, inp in enumerate(inputs):
        cfg = inp.params
        k = cfg.top_k if cfg.top_k < vocab else 0
        # top_k == 1 keeps only the best token: argmax, which settles ties the way greedy rows do.
        if cfg.is_greedy or k == 1:
            greedy.append(row)
        elif k > 0:
            top_k.append(row)
        elif cfg.top_p < 1.0:
            nucleus.append(row)
        else:
            full.append(row)
    return greedy, top_k, nucleus, full


def _inexact(checks: List[Tuple[_SampledRows, List[float]]]) -> Optional[_SampledRows]:
    """The rows whose exact flag (fetched to the host) is off, as one group; None if there are none."""
    redo = None
    for group, flags in checks:
        positions = [i for i, ok in enumerate(flags) if not ok]
        if positions:
            redo = group.subset(positions) if redo is None else redo + group.subset(positions)
    return redo


class Sampler:
    """``Sampler()(logits, inputs) -> SamplerOutput``.

    logits: float32 [num_rows, vocab], one row per sequence to sample. It is CONSUMED: bans and
    penalties are written into it. inputs: one SamplingInputs per row, same order.
    """

    def __call__(self, logits: torch.Tensor, inputs: Sequence[SamplingInputs]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(inputs):
            raise ValueError(f"the sampler needs one logits row per input: logits {tuple(logits.shape)}, "
                             f"{len(inputs)} inputs")
        logits = logits.float()  # no copy when already float32
        num_rows, vocab = logits.shape
        raw = _RawLogprobs.build(logits, inputs)  # before any processing, like vLLM's default
        process_logits(logits, inputs)
        token_ids, groups, flags = self._choose(logits, inputs)  # [num_rows], groups, [R] per group

        logprob_parts = (raw.chosen(token_ids), raw.top_values, raw.top_ids) if raw is not None else ()
        fetched = _to_host(token_ids, *flags, *logprob_parts)
        host_ids = [int(t) for t in fetched[0]]
        redo = _inexact(list(zip(groups, fetched[1:1 + len(groups)])))
        if redo is not None:
            self._redo(logits, redo, token_ids, host_ids)
            if raw is not None:
                fetched[1 + len(groups)] = _to_host(raw.chosen(token_ids))[0]
        if raw is None:
            return SamplerOutput(host_ids, [None] * num_rows)
        chosen, top_values, top_ids = fetched[1 + len(groups):]
        return SamplerOutput(host_ids, raw.as_dicts(host_ids, chosen, top_values, top_ids))

    def _choose(self, logits: torch.Tensor, inputs: Sequence[SamplingInputs]
                ) -> Tuple[torch.Tensor, List[_SampledRows], List[torch.Tensor]]:
        """Token per row (int64 [num_rows]), plus the candidate groups and their exact flags."""
        num_rows, vocab = logits.shape
        greedy, top_k, nucleus, full = _split_rows(inputs, vocab)
        if len(greedy) == num_rows:
            return logits.argmax(dim=-1), [], []
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        if greedy:
            greedy_t = to_device(greedy, torch.long, logits.device)
            token_ids.index_copy_(0, greedy_t, logits.index_select(0, greedy_t).argmax(dim=-1))
        groups, flags = [], []
        for rows, num_cand in ((top_k, None), (nucleus, NUCLEUS_CANDIDATES)):
            if rows:
                group = _SampledRows.build(rows, inputs, vocab)
                num_cand = num_cand or max(group.top_k) + TOP_K_SLACK
                tokens, exact, rows_t = _sample_candidates(logits, group, num_cand)
                token_ids.index_copy_(0, rows_t, tokens)
                groups.append(group)
                flags.append(exact)
        if full:
            tokens, rows_t = _sample_full(logits, _SampledRows.build(full, inputs, vocab))
            token_ids.index_copy_(0, rows_t, tokens)
        return token_ids, groups, flags

    @staticmethod
    def _redo(logits: torch.Tensor, redo: _SampledRows, token_ids: torch.Tensor, host_ids: List[int]) -> None:
        """Rare: a kept set reached past the candidates. Retry with more, up to the whole row."""
        vocab = logits.shape[1]
        for num_cand in [c for c in FALLBACK_CANDIDATES if c < vocab] + [vocab]:
            tokens, exact, rows_t = _sample_candidates(logits, redo, num_cand)
            token_ids.index_copy_(0, rows_t, tokens)
            host_tokens, host_exact = _to_host(tokens, exact)
            for row, token in zip(redo.rows, host_tokens):
                host_ids[row] = int(token)
            redo = _inexact([(redo, host_exact)])
            if redo is None:
                return

