"""Causal paged attention of several sequences' new tokens (chunked prefill), flash-attention style.

Grid (H, cdiv(max_query_len, BLOCK_M), S): one program owns BLOCK_M query rows of one sequence
and one head, and walks the sequence's keys in tiles of BLOCK_N gathered through the block table
(earlier context and the new tokens alike: their K/V are in the cache already). Online softmax in
float32, base 2. Query rows sit at positions first_pos .. last_pos; key tiles (multiples of
BLOCK_N) fall in three runs:

    keys   lo ........... full_lo ................. full_hi ........... last_pos + 1
           [ masked: the   | unmasked: every row    | masked: the       ]
             window's edge   sees every key           causal diagonal

tiles wholly above the diagonal or left of every row's window are never visited. Programs start
in grid order (head fastest) and query tiles are numbered from the end, so the longest programs
(last rows, most keys) start first and the short ones fill the tail.

With kv_bits 8 / 4 (quant_policy) K and V tiles are dequantized as they are loaded, as in
decode_attention.py (kv_cache.load_kv_tile); KV_BITS is a constexpr, so the unquantized kernel is
compiled exactly as before.

Reference: kernels/reference.py (paged_prefill_attention).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .kv_cache import check_kv_cache, load_kv_tile, scales_or_stand_ins

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, acc, m_i, l_i, start, query_pos, seq_len, table, key_cache_ptr, value_cache_ptr,
                 cache_block_stride, cache_slot_stride, kv_head_offset, qk_scale, window,
                 key_scales_ptr, value_scales_ptr, scales_block_stride, scales_slot_stride, scales_head_offset,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_BITS: tl.constexpr):
    # q [BLOCK_M, HEAD_DIM]; acc [BLOCK_M, HEAD_DIM], m_i and l_i [BLOCK_M], float32; keys start .. start + BLOCK_N
    positions = start + tl.arange(0, BLOCK_N)
    if MASKED:
        key_mask = positions < seq_len
        block_ids = tl.load(table + positions // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    else:
        key_mask = positions >= 0  # not read: the unmasked loads take every row
        block_ids = tl.load(table + positions // BLOCK_SIZE).to(tl.int64)
    offsets = block_ids * cache_block_stride + (positions % BLOCK_SIZE) * cache_slot_stride + kv_head_offset
    scale_offsets = offsets  # not read unquantized
    if KV_BITS != 0:
        scale_offsets = block_ids * scales_block_stride + (positions % BLOCK_SIZE) * scales_slot_stride \
            + scales_head_offset
    k = load_kv_tile(key_cache_ptr, key_scales_ptr, offsets, scale_offsets, key_mask, HEAD_DIM, KV_BITS, MASKED)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (positions[None, :] <= query_pos[:, None]) & key_mask[None, :]
        if USE_WINDOW:
            visible = visible & (positions[None, :] > query_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        # a row may have seen no key yet (window edge): keep its max at -inf but exponentiate against 0
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = tl.exp2(m_i - m_new_safe)
    p = tl.exp2(s - m_new_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = load_kv_tile(value_cache_ptr, value_scales_ptr, offsets, scale_offsets, key_mask, HEAD_DIM, KV_BITS, MASKED)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                    out_ptr, query_token_stride, query_head_stride, out_token_stride, out_head_stride,
                    cache_block_stride, cache_slot_stride, cache_head_stride, block_table_stride, qk_scale, window,
                    key_scales_ptr, value_scales_ptr, scales_block_stride, scales_slot_stride, scales_head_stride,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    KV_BITS: tl.constexpr):
    head = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    query_len = (tl.load(query_start_loc_ptr + seq + 1) - query_start).to(tl.int32)
    if m_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    query_pos = seq_len - query_len + rows  # [BLOCK_M]
    dims = tl.arange(0, HEAD_DIM)
    tokens = query_start + rows
    q = tl.load(query_ptr + tokens[:, None] * query_token_stride + head * query_head_stride + dims[None, :],
                mask=row_mask[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]

    first_pos = seq_len - query_len + m_block * BLOCK_M
    last_pos = tl.minimum(first_pos + BLOCK_M, seq_len) - 1
    hi = last_pos + 1
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # tiles ending by first_pos + 1: causal for every row
    lo = 0
    full_lo = 0
    if USE_WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, hi)
    full_hi = tl.maximum(full_hi, full_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    kv_head_offset = (head // GROUP) * cache_head_stride
    scales_head_offset = (head // GROUP) * scales_head_stride
    for start in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, query_pos, seq_len, table, key_cache_ptr,
                                     value_cache_ptr, cache_block_stride, cache_slot_stride, kv_head_offset,
                                     qk_scale, window, key_scales_ptr, value_scales_ptr, scales_block_stride,
                                     scales_slot_stride, scales_head_offset, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True,
                                     USE_WINDOW, DOT_PRECISION, KV_BITS)
    for start in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, query_pos, seq_len, table, key_cache_ptr,
                                     value_cache_ptr, cache_block_stride, cache_slot_stride, kv_head_offset,
                                     qk_scale, window, key_scales_ptr, value_scales_ptr, scales_block_stride,
                                     scales_slot_stride, scales_head_offset, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False,
                                     USE_WINDOW, DOT_PRECISION, KV_BITS)
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, query_pos, seq_len, table, key_cache_ptr,
                                     value_cache_ptr, cache_block_stride, cache_slot_stride, kv_head_offset,
                                     qk_scale, window, key_scales_ptr, value_scales_ptr, scales_block_stride,
                                     scales_slot_stride, scales_head_offset, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True,
                                     USE_WINDOW, DOT_PRECISION, KV_BITS)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # every real row sees its own key: l_i > 0
    tl.store(out_ptr + tokens[:, None] * out_token_stride + head * out_head_stride + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def _config(head_dim: int, dtype: torch.dtype, kv_bits: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the fastest of those tried on an H200, within its
    228 KB of shared memory (Q tile, then K and V tiles of BLOCK_N x head_dim per stage). bf16,
    8000-token prompt: head_dim 128 (32 / 8 heads) 383 TFLOP/s, head_dim 256 (4 / 1 heads, window
    512) 240 TFLOP/s; float32 (no tensor cores, exact products), head_dim 64: 10 TFLOP/s.

    Quantized caches (kv_bits) dequantize each K / V tile in registers: narrower key tiles above
    head_dim 64, the widest that compile for sm_90 without spills (benchmarks/compile_sm90.py; not
    yet timed on the GPU)."""
    if dtype == torch.float32:
        return (32, 64, 4, 2) if head_dim <= 64 else (32, 32, 4, 2)
    if kv_bits and head_dim > 64:
        return (128, 64, 8, 2) if head_dim <= 128 else (128, 32, 8, 2)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 2
    return 128, 64, 8, 2


