"""Torch reference implementation of every kernel.

These are the definitions the Triton kernels are tested against, and the execution path on a
machine without a GPU or without Triton. Each function keeps the signature of its kernel twin.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..layers.attention import AttentionMetadata


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


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim: [n, 2 * d] -> [n, d]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate_up = [gate | up]: [n, 2 * d] -> [n, d]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values in their cache slots.

    key, value: [num_tokens, num_kv_heads, head_dim]
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (0: keys, 1: values)
    slot_mapping: [num_tokens] int64, slot = block_id * block_size + offset in block
    """
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) of the first `length` tokens of the sequences of `block_table`.

    cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_table: [S, >= ceil(length / bs)]
    returns [S, num_kv_heads, length, head_dim]
    """
    _, block_size, h, d = cache.shape
    num_blocks = -(-length // block_size)
    table = block_table[:, :num_blocks]
    # index_select copies whole blocks (memcpy per row): twice as fast as advanced indexing on CPU.
    gathered = cache.index_select(0, table.reshape(-1))  # [S * num_blocks, block_size, H, D]
    return gathered.view(table.shape[0], num_blocks * block_size, h, d)[:, :length].transpose(1, 2)


def _visible_keys(query_pos: torch.Tensor, length: int, sliding_window: Optional[int]) -> torch.Tensor:
    """Mask [..., length] of the keys each query position may attend to (causal, optional window).

    A query at position p sees key j when j <= p and, with a window w, j > p - w (Hugging Face's
    sliding-window convention).
    """
    key_pos = torch.arange(length, device=query_pos.device)
    visible = key_pos <= query_pos.unsqueeze(-1)
    if sliding_window is not None:
        visible &= key_pos > query_pos.unsqueeze(-1) - sliding_window
    return visible


def _decode_mask(meta: "AttentionMetadata", length: int, sliding_window: Optional[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [S, 1, 1, length] (0 or -inf) of the decode group's keys: the same for every
    layer with the same window, so it is built once per step and kept in meta.step_cache."""
    key = ("decode_mask", length, sliding_window, dtype)
    mask = meta.step_cache.get(key)
    if mask is None:
        seq_lens = meta.seq_lens[:meta.num_decode_seqs]
        # the query is the last token: it sees every cached key of its sequence (within the window)
        visible = _visible_keys(seq_lens - 1, length, sliding_window)  # [S, length]
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        mask = meta.step_cache[key] = mask[:, None, None, :]
    return mask


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                    meta: "AttentionMetadata", scale: float,
                    sliding_window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of the step's new tokens over their sequences' paged KV cache.

    query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens, num_kv_heads, head_dim]
    (the new tokens, written into kv_cache here first); returns [num_tokens, num_heads, head_dim].
    Sequences are laid out as in `meta`: the first meta.num_decode_seqs have one query token each.
    """
    write_kv_cache(key, value, kv_cache, meta.slot_mapping)
    num_decodes = meta.num_decode_seqs
    if num_decodes:
        # One query per sequence: gather every decode sequence's keys once, padded to the longest.
        length = max(meta.seq_lens_host[:num_decodes])
        k = _gather_kv(kv_cache[0], meta.block_tables[:num_decodes], length)
        v = _gather_kv(kv_cache[1], meta.block_tables[:num_decodes], length)
        q = query[:num_decodes].unsqueeze(2)  # [S, num_heads, 1, head_dim]
        attn = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale, enable_gqa=True,
                                              attn_mask=_decode_mask(meta, length, sliding_window, q.dtype))
        if num_decodes == meta.num_seqs:
            return attn.squeeze(2)  # a decode-only step: nothing else to attend
    out = torch.empty_like(query)
    if num_decodes:
        out[:num_decodes] = attn.squeeze(2)
    starts = meta.query_start_loc_host
    for i in range(num_decodes, len(meta.seq_lens_host)):
        start, end, length = starts[i], starts[i + 1], meta.seq_lens_host[i]
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, num_heads, q_len, head_dim]
        if length == end - start and (sliding_window is None or length <= sliding_window):
            # The whole sequence is new: plain causal attention over the new keys.
            k = key[start:end].transpose(0, 1).unsqueeze(0)
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            table = meta.block_tables[i:i + 1]
            k = _gather_kv(kv_cache[0], table, length).to(q.dtype)
            v = _gather_kv(kv_cache[1], table, length).to(q.dtype)
            query_pos = torch.arange(length - (end - start), length, device=query.device)
            visible = _visible_keys(query_pos, length, sliding_window)  # [q_len, length]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[None, None], scale=scale,
                                                  enable_gqa=True)
        out[start:end] = attn.squeeze(0).transpose(0, 1)
    return out


# ---- references of the Triton kernels (tidemind/kernels/*.py), one per kernel, same signature ----


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32: row p = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_scaling.

    inv_freq: [head_dim // 2] float32. The angles are computed with the same float32 expression as
    RotaryEmbedding.cos_sin (layers/rotary.py), so a cached row is bit-identical to the per-step one.
    """
    positions = torch.arange(max_positions, device=inv_freq.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
    half = freqs.shape[1]
    emb = torch.cat((freqs, freqs), dim=-1)  # the per-step layout, so cos/sin see the same tensors
    cache = torch.cat((emb.cos()[:, :half], emb.sin()[:, :half]), dim=-1)
    if attention_scaling != 1.0:
        cache = cache * attention_scaling
    return cache.contiguous()


def rotary_embedding_cached(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of query [T, H * D] and key [T, KVH * D] ("rotate half" layout); the inputs are
    left as they are (the Triton twin rotates in place).

    positions: [T] int32 / int64; cos_sin_cache: [max_positions, D] float32 from build_cos_sin_cache.
    cos and sin are cast to the inputs' dtype and the rotation is computed in that dtype, exactly as
    Hugging Face does, so float32 results are bit-identical to transformers'.
    """
    num_tokens = query.shape[0]
    head_dim = cos_sin_cache.shape[1]
    half = head_dim // 2
    rows = cos_sin_cache.index_select(0, positions.long())  # [T, D]
    cos = rows[:, :half].repeat(1, 2).to(query.dtype)  # [T, D]: both halves hold the same angles
    sin = rows[:, half:].repeat(1, 2).to(query.dtype)
    q, k = rotary_embedding(query.reshape(num_tokens, -1, head_dim), key.reshape(num_tokens, -1, head_dim), cos, sin)
    return q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)


def write_kv_cache_split(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """Store token t's key and value in flat slot slot_mapping[t] (block_id * block_size + offset) of
    key_cache / value_cache [num_blocks, block_size, KVH, D], cast to the cache dtype; tokens whose
    slot is negative (padding rows of a CUDA-graph batch) are skipped.

    key, value: [T, KVH, D]; slot_mapping: [T] int32 / int64.
    """
    num_kv_heads, head_dim = key_cache.shape[-2:]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(value_cache.dtype))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: Optional[int] = None, max_seq_len: Optional[int] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each sequence's last token over its cached keys.

    query: [B, H, D], the token at position seq_lens[b] - 1 (its K/V already cached);
    key_cache, value_cache: [num_blocks, block_size, KVH, D]; block_tables: [B, W] (every entry a
    valid block id, padding included); seq_lens: [B] (0 for a padding row, whose output is zeros);
    max_seq_len: host upper bound of seq_lens (None: W * block_size), the length gathered here.
    Query head h reads kv head h // (H // KVH). A window w keeps keys j > seq_len - 1 - w.
    Returns out [B, H, D] in query's dtype (written into `out` when given).
    """
    block_size = key_cache.shape[1]
    length = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    length = max(1, min(length, block_tables.shape[1] * block_size))
    k = _gather_kv(key_cache, block_tables, length).to(query.dtype)  # [B, KVH, length, D]
    v = _gather_kv(value_cache, block_tables, length).to(query.dtype)
    last = seq_lens.long() - 1  # [B] position of the query
    visible = _visible_keys(last, length, sliding_window)  # [B, length]
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
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of S sequences' new tokens over their whole cached context (chunked prefill).

    query: [T, H, D], rows query_start_loc[s] .. query_start_loc[s + 1] belong to sequence s, which
    has seq_lens[s] cached tokens including its q_len new ones (their K/V written already):

        positions  0 ...................... seq_len - q_len ........ seq_len - 1
                   [ earlier context (cache) | the q_len new query rows         ]

    query row j of s sits at position seq_len - q_len + j and sees keys i <= its position (and,
    with a window w, i > position - w). block_tables: [S, W]; query_start_loc: [S + 1];
    max_query_len: unused here (the kernel's grid size). Rows of `out` past query_start_loc[S] are
    left as they are. Returns out [T, H, D] in query's dtype.
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
        k = _gather_kv(key_cache, block_tables[s:s + 1], length).to(q.dtype)  # [1, KVH, length, D]
        v = _gather_kv(value_cache, block_tables[s:s + 1], length).to(q.dtype)
        if length == end - start and (sliding_window is None or length <= sliding_window):
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            query_pos = torch.arange(length - (end - start), length, device=query.device)
            visible = _visible_keys(query_pos, length, sliding_window)  # [q_len, length]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[None, None], scale=scale,
                                                  enable_gqa=True)
        out[start:end] = attn.squeeze(0).transpose(0, 1)
    return out
