"""Packing of int4 / int8 values into int32 words, in the two layouts checkpoints use.

    AWQ (AutoAWQ "gemm")   along the OUTPUT dim, 8 nibbles per word, interleaved order:
                           nibble i (bits 4i .. 4i+3) of word j holds column 8j + AWQ_ORDER[i]
    GPTQ                   along the INPUT dim (qweight) or the output dim (qzeros), in order:
                           value i (bits b*i .. b*i+b-1) of word j holds index (32/b)*j + i

Values are unsigned (0 .. 2^bits - 1); words are int32 (two's complement, as the checkpoints
store them). Shapes: pack [rows, cols] along dim 1 -> [rows, cols / per_word].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _inverse(order: Sequence[int]) -> list:
    inverse = [0] * len(order)
    for nibble, column in enumerate(order):
        inverse[column] = nibble
    return inverse


def pack(values: torch.Tensor, bits: int, dim: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """values [.., n, ..] (0 <= v < 2^bits, n along `dim` a multiple of 32 / bits) -> int32 words
    [.., n * bits / 32, ..]; `order[i]` is the index (within its word's run) nibble i holds."""
    per_word = 32 // bits
    dim = dim % values.dim()
    if values.shape[dim] % per_word:
        raise ValueError(f"cannot pack {values.shape[dim]} values along dim {dim} into words of {per_word}")
    moved = values.movedim(dim, -1).to(torch.int64)
    words = moved.reshape(*moved.shape[:-1], -1, per_word)  # [.., n / per_word, per_word]
    if order is not None:
        words = words[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    packed = (words << shifts).sum(-1)  # each value in its own bit range: the sum is an OR
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # as int32 two's complement
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The inverse of pack: int32 words [.., m, ..] -> int32 values [.., m * 32 / bits, ..]."""
    per_word = 32 // bits
    dim = dim % packed.dim()
    moved = packed.movedim(dim, -1).to(torch.int32)
    # value i of a run sits in the nibble the packing order gave it
    nibbles = _inverse(order) if order is not None else range(per_word)
    shifts = torch.tensor([bits * n for n in nibbles], dtype=torch.int32, device=packed.device)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [.., m, per_word]
    return values.reshape(*moved.shape[:-1], -1).movedim(-1, dim).contiguous()


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int4 [rows, cols] -> int32 [rows, cols / 8] in AutoAWQ's GEMM order (qweight, qzeros)."""
    return pack(values, 4, dim=1, order=AWQ_ORDER)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AutoAWQ's GEMM order -> int4 values [rows, cols] (int32)."""
    return unpack(packed, 4, dim=1, order=AWQ_ORDER)
