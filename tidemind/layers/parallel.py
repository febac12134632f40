"""Tensor parallelism as the layers see it: the rank's group and how a model's dims split over ranks.

A model built for tensor-parallel rank r of N holds 1/N of each large weight (layers/linear.py,
layers/embedding.py) and meets the other ranks at a few collectives, which it calls through the
TPGroup its BuildContext carries. `SINGLE_RANK` (N = 1) makes every collective a no-op, so a model
built without tensor parallelism runs exactly the code it ran before. The torch.distributed group
(runner/distributed.py) implements the same interface; layers never import torch.distributed.

How the dims split (N ranks, rank r):

    column-parallel linear   output features split: rank r holds rows [r * out / N, (r + 1) * out / N)
                             of every merged shard (q, k, v; gate, up): no communication
    row-parallel linear      input features split: partial outputs are all-reduced, the bias added
                             once, after the reduce
    attention heads          num_heads / N query heads per rank; key/value heads split the same way
                             when num_kv_heads % N == 0, else each rank holds the one kv head its
                             query heads use (needs N % num_kv_heads == 0): kv_heads_of_rank()
    vocabulary               ceil(vocab / N) rows per rank (the last rank's tail padded with zeros):
                             the embedding looks up its own rows and all-reduces, the LM head
                             all-gathers its logits
"""
from __future__ import annotations

from typing import Tuple

import torch


class TPError(ValueError):
    """A model (or a quantized checkpoint) cannot be split over the requested number of ranks."""


class TPGroup:
    """The tensor-parallel group of one rank. This base class is the single-rank group: every
    collective returns its input unchanged (tp_all_reduce and tp_all_gather are no-ops at tp 1).

    Shapes: all_reduce x [...] -> x summed over ranks (x itself or a new tensor: callers use the
    result; all_reduce_max: the largest, in place);
    all_gather x [rows, cols] ->
    [rows, cols * size], rank i's columns at [i * cols, (i + 1) * cols); broadcast: rank 0's x on
    every rank (in place); min_int: the smallest of the ranks' integers."""

    rank: int = 0
    size: int = 1
    backend: str = "none"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def min_int(self, value: int) -> int:
        return value

    def enable_symmetric_all_reduce(self, max_bytes: int) -> str:
        """Prepare all_reduce for tensors of up to max_bytes (collective); what it will use."""
        return "none"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, backend={self.backend})"


SINGLE_RANK = TPGroup()


class ShapeOnlyTPGroup(TPGroup):
    """A rank's place in a group, without collectives: enough to build (and load) that rank's slice
    of a model without running it, e.g. to check that a model splits before starting workers."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.backend = rank, size, "shape-only"

    def _no_collectives(self, *args):
        raise RuntimeError("a ShapeOnlyTPGroup has no peers: build or load with it, do not run the model")

    all_reduce = all_reduce_max = all_gather = broadcast = min_int = _no_collectives


def divide(total: int, parts: int, what: str) -> int:
    """total / parts, refusing (naming `what` and the tp values that would work) when it does not divide."""
    if total % parts:
        divisors = [d for d in range(1, total + 1) if total % d == 0 and d <= 16]
        raise TPError(f"{what}={total} is not divisible by tp={parts}, so it cannot be split evenly over the "
                      f"ranks; use a tp that divides it ({', '.join(map(str, divisors))})")
    return total // parts


def kv_heads_of_rank(num_heads: int, num_kv_heads: int, rank: int, size: int) -> Tuple[int, int]:
    """(first kv head, kv head count) rank `rank` of `size` holds, given that it holds query heads
    [rank * num_heads / size, (rank + 1) * num_heads / size).

    Split when num_kv_heads % size == 0; else replicated: every rank holds the single kv head its query
    heads use, which needs size % num_kv_heads == 0 (so no rank's query heads straddle two kv groups)."""
    divide(num_heads, size, "num_attention_heads")
    if num_kv_heads % size == 0:
        count = num_kv_heads // size
        return rank * count, count
    if size % num_kv_heads:
        usable = [d for d in range(1, num_heads + 1)
                  if num_heads % d == 0 and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
        raise TPError(f"num_key_value_heads={num_kv_heads} can neither be split over tp={size} ranks nor "
                      f"replicated evenly (tp must divide it or be a multiple of it); use tp in "
                      f"{', '.join(map(str, usable))}")
    return rank * num_kv_heads // size, 1


def vocab_range(vocab_size: int, rank: int, size: int) -> Tuple[int, int, int]:
    """(first row, rows held, rows per rank with padding) of the vocabulary on rank `rank`."""
    per_rank = -(-vocab_size // size)
    start = min(rank * per_rank, vocab_size)
    return start, min(per_rank, vocab_size - start), per_rank
