"""Paged attention of one query token per sequence (decode), split over the KV length when the
batch alone would leave the GPU under-filled.

Grid (B, KVH, num_splits). One program owns one sequence, one KV head and one share of the keys:
all GROUP = H / KVH query heads of that KV head are rows of one tile (padded to 16 rows for
tl.dot), so each K/V tile is read once per KV head:

    q      [BLOCK_G, D]          rows: query heads kvh * GROUP .. kvh * GROUP + GROUP - 1
    K, V   [BLOCK_N, D]          gathered token by token through the block table
    online softmax over the share's tiles, in float32, base 2 (scale * log2(e) folded in)

Shares: the visible keys [lo, seq_len) (lo = seq_len - window, or 0) are cut into num_splits
chunks of whole tiles; with one split the program writes the output, otherwise every program
writes its unnormalized (max, sum, acc) and counts its arrival at its (b, kvh)'s counter
(split_k.last_to_arrive); the last of the shares to arrive merges them for the GROUP heads, in the
same launch (a decode step at batch 1 launched a reduce kernel after every layer's attention), and
resets the counter. The merge's sums run in the same order whichever program arrives last.
The split count depends only on host values (B, KVH, max_seq_len, the window, the SM count), so
the launch can be captured in a CUDA graph. It is a run-time argument, not a compile-time one: the
CUDA graphs of every batch size (each with its own split count) share two compiled decode kernels
(SPLIT off / on), which keeps start-up's compile time down.

With kv_bits 8 / 4 (quant_policy) the caches hold uint8 rows and (scale, zero) pairs
(attention/kv_cache.py): tiles are dequantized to float32 as they are loaded (kv_cache.load_kv_tile),
then cast to the query's dtype like unquantized ones; KV_BITS is a constexpr, so the unquantized
kernel is compiled exactly as before.

Reference: kernels/reference.py (paged_decode_attention).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .kv_cache import check_kv_cache, load_kv_tile, scales_or_stand_ins
from .split_k import arrival_counters, last_to_arrive, reset_arrivals

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
# Split heuristic, measured on an H200 (llama8b / Gemma-3 / SmolLM2 shapes, B 1..256, 1k-4k keys):
# shorter shares help single sequences (B=1, 4k keys: 12 us against 14 us with 256-key shares).
_MIN_TOKENS_PER_SPLIT = 128  # below this a share's fixed cost (q load, partial write) is not repaid
_MAX_SPLITS = 32  # a power of two: the merge covers every split count with one tile of this size
_TARGET_WAVES = 4  # programs aimed at, in multiples of the SM count, when splitting
_CPU_SM_COUNT = 4  # stands in for the SM count under the Triton interpreter (CPU tensors)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                   partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counters_ptr,
                   query_batch_stride, query_head_stride, out_batch_stride, out_head_stride,
                   cache_block_stride, cache_slot_stride, cache_head_stride, block_table_stride,
                   num_heads, qk_scale, window, num_splits,
                   key_scales_ptr, value_scales_ptr, scales_block_stride, scales_slot_stride, scales_head_stride,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, KV_BITS: tl.constexpr, BLOCK_S: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + batch).to(tl.int32)
    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + rows  # [BLOCK_G]; rows >= GROUP are padding
    row_mask = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(query_ptr + batch * query_batch_stride + heads[:, None] * query_head_stride + dims[None, :],
                mask=row_mask[:, None], other=0.0)  # [BLOCK_G, HEAD_DIM]

    first_key = 0
    if USE_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)  # keys j > (seq_len - 1) - window
    chunk = tl.cdiv(tl.cdiv(seq_len - first_key, num_splits), BLOCK_N) * BLOCK_N
    lo = first_key + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table = block_tables_ptr + batch * block_table_stride
    for start in range(lo, hi, BLOCK_N):
        # every tile starts below hi, so each has >= 1 visible key and m_i stays finite after it
        positions = start + tl.arange(0, BLOCK_N)
        key_mask = positions < hi
        block_ids = tl.load(table + positions // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
        offsets = (block_ids * cache_block_stride + (positions % BLOCK_SIZE) * cache_slot_stride
                   + kv_head * cache_head_stride)  # [BLOCK_N]
        scale_offsets = offsets  # not read unquantized
        if KV_BITS != 0:
            scale_offsets = (block_ids * scales_block_stride + (positions % BLOCK_SIZE) * scales_slot_stride
                             + kv_head * scales_head_stride)  # [BLOCK_N]
        k = load_kv_tile(key_cache_ptr, key_scales_ptr, offsets, scale_offsets, key_mask, HEAD_DIM, KV_BITS, True)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(key_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_kv_tile(value_cache_ptr, value_scales_ptr, offsets, scale_offsets, key_mask, HEAD_DIM, KV_BITS, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    if not SPLIT:  # num_splits == 1
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0: acc = 0, out = 0
        tl.store(out_ptr + batch * out_batch_stride + heads[:, None] * out_head_stride + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        # partials [B, H, num_splits] (+ [HEAD_DIM] for acc), contiguous; an empty share writes (-inf, 0, 0)
        partial = (batch * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(partial_max_ptr + partial, m_i, mask=row_mask)
        tl.store(partial_sum_ptr + partial, l_i, mask=row_mask)
        tl.store(partial_acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask[:, None])
        tile = batch * (num_heads // GROUP) + kv_head
        if last_to_arrive(counters_ptr, tile, num_splits):
            for g in range(0, GROUP):
                _merge_splits(partial_acc_ptr, partial_max_ptr, partial_sum_ptr, out_ptr, out_batch_stride,
                              out_head_stride, batch, kv_head * GROUP + g, num_heads, num_splits, HEAD_DIM, BLOCK_S)
            reset_arrivals(counters_ptr, tile)


@triton.jit
def _merge_splits(partial_acc_ptr, partial_max_ptr, partial_sum_ptr, out_ptr, out_batch_stride, out_head_stride,
                  batch, head, num_heads, num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    # One (sequence, head)'s num_splits partials [max, sum, acc [HEAD_DIM]] -> its output row.
    # Written by other programs of the launch: loads bypass L1 (.cg).
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    partial = (batch * num_heads + head) * num_splits + splits  # [BLOCK_S]
    m = tl.load(partial_max_ptr + partial, mask=split_mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(partial_sum_ptr + partial, mask=split_mask, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every share empty (seq_len 0): weights 0
    weights = tl.exp2(m - m_max)  # [BLOCK_S]; 0 for empty shares
    total = tl.sum(l * weights, axis=0)
    acc = tl.load(partial_acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], mask=split_mask[:, None],
                  other=0.0, cache_modifier=".cg")  # [BLOCK_S, HEAD_DIM]
    out = tl.sum(acc * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + batch * out_batch_stride + head * out_head_stride + dims, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_kv_splits(batch: int, num_kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Shares per (sequence, KV head), for sequences attending at most max_keys keys: enough
    programs for _TARGET_WAVES waves over the SMs, none shorter than _MIN_TOKENS_PER_SPLIT keys;
    1 when the batch alone fills the GPU."""
    programs = batch * num_kv_heads
    sm_count = _sm_count(device)
    if programs >= sm_count:
        return 1
    by_length = triton.cdiv(max(max_keys, 1), _MIN_TOKENS_PER_SPLIT)
    by_occupancy = triton.cdiv(_TARGET_WAVES * sm_count, max(programs, 1))
    return max(1, min(by_length, by_occupancy, _MAX_SPLITS))


