"""The CPU attention backend: one C call per layer (kernels/cpu, csrc/layer_ops.c
tm_paged_attention) writes the step's keys and values into the paged cache and attends every query
row, decode and prefill alike, straight from the blocks (online softmax, no gather, no mask).

It takes a float32, unquantized cache (quant_policy 0): a quantized cache (--quant-policy 8 / 4)
or another dtype goes through the reference backend, the definition this one is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .base import AttentionBackend, AttentionSpec, StepLayout
from .kv_cache import LayerKVCache
from .reference import ReferenceAttentionBackend


@dataclass
class CPUMetadata:
    layout: StepLayout
    # (slots, seq_lens, query_start, block_tables, table stride, seqs, block_size): the int32
    # step arrays as the C kernel takes them; they live as long as the layout's tensors
    args: tuple
    reference: Optional[Any] = None  # the reference backend's metadata, built for a quantized cache


def _int32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.int32 or not x.is_contiguous():
        raise ValueError("the CPU attention kernel reads the step's int32 arrays in place")
    return x


class CPUAttentionBackend(AttentionBackend):
    name = "cpu"

    def __init__(self):
        from ..kernels.cpu.library import kernels

        self.kernels = kernels()
        self.reference = ReferenceAttentionBackend()

    def build_metadata(self, layout: StepLayout) -> CPUMetadata:
        tables = layout.block_tables
        if tables.stride(1) != 1:
            tables = tables.contiguous()
        args = (_int32(layout.slot_mapping).data_ptr(), _int32(layout.seq_lens).data_ptr(),
                _int32(layout.query_start_loc).data_ptr(), _int32(tables).data_ptr(), tables.stride(0),
                layout.num_seqs, layout.block_size)
        return CPUMetadata(layout=layout, args=args)

    def forward(self, spec: AttentionSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: LayerKVCache, metadata: CPUMetadata, rope: None = None) -> torch.Tensor:
        if kv_cache.quant_policy or kv_cache.data.dtype != torch.float32 or query.dtype != torch.float32:
            if metadata.reference is None:
                metadata.reference = self.reference.build_metadata(metadata.layout)
            return self.reference.forward(spec, query, key, value, kv_cache, metadata.reference)
        data = kv_cache.data
        if not data.is_contiguous():
            raise ValueError("the CPU attention kernel needs a contiguous KV cache")
        return self.kernels.paged_attention(query, key, value, data, metadata.args, spec.scale,
                                            spec.sliding_window or 0)
