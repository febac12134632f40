"""Torch reference implementation of every kernel.

These are the definitions the Triton kernels are tested against, and the execution path on a
machine without a GPU or without Triton. Each function keeps the signature of its kernel twin.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x / rms(x) * (weight + weight_offset), computed in float32 and cast back to x's dtype.

    x: [num_tokens, hidden]; weight: [hidden]. Gemma stores (scale - 1) and passes weight_offset=1.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (weight.float() + weight_offset)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 weight_offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm transformer's residual step."""
    summed = x + residual
    return rms_norm(summed, weight, eps, weight_offset), summed


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions' angles, "rotate half" (GPT-NeoX / Hugging Face) layout.

    q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim];
    cos, sin: [num_tokens, head_dim] (the two halves hold the same angles), already in q's dtype.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    return rotate(q), rotate(k)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32: row p = [cos(p * inv_freq) | sin(p * inv_freq)] * scaling.

    inv_freq: [head_dim // 2] float32. The angles are formed exactly as Hugging Face forms them per
    step (float32 position times float32 frequency), so a row equals HF's cos/sin bit for bit.
    """
    positions = torch.arange(max_positions, dtype=torch.int64, device=inv_freq.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return cache * attention_scaling if attention_scaling != 1.0 else cache


def rotary_embedding_cached(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, H * D] and key [T, KVH * D] by their positions' rows of cos_sin_cache
    [max_positions, D] (build_cos_sin_cache); new tensors of the same shapes ("rotate half" layout).

    cos and sin are cast to the inputs' dtype and the rotation is done in that dtype, as Hugging Face
    does, so that float32 results match it exactly.
    """
    num_tokens = query.shape[0]
    head_dim = cos_sin_cache.shape[1]
    rows = cos_sin_cache.index_select(0, positions.long())  # [T, D]: the two halves are cos, sin
    cos, sin = rows.to(query.dtype).chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((sin, sin), dim=-1)
    q, k = rotary_embedding(query.reshape(num_tokens, -1, head_dim), key.reshape(num_tokens, -1, head_dim), cos, sin)
    return q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim: [n, 2 * d] -> [n, d]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate_up = [gate | up]: [n, 2 * d] -> [n, d]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: each row's largest logit's index, the first on ties (a NaN
    counts as the largest)."""
    return logits.argmax(dim=-1)


def write_kv_cache_split(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, slot_mapping: torch.Tensor, key_scales: Optional[torch.Tensor] = None,
                         value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> None:
    """Store the new tokens' keys and values in their cache slots; slots < 0 are skipped (padding).

    key, value: [num_tokens, num_kv_heads, head_dim]
    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] (kv_bits 0 or 8) or
        [..., head_dim // 2] (kv_bits 4): the rows as quantize_kv packs them when kv_bits is not 0,
        with their (scale, zero) in key_scales, value_scales [num_blocks, block_size, num_kv_heads, 2]
    slot_mapping: [num_tokens] int32/int64, slot = block_id * block_size + offset in block
    """
    if kv_bits:
        (key, key_scale_zero), (value, value_scale_zero) = quantize_kv(key, kv_bits), quantize_kv(value, kv_bits)
        write_kv_cache_split(key_scale_zero, value_scale_zero, key_scales, value_scales, slot_mapping)
    num_kv_heads, head_dim = key_cache.shape[-2:]
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        key, value, slots = key[keep], value[keep], slots[keep]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(value_cache.dtype))


# ---- KV cache quantization (quant_policy 8 / 4): the layout is described in attention/kv_cache.py ----

FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0 ** -24  # float16's smallest subnormal
# Relative margin taken before rounding (scale, zero) to float16, whose rounding error is at most
# 2^-11 of a normal value: 2^-11 + 2^-20 (the 2^-20 also covers float32's roundings on the way), so
# zero rounds to <= min(x) and scale to >= (max(x) - zero) / qmax. Two powers of two: |x| times
# each is exact, so a fused multiply-add computes the same zero.
KV_MARGIN_HIGH = 2.0 ** -11
KV_MARGIN_LOW = 2.0 ** -20


def kv_scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of rows whose values lie in [lo, hi]: float32 tensors holding float16 values,
    with zero <= lo and zero + qmax * scale >= hi (rows within float16's range). The Triton twin
    (kernels/kv_cache.py) makes the same float32 operations in the same order."""
    qmax = 2 ** bits - 1
    zero = lo - lo.abs() * KV_MARGIN_HIGH - lo.abs() * KV_MARGIN_LOW - FLOAT16_TINY
    zero = zero.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).float()
    scale = (hi - zero) * ((1 + KV_MARGIN_HIGH + KV_MARGIN_LOW) / qmax) + FLOAT16_TINY
    return scale.clamp(max=FLOAT16_MAX).to(torch.float16).float(), zero


