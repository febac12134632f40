"""GGUF quantized blocks -> the integers and scales they hold, with nothing rounded.

A quantized GGUF tensor of R rows and C columns is stored row by row in blocks of 32 values (the
legacy types) or super-blocks of 256 (the K-quants). Every type supported here decodes to

    q  int8    [R, C]         w = d * q + m   in float32, bit-equal to gguf-py's dequantization
    d  float32 [R, C / G]     (G = 32, or 16 where the type has a scale per 16 values)
    m  float32 [R, C / G]

Block layouts (little-endian; "half" is IEEE binary16), values j = 0..31 of a 32-block:

    Q4_0  18 B: d half | qs[16]: q_j = qs[j] & 15, q_{j+16} = qs[j] >> 4     w = d (q - 8)
    Q4_1  20 B: d half, m half | qs[16] as Q4_0                               w = d q + m
    Q5_0  22 B: d half | qh u32 | qs[16]: 4 low bits as Q4_0, bit 4 of q_j = bit j of qh
                                                                              w = d (q - 16)
    Q5_1  24 B: d half, m half | qh u32 | qs[16] as Q5_0                      w = d q + m
    Q8_0  34 B: d half | q int8[32]                                           w = d q
  and of a 256-value super-block, 8 sub-blocks of 32 (Q4_K, Q5_K) or 16 of 16 (Q6_K):
    Q4_K 144 B: d half, dmin half | scales[12]: 6-bit scale sc_s and min mn_s of sub-block s |
                qs[128]: 32-byte chunk i holds sub-block 2i in low nibbles, 2i + 1 in high ones
                                                                              w = (d sc_s) q - (dmin mn_s)
    Q5_K 176 B: d half, dmin half | scales[12] as Q4_K | qh[32]: bit s of qh[l] is bit 4 of value
                l of sub-block s | qs[128] as Q4_K                            w as Q4_K
    Q6_K 210 B: ql[128] | qh[64] | scales int8[16] | d half. Value l (0..31) of the 32-value row
                r = 4 h + 2 u + t (h, u, t in {0, 1}; rows 0..7): low 4 bits from ql[64 h + 32 t + l]
                (its low nibble for u = 0, high for u = 1), high 2 bits from qh[32 h + l] >> 2 (2 u + t);
                the 16-value sub-block s (of the 256) has scale sc_s
                                                                              w = (d sc_s) (q - 32)

Symmetric types store q - offset (q - 8, q - 16, q - 32) with m = 0, so that d * q reproduces
gguf-py's float32 products exactly; K-quants fold the super-block scale into d and m per sub-block
(a half times a 6- or 8-bit integer: exact in float32).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from gguf import GGMLQuantizationType as T

# inputs per (d, m) pair of each decodable type
GROUP_SIZES: Dict[T, int] = {T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q4_K: 32,
                             T.Q5_K: 32, T.Q6_K: 16}
# bytes per block, values per block
_BLOCKS: Dict[T, Tuple[int, int]] = {T.Q4_0: (18, 32), T.Q4_1: (20, 32), T.Q5_0: (22, 32), T.Q5_1: (24, 32),
                                     T.Q8_0: (34, 32), T.Q4_K: (144, 256), T.Q5_K: (176, 256), T.Q6_K: (210, 256)}

Decoded = Tuple[np.ndarray, np.ndarray, np.ndarray]  # q int8 [R, C], d, m float32 [R, C / G]


def decodable(qtype: T) -> bool:
    return qtype in _BLOCKS


def _half(raw: np.ndarray) -> np.ndarray:
    # raw [blocks, 2] uint8 -> [blocks, 1] float32
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # qs [blocks, 16] -> [blocks, 32]: low nibbles are values 0..15, high nibbles 16..31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    # qh [blocks, 4] (a little-endian u32) -> [blocks, 32] with bit j of the word in value j
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _legacy(qtype: T, blocks: np.ndarray) -> Decoded:
    """blocks [n, bytes] of a 32-value type -> q [n, 32], d [n, 1], m [n, 1]."""
    d = _half(blocks[:, 0:2])
    zero = np.zeros_like(d)
    if qtype == T.Q8_0:
        return blocks[:, 2:34].view(np.int8), d, zero
    if qtype == T.Q4_0:
        return (_nibbles(blocks[:, 2:18]).astype(np.int8) - 8), d, zero
    if qtype == T.Q4_1:
        return _nibbles(blocks[:, 4:20]).astype(np.int8), d, _half(blocks[:, 2:4])
    if qtype == T.Q5_0:
        q = _nibbles(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << 4)
        return q.astype(np.int8) - 16, d, zero
    q = _nibbles(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << 4)  # Q5_1
    return q.astype(np.int8), d, _half(blocks[:, 2:4])


def _k_scales(scales: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K scales[12] -> 6-bit (sc, mn) of the 8 sub-blocks, each [n, 8]. Bytes 0..3 hold
    sc_0..3 (low 6 bits) and the top 2 bits of sc_4..7; bytes 4..7 the same for the mins; bytes
    8..11 the low 4 bits of sc_4..7 (low nibble) and mn_4..7 (high nibble)."""
    lo_sc, lo_mn, rest = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (rest & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_mn & 0x3F, (rest >> 4) | ((lo_mn >> 6) << 4)], axis=-1)
    return sc, mn


