"""The attention backend interface: how a step's tokens attend over the paged KV cache.

The runner describes each step once, as a StepLayout (device tensors in the runner's static
buffers, plus host values); the backend turns it into its own metadata once per step
(build_metadata), and every attention layer then calls forward() with that metadata. For CUDA
graphs the runner builds a StepLayout over the static buffers of a padded decode batch and asks for
build_graph_metadata(): metadata that stays valid when the buffers' contents change between replays.

Token layout of a step: the new tokens of each sequence concatenated, sequence after sequence; the
first num_decodes sequences bring exactly one token each (their last token: decode steps, or
one-token prompt chunks), the others a prompt chunk:
    query rows  [0 .. num_decodes)                       one per decode sequence
                [query_start_loc[i] .. query_start_loc[i + 1])   sequence i >= num_decodes
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

import numpy as np
import torch

from .kv_cache import LayerKVCache


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer's static shape: what forward() needs besides the tensors."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: Optional[int] = None  # keys at positions > p - window are visible to a query at p


@dataclass
class StepLayout:
    """One step's token layout. Device tensors are int32 views of the runner's step buffers."""

    num_tokens: int
    num_seqs: int
    num_decodes: int  # leading sequences with one new token each
    max_query_len: int
    # Host upper bound of seq_lens: exact for an eager step; for a captured graph, the longest
    # sequence the graph may ever be replayed with.
    max_seq_len: int
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token; < 0: padding, not written
    seq_lens: torch.Tensor  # [num_seqs] tokens of each sequence in the cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq]; entries past a sequence's end are stale
    seq_lens_host: np.ndarray  # [num_seqs] the same values as seq_lens (eager steps only)
    query_start_loc_host: np.ndarray  # [num_seqs + 1]


class AttentionBackend(ABC):
    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    # True: forward() takes the step's rope and rotates query and key itself, in its KV write's
    # launch; otherwise the Attention layer rotates them before forward().
    fuses_rotary: ClassVar[bool] = False

    @abstractmethod
    def build_metadata(self, layout: StepLayout) -> Any:
        """This backend's metadata for an eager step (called once per step, before the layers)."""

    def build_graph_metadata(self, layout: StepLayout) -> Any:
        """Metadata for a decode-only CUDA graph over static buffers: it must read every per-step
        value from the layout's tensors, never from its host arrays."""
        raise NotImplementedError(f"the {self.name} attention backend cannot run in CUDA graphs")

    @abstractmethod
    def forward(self, spec: AttentionSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: LayerKVCache, metadata: Any, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> torch.Tensor:
        """Write the new tokens' keys and values into kv_cache, then attend.

        rope: None (query and key come rotated), or, only for a backend that fuses_rotary, the
        (positions [num_tokens], cos/sin table) to rotate query and key by, in place, first.

        query [num_tokens, num_heads, head_dim]; key, value [num_tokens, num_kv_heads, head_dim]
        (last dims contiguous, rows may be strided views); kv_cache: this layer's cache (data
        [2, num_blocks, block_size, num_kv_heads, head_dim], or quantized with its scales: the
        keys and values are quantized as they are written and every read sees them dequantized,
        the new tokens' own included) -> [num_tokens, num_heads, head_dim]
        """


def layout_from_lists(query_lens, seq_lens, block_tables, block_size: int, device: torch.device) -> StepLayout:
    """A StepLayout from plain lists, for tests and tools (the runner builds its own in numpy).

    query_lens[i]: new tokens of sequence i; seq_lens[i]: its tokens after the step; block_tables[i]:
    its block ids. Sequences must come decode group first (query_lens of 1 leading).
    """
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    starts, slots = [0], []
    for q_len, length, table in zip(query_lens, seq_lens, block_tables):
        starts.append(starts[-1] + q_len)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(length - q_len, length)]
    width = max((len(t) for t in block_tables), default=1) or 1
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]

    def as_tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return StepLayout(num_tokens=starts[-1], num_seqs=len(query_lens), num_decodes=num_decodes,
                      max_query_len=max(query_lens, default=0), max_seq_len=max(seq_lens, default=0),
                      block_size=block_size, slot_mapping=as_tensor(slots), seq_lens=as_tensor(list(seq_lens)),
                      query_start_loc=as_tensor(starts), block_tables=as_tensor(padded).view(len(padded), width),
                      seq_lens_host=np.asarray(seq_lens, dtype=np.int64),
                      query_start_loc_host=np.asarray(starts, dtype=np.int64))