def quantize_kv(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x [..., head_dim] asymmetrically to `bits` (8 or 4) bits.

    Returns (packed uint8 [..., head_dim] (8) or [..., head_dim // 2] (4: element j in the low
    nibble of byte j, element j + head_dim / 2 in its high nibble), scale_zero float16 [..., 2]).
    Every element comes back by dequantize_kv within scale / 2 of its value.
    """
    qmax = 2 ** bits - 1
    xf = x.float()
    scale, zero = kv_scale_zero(xf.amin(-1), xf.amax(-1), bits)
    q = torch.floor((xf - zero[..., None]) / scale[..., None] + 0.5).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        half = x.shape[-1] // 2
        q = q[..., :half] | (q[..., half:] << 4)
    return q, torch.stack((scale, zero), dim=-1).to(torch.float16)


def dequantize_kv(packed: torch.Tensor, scale_zero: torch.Tensor, bits: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_kv's inverse: q * scale + zero in float32, cast to dtype -> [..., head_dim]."""
    q = torch.cat((packed & 15, packed >> 4), dim=-1) if bits == 4 else packed
    scale_zero = scale_zero.float()
    return (q.float() * scale_zero[..., 0:1] + scale_zero[..., 1:2]).to(dtype)


def gather_kv_dequant(cache: torch.Tensor, scales: Optional[torch.Tensor], block_tables: torch.Tensor, length: int,
                      kv_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """gather_kv of a possibly quantized cache, dequantized (or cast) to dtype:
    [S, num_kv_heads, length, head_dim]. scales: [num_blocks, block_size, num_kv_heads, 2] when kv_bits."""
    gathered = gather_kv(cache, block_tables, length)
    if not kv_bits:
        return gathered.to(dtype)
    return dequantize_kv(gathered, gather_kv(scales, block_tables, length), kv_bits, dtype)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) of the first `length` tokens of the sequences of `block_tables`.

    cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [S, >= ceil(length / bs)]
    returns [S, num_kv_heads, length, head_dim]
    """
    _, block_size, h, d = cache.shape
    num_blocks = -(-length // block_size)
    table = block_tables[:, :num_blocks]
    # index_select copies whole blocks (memcpy per row): twice as fast as advanced indexing on CPU.
    gathered = cache.index_select(0, table.reshape(-1))  # [S * num_blocks, block_size, H, D]
    return gathered.view(table.shape[0], num_blocks * block_size, h, d)[:, :length].transpose(1, 2)


def visible_keys(query_pos: torch.Tensor, length: int, sliding_window: Optional[int]) -> torch.Tensor:
    """Mask [..., length] of the keys each query position may attend to (causal, optional window).

    A query at position p sees key j when j <= p and, with a window w, j > p - w (Hugging Face's
    sliding-window convention).
    """
    key_pos = torch.arange(length, device=query_pos.device)
    visible = key_pos <= query_pos.unsqueeze(-1)
    if sliding_window is not None:
        visible &= key_pos > query_pos.unsqueeze(-1) - sliding_window
    return visible


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: Optional[int] = None, max_seq_len: Optional[int] = None,
                           out: Optional[torch.Tensor] = None, key_scales: Optional[torch.Tensor] = None,
                           value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> torch.Tensor:
    """Attention of each sequence's last token over its cached keys.

    query: [B, H, D], the token at position seq_lens[b] - 1 (its K/V already cached);
    key_cache, value_cache: [num_blocks, block_size, KVH, D]; block_tables: [B, W] (every entry a
    valid block id, padding included); seq_lens: [B] (0 for a padding row, whose output is zeros);
    max_seq_len: host upper bound of seq_lens (None: W * block_size), the length gathered here.
    Query head h reads kv head h // (H // KVH). A window w keeps keys j > seq_len - 1 - w.
    kv_bits 8 / 4: the caches are quantized (write_kv_cache_split), their scales in key_scales /
    value_scales, and are dequantized as they are gathered.
    Returns out [B, H, D] in query's dtype (written into `out` when given).
    """
    block_size = key_cache.shape[1]
    length = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    length = max(1, min(length, block_tables.shape[1] * block_size))
    k = gather_kv_dequant(key_cache, key_scales, block_tables, length, kv_bits, query.dtype)  # [B, KVH, length, D]
    v = gather_kv_dequant(value_cache, value_scales, block_tables, length, kv_bits, query.dtype)
    last = seq_lens.long() - 1  # [B] position of the query
    visible = visible_keys(last, length, sliding_window)  # [B, length]
    mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
    attn = F.scaled_dot_product_attention(query.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                          enable_gqa=True).squeeze(2)  # [B, H, D]
    # a padding row (seq_len 0) sees no key: its softmax is NaN, its output zeros
    attn = torch.where((seq_lens > 0)[:, None, None], attn, torch.zeros((), dtype=attn.dtype, device=attn.device))
    if out is None:
        return attn
    out.copy_(attn)
    return out


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            max_query_len: int, scale: float, sliding_window: Optional[int] = None,
                            out: Optional[torch.Tensor] = None, key_scales: Optional[torch.Tensor] = None,
                            value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> torch.Tensor:
    """Causal attention of S sequences' new tokens over their whole cached context (chunked prefill).

    query: [T, H, D], rows query_start_loc[s] .. query_start_loc[s + 1] belong to sequence s, which
    has seq_lens[s] cached tokens including its q_len new ones (their K/V written already):

        positions  0 ...................... seq_len - q_len ........ seq_len - 1
                   [ earlier context (cache) | the q_len new query rows         ]

    query row j of s sits at position seq_len - q_len + j and sees keys i <= its position (and,
    with a window w, i > position - w). block_tables: [S, W]; query_start_loc: [S + 1];
    max_query_len: unused here (the kernel's grid size); kv_bits, key_scales, value_scales: as in
    paged_decode_attention. Rows of `out` past query_start_loc[S] are left as they are.
    Returns out [T, H, D] in query's dtype.
    """
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for s, length in enumerate(lengths):
        start, end = starts[s], starts[s + 1]
        if end == start:
            continue
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        table = block_tables[s:s + 1]
        k = gather_kv_dequant(key_cache, key_scales, table, length, kv_bits, q.dtype)  # [1, KVH, length, D]
        v = gather_kv_dequant(value_cache, value_scales, table, length, kv_bits, q.dtype)
        if length == end - start and (sliding_window is None or length <= sliding_window):
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            query_pos = torch.arange(length - (end - start), length, device=query.device)
            visible = visible_keys(query_pos, length, sliding_window)  # [q_len, length]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[None, None], scale=scale,
                                                  enable_gqa=True)
        out[start:end] = attn.squeeze(0).transpose(0, 1)
    return out