def _config(head_dim: int, dtype: torch.dtype, kv_bits: int = 0):
    """(BLOCK_N, num_warps, num_stages): K and V tiles of BLOCK_N x head_dim per pipeline stage;
    the fastest of those tried on an H200 (BLOCK_N 16..128, 4 / 8 warps, 2 / 3 stages). Quantized
    caches at head_dim 256 dequantize [64, 256] tiles in registers: 8 warps, as they compile for
    sm_90 without spills (benchmarks/compile_sm90.py; not yet timed on the GPU)."""
    if dtype == torch.float32:
        return (64, 4, 2) if head_dim <= 64 else (32, 4, 2)
    if kv_bits and head_dim > 128:
        return 64, 8, 2
    return (64, 4, 3) if head_dim <= 128 else (64, 4, 2)


def _check(query, key_cache, value_cache, block_tables, seq_lens, out, key_scales, value_scales, kv_bits) -> None:
    if query.dim() != 3 or query.dtype not in _DTYPES or query.stride(2) != 1:
        raise ValueError(f"paged_decode_attention: query must be [B, H, D] of {_DTYPES} with a contiguous last "
                         f"dim, got {query.dtype} {tuple(query.shape)} strides {query.stride()}")
    batch, num_heads, head_dim = query.shape
    check_kv_cache("paged_decode_attention", key_cache, value_cache, head_dim, key_scales, value_scales, kv_bits)
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads or num_heads // num_kv_heads > 64:
        raise ValueError(f"paged_decode_attention: {num_heads} query heads are not a multiple (<= 64x) of "
                         f"{num_kv_heads} kv heads")
    if not 16 <= head_dim <= 256 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention: head_dim {head_dim} (16..256) and block_size {block_size} "
                         "must be powers of two")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"paged_decode_attention: block_tables {tuple(block_tables.shape)} must be [{batch}, W] "
                         f"and seq_lens {tuple(seq_lens.shape)} [{batch}]")
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if x.dtype not in (torch.int32, torch.int64) or x.stride(-1) != 1:
            raise ValueError(f"paged_decode_attention: {name} must be int32 / int64 with a contiguous last dim")
    for name, x in (("key_cache", key_cache), ("value_cache", value_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        if x.device != query.device:
            raise ValueError(f"paged_decode_attention: {name} is on {x.device}, query on {query.device}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or out.device != query.device
                            or out.stride(2) != 1):
        raise ValueError(f"paged_decode_attention: out must be {query.dtype} {tuple(query.shape)} on "
                         f"{query.device} with a contiguous last dim")


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: Optional[int] = None, max_seq_len: Optional[int] = None,
                           out: Optional[torch.Tensor] = None, key_scales: Optional[torch.Tensor] = None,
                           value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> torch.Tensor:
    """Attention of each sequence's last token (position seq_lens[b] - 1) over its cached keys.

    query: [B, H, D] (last dim contiguous); key_cache, value_cache: [num_blocks, block_size, KVH, D]
    contiguous; block_tables: [B, W]; seq_lens: [B] (0: a padding row, output zeros);
    sliding_window w: keys j > seq_len - 1 - w only; max_seq_len: host upper bound of seq_lens that,
    with the window, sizes the split count (None: W * block_size). kv_bits 8 / 4: the caches are
    uint8 [..., D * kv_bits / 8] with (scale, zero) pairs in key_scales / value_scales
    [num_blocks, block_size, KVH, 2] float16 (kv_cache.write_kv_cache). Returns out [B, H, D] in
    query's dtype.
    """
    _check(query, key_cache, value_cache, block_tables, seq_lens, out, key_scales, value_scales, kv_bits)
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    max_keys = min(max_seq_len, sliding_window) if sliding_window is not None else max_seq_len
    num_splits = num_kv_splits(batch, num_kv_heads, max_keys, query.device)
    group = num_heads // num_kv_heads
    block_n, num_warps, num_stages = _config(head_dim, query.dtype, kv_bits)  # K/V: cast to query's dtype
    if num_splits > 1:
        partial_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        partial_max_sum = torch.empty((2, batch, num_heads, num_splits), dtype=torch.float32, device=query.device)
        partial_max, partial_sum = partial_max_sum[0], partial_max_sum[1]
        counters = arrival_counters(query.device, batch * num_kv_heads, "paged_decode_attention")
    else:
        partial_acc = partial_max = partial_sum = counters = out  # not read: the kernel writes out directly
    key_scales, value_scales, scale_strides = scales_or_stand_ins(key_cache, key_scales, value_scales, kv_bits)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, partial_acc, partial_max, partial_sum, counters,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        num_heads, float(scale) * _LOG2E, int(sliding_window or 0), num_splits, key_scales, value_scales,
        *scale_strides,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SPLIT=num_splits > 1, USE_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", KV_BITS=kv_bits, BLOCK_S=_MAX_SPLITS,
        num_warps=num_warps, num_stages=num_stages)
    return out