def _k_quant(qtype: T, blocks: np.ndarray) -> Decoded:
    """blocks [n, bytes] of a 256-value type -> q [n, 256], d and m [n, 256 / G]."""
    n = blocks.shape[0]
    if qtype == T.Q6_K:
        ql, qh = blocks[:, 0:128].reshape(n, 2, 2, 32), blocks[:, 128:192].reshape(n, 2, 1, 32)
        low = np.stack([ql & 0x0F, ql >> 4], axis=2)  # [n, h, u, t, 32]
        shifts = (2 * (2 * np.arange(2)[:, None] + np.arange(2)[None, :])).astype(np.uint8)  # [u, t] -> 2 (2u + t)
        high = (qh[:, :, None, :, :] >> shifts[None, None, :, :, None]) & 3  # [n, h, u, t, 32]
        q = (low | (high << 4)).reshape(n, 256).astype(np.int8) - 32
        d = _half(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)
        return q, d, np.zeros_like(d)
    dmax, dmin = _half(blocks[:, 0:2]), _half(blocks[:, 2:4])
    sc, mn = _k_scales(blocks[:, 4:16])
    qs = blocks[:, -128:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block 2i, 2i + 1 of chunk i
    if qtype == T.Q5_K:
        qh = blocks[:, 16:48].reshape(n, 1, 32)
        q = q | (((qh >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4)
    return q.reshape(n, 256).astype(np.int8), dmax * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def decode_blocks(data: np.ndarray, qtype: T, cols: int) -> Decoded:
    """data: uint8 [R, bytes per row] as gguf-py reads a quantized tensor -> (q, d, m) (module docstring)."""
    if not decodable(qtype):
        raise ValueError(f"GGUF type {qtype.name} cannot be kept quantized (decodable: "
                         f"{', '.join(t.name for t in _BLOCKS)})")
    block_bytes, block_values = _BLOCKS[qtype]
    rows = data.shape[0]
    if cols % block_values or data.shape[-1] != cols // block_values * block_bytes:
        raise ValueError(f"a {qtype.name} row of {cols} values should take {cols // block_values * block_bytes} "
                         f"bytes, found {data.shape[-1]}: the GGUF file is damaged")
    blocks = np.ascontiguousarray(data).reshape(-1, block_bytes)
    q, d, m = (_legacy if block_values == 32 else _k_quant)(qtype, blocks)
    return (np.ascontiguousarray(q).reshape(rows, cols), np.ascontiguousarray(d, dtype=np.float32).reshape(rows, -1),
            np.ascontiguousarray(m, dtype=np.float32).reshape(rows, -1))


def dequantize(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """w = d * q + m, [R, C] float32 (the group size follows from the shapes)."""
    group = q.shape[1] // d.shape[1]
    return np.repeat(d, group, axis=1) * q.astype(np.float32) + np.repeat(m, group, axis=1)