def _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, key_scales, value_scales,
           kv_bits) -> None:
    if query.dim() != 3 or query.dtype not in _DTYPES or query.stride(2) != 1:
        raise ValueError(f"paged_prefill_attention: query must be [T, H, D] of {_DTYPES} with a contiguous last "
                         f"dim, got {query.dtype} {tuple(query.shape)} strides {query.stride()}")
    num_heads, head_dim = query.shape[1:]
    check_kv_cache("paged_prefill_attention", key_cache, value_cache, head_dim, key_scales, value_scales, kv_bits)
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_prefill_attention: {num_heads} query heads are not a multiple of "
                         f"{num_kv_heads} kv heads")
    if not 16 <= head_dim <= 256 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"paged_prefill_attention: head_dim {head_dim} (16..256) and block_size {block_size} "
                         "must be powers of two")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"paged_prefill_attention: seq_lens {tuple(seq_lens.shape)} must be [S], block_tables "
                         f"{tuple(block_tables.shape)} [S, W] and query_start_loc {tuple(query_start_loc.shape)} "
                         "[S + 1]")
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if x.dtype not in (torch.int32, torch.int64) or x.stride(-1) != 1:
            raise ValueError(f"paged_prefill_attention: {name} must be int32 / int64 with a contiguous last dim")
    for name, x in (("key_cache", key_cache), ("value_cache", value_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if x.device != query.device:
            raise ValueError(f"paged_prefill_attention: {name} is on {x.device}, query on {query.device}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or out.device != query.device
                            or out.stride(2) != 1):
        raise ValueError(f"paged_prefill_attention: out must be {query.dtype} {tuple(query.shape)} on "
                         f"{query.device} with a contiguous last dim")


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            max_query_len: int, scale: float, sliding_window: Optional[int] = None,
                            out: Optional[torch.Tensor] = None, key_scales: Optional[torch.Tensor] = None,
                            value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> torch.Tensor:
    """Causal attention of S sequences' new tokens over their whole paged context.

    query: [T, H, D] (last dim contiguous): rows query_start_loc[s] .. query_start_loc[s + 1] are
    sequence s's q_len new tokens, at positions seq_lens[s] - q_len .. seq_lens[s] - 1, their K/V
    already in key_cache / value_cache [num_blocks, block_size, KVH, D]; block_tables: [S, W];
    max_query_len: host int >= every q_len (the grid); sliding_window w: keys j > position - w only;
    kv_bits, key_scales, value_scales: quantized caches, as in paged_decode_attention.
    Rows of `out` past query_start_loc[S] are not written. Returns out [T, H, D] in query's dtype.
    """
    _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, key_scales, value_scales,
           kv_bits)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    block_m, block_n, num_warps, num_stages = _config(head_dim, query.dtype, kv_bits)
    grid = (num_heads, triton.cdiv(max_query_len, block_m), num_seqs)
    if max(grid[1:]) > 65535:  # CUDA's limit on the grid's second and third dims
        raise ValueError(f"paged_prefill_attention: {num_seqs} sequences / max_query_len {max_query_len} are over "
                         f"the grid's limits (65535 sequences, {65535 * block_m} tokens a sequence)")
    key_scales, value_scales, scale_strides = scales_or_stand_ins(key_cache, key_scales, value_scales, kv_bits)
    _prefill_kernel[grid](
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        float(scale) * _LOG2E, int(sliding_window or 0), key_scales, value_scales, *scale_strides,
        GROUP=num_heads // key_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_M=block_m,
        BLOCK_N=block_n, USE_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", KV_BITS=kv_bits, num_warps=num_warps,
        num_stages=num_stages)
    return out
