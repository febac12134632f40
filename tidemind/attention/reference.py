"""The torch attention backend: gather the paged blocks (dequantizing them when the cache is
quantized), then torch's SDPA. It is the definition the Triton backend is tested against and the
execution path on the CPU."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels import reference
from .base import AttentionBackend, AttentionSpec, StepLayout
from .kv_cache import LayerKVCache


@dataclass
class ReferenceMetadata:
    layout: StepLayout
    # Additive masks of the decode group, one per (sliding window, dtype): the same for every layer,
    # so built by the first layer that needs one and kept for the step.
    decode_masks: Dict[Tuple, torch.Tensor] = field(default_factory=dict)
    # block_tables / seq_lens as int64 (index_select wants them so on some devices)
    block_tables: Optional[torch.Tensor] = None


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

    def build_metadata(self, layout: StepLayout) -> ReferenceMetadata:
        return ReferenceMetadata(layout=layout, block_tables=layout.block_tables.long())

    def forward(self, spec: AttentionSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: LayerKVCache, metadata: ReferenceMetadata, rope: None = None) -> torch.Tensor:
        layout = metadata.layout
        reference.write_kv_cache_split(key, value, kv_cache.key, kv_cache.value, layout.slot_mapping,
                                       **kv_cache.quant_args())
        num_decodes = layout.num_decodes
        if num_decodes:
            decoded = self._decode(spec, query[:num_decodes], kv_cache, metadata)
            if num_decodes == layout.num_seqs:
                return decoded  # a decode-only step: nothing else to attend
        out = torch.empty_like(query)
        if num_decodes:
            out[:num_decodes] = decoded
        starts, lengths = layout.query_start_loc_host, layout.seq_lens_host
        for i in range(num_decodes, layout.num_seqs):
            start, end, length = int(starts[i]), int(starts[i + 1]), int(lengths[i])
            out[start:end] = self._prefill(spec, query[start:end], key[start:end], value[start:end], kv_cache,
                                           metadata.block_tables[i:i + 1], length)
        return out

    @staticmethod
    def _decode(spec: AttentionSpec, query: torch.Tensor, kv_cache: LayerKVCache,
                metadata: ReferenceMetadata) -> torch.Tensor:
        # One query per sequence: gather every decode sequence's keys once, padded to the longest.
        layout = metadata.layout
        num_decodes = layout.num_decodes
        length = int(layout.seq_lens_host[:num_decodes].max())
        tables = metadata.block_tables[:num_decodes]
        k, v = _gather(kv_cache, tables, length, query.dtype)  # [S, KVH, length, D] each
        q = query.unsqueeze(2)  # [S, H, 1, D]
        mask = _decode_mask(metadata, length, spec.sliding_window, q.dtype)
        attn = F.scaled_dot_product_attention(q, k, v, scale=spec.scale, enable_gqa=True, attn_mask=mask)
        return attn.squeeze(2)

    @staticmethod
    def _prefill(spec: AttentionSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: LayerKVCache, table: torch.Tensor, length: int) -> torch.Tensor:
        # query [q_len, H, D] at positions [length - q_len, length) -> [q_len, H, D]
        q_len = query.shape[0]
        q = query.transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        window = spec.sliding_window
        if length == q_len and (window is None or length <= window):
            # The whole sequence is new: plain causal attention over the new keys, as the cache
            # stores them (read back dequantized when it is quantized).
            if kv_cache.quant_policy:
                k, v = _gather(kv_cache, table, length, q.dtype)
            else:
                k = key.transpose(0, 1).unsqueeze(0)
                v = value.transpose(0, 1).unsqueeze(0)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale, enable_gqa=True)
        else:
            k, v = _gather(kv_cache, table, length, q.dtype)
            query_pos = torch.arange(length - q_len, length, device=query.device)
            visible = reference.visible_keys(query_pos, length, window)  # [q_len, length]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[None, None], scale=spec.scale,
                                                  enable_gqa=True)
        return attn.squeeze(0).transpose(0, 1)


def _gather(kv_cache: LayerKVCache, tables: torch.Tensor, length: int,
            dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [S, KVH, length, D] of the first `length` positions of the tables' sequences,
    dequantized or cast to dtype."""
    bits = kv_cache.quant_policy
    return (reference.gather_kv_dequant(kv_cache.key, kv_cache.key_scales, tables, length, bits, dtype),
            reference.gather_kv_dequant(kv_cache.value, kv_cache.value_scales, tables, length, bits, dtype))


def _decode_mask(metadata: ReferenceMetadata, length: int, sliding_window: Optional[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [S, 1, 1, length] (0 or -inf) of the decode group's keys."""
    key = (length, sliding_window, dtype)
    mask = metadata.decode_masks.get(key)
    if mask is None:
        layout = metadata.layout
        seq_lens = layout.seq_lens[:layout.num_decodes].long()
        # the query is the last token: it sees every cached key of its sequence (within the window)
        visible = reference.visible_keys(seq_lens - 1, length, sliding_window)  # [S, length]
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        mask = metadata.decode_masks[key] = mask[:, None, None, :]
    return mask
