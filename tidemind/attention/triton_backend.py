"""The Triton attention backend: the KV-write, paged decode and paged prefill kernels of
tidemind/kernels, reading every per-step value from device tensors, so decode steps can run inside
CUDA graphs. A quantized cache (LayerKVCache with scales) passes its scales and bit width to the same
three launchers, which quantize on write and dequantize K / V tiles on load.

Per step (build_metadata, once, before the layers) the layout is split into its two groups:
    decode group  rows [0, num_decodes): one query each, paged_decode_attention
    prefill group rows [num_decodes, num_tokens): prompt chunks, paged_prefill_attention, with
                  query_start_loc made relative to the group (each decode row is one token, so the
                  group starts at token num_decodes)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..kernels.decode_attention import paged_decode_attention
from ..kernels.kv_cache import write_kv_cache
from ..kernels.prefill_attention import paged_prefill_attention
from ..kernels.rotary_kv_cache import rotary_write_kv_cache
from .base import AttentionBackend, AttentionSpec, StepLayout
from .kv_cache import LayerKVCache


@dataclass
class TritonMetadata:
    layout: StepLayout
    num_decodes: int
    # Host upper bound of the decode group's seq_lens: sizes the decode kernel's KV splits.
    decode_max_seq_len: int
    # The prefill group (None in a decode-only step): its [S_p, W] block tables, [S_p] seq_lens,
    # [S_p + 1] query_start_loc relative to its first token, and its longest chunk (the grid).
    prefill_block_tables: Optional[torch.Tensor] = None
    prefill_seq_lens: Optional[torch.Tensor] = None
    prefill_query_start_loc: Optional[torch.Tensor] = None
    prefill_max_query_len: int = 0


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    fuses_rotary = True  # kernels/rotary_kv_cache.py: one launch where rotary and the KV write were two

    def build_metadata(self, layout: StepLayout) -> TritonMetadata:
        nd = layout.num_decodes
        decode_max = int(layout.seq_lens_host[:nd].max()) if nd else 0
        meta = TritonMetadata(layout=layout, num_decodes=nd, decode_max_seq_len=decode_max)
        if nd < layout.num_seqs:
            meta.prefill_block_tables = layout.block_tables[nd:]
            meta.prefill_seq_lens = layout.seq_lens[nd:]
            meta.prefill_query_start_loc = layout.query_start_loc[nd:] - nd
            meta.prefill_max_query_len = layout.max_query_len
        return meta

    def build_graph_metadata(self, layout: StepLayout) -> TritonMetadata:
        if layout.num_decodes != layout.num_seqs:
            raise ValueError("CUDA graphs hold decode-only steps")
        return TritonMetadata(layout=layout, num_decodes=layout.num_decodes, decode_max_seq_len=layout.max_seq_len)

    def forward(self, spec: AttentionSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: LayerKVCache, metadata: TritonMetadata,
                rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        layout = metadata.layout
        key_cache, value_cache, quant = kv_cache.key, kv_cache.value, kv_cache.quant_args()
        if rope is None:
            write_kv_cache(key, value, key_cache, value_cache, layout.slot_mapping, **quant)
        else:
            rotary_write_kv_cache(query, key, value, key_cache, value_cache, layout.slot_mapping, *rope, **quant)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [T, H, D]
        nd = metadata.num_decodes
        if nd:
            paged_decode_attention(query[:nd], key_cache, value_cache, layout.block_tables[:nd], layout.seq_lens[:nd],
                                   spec.scale, spec.sliding_window, metadata.decode_max_seq_len, out=out[:nd],
                                   **quant)
        if metadata.prefill_seq_lens is not None:
            paged_prefill_attention(query[nd:], key_cache, value_cache, metadata.prefill_block_tables,
                                    metadata.prefill_seq_lens, metadata.prefill_query_start_loc,
                                    metadata.prefill_max_query_len, spec.scale, spec.sliding_window, out=out[nd:],
                                    **quant)
        return out
