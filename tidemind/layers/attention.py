"""Paged attention layer and the metadata that describes one step's sequences to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..kernels import reference


@dataclass
class AttentionMetadata:
    """Layout of one step's tokens, built by the runner and passed explicitly to every layer.

    The step's tokens are the concatenation of each sequence's new tokens, sequence after
    sequence; the first `num_decode_seqs` sequences contribute exactly one token each.
        query_start_loc_host[i] .. query_start_loc_host[i + 1]   token rows of sequence i
        seq_lens_host[i]   tokens of sequence i in the cache after this step (context + new)
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, right-padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64, on the device
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64, on the device
    seq_lens_host: List[int]
    query_start_loc_host: List[int]
    num_decode_seqs: int
    block_size: int
    # Tensors every layer would build alike (e.g. the decode group's attention mask), made by the
    # first layer that needs them; keyed by what they depend on besides the metadata.
    step_cache: Dict[Tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def build_attention_metadata(query_lens: Sequence[int], seq_lens: Sequence[int],
                             block_tables: Sequence[Sequence[int]], block_size: int,
                             device: torch.device) -> AttentionMetadata:
    """Metadata for sequences in the given order; leading single-token sequences form the batched
    decode group (the runner puts them first), any others are attended one by one.

    query_lens[i]: new tokens of sequence i; seq_lens[i]: its tokens after the step;
    block_tables[i]: its KV block ids (covering seq_lens[i] tokens).
    """
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    starts = [0]
    slots: List[int] = []
    for q_len, length, table in zip(query_lens, seq_lens, block_tables):
        starts.append(starts[-1] + q_len)
        for pos in range(length - q_len, length):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    max_blocks = max((len(t) for t in block_tables), default=1) or 1
    padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]

    def as_tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return AttentionMetadata(slot_mapping=as_tensor(slots), block_tables=as_tensor(padded),
                             seq_lens=as_tensor(list(seq_lens)), query_start_loc=as_tensor(starts),
                             seq_lens_host=list(seq_lens), query_start_loc_host=starts,
                             num_decode_seqs=num_decodes, block_size=block_size)


class Attention(nn.Module):
    """Attention of new tokens over the paged KV cache; q/k already rotated by the caller.

    forward: q [num_tokens, num_heads * head_dim], k and v [num_tokens, num_kv_heads * head_dim],
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] -> [num_tokens, num_heads * head_dim]
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        out = reference.paged_attention(
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv_cache, meta, self.scale, self.sliding_window)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
