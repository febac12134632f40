"""The CPU kernels of one instruction set, called with torch tensors (float32, on the CPU).

Every call hands raw pointers and sizes to the C library through ctypes: no copies, no torch
dispatch, a few microseconds of Python per call. Tensors whose rows are not contiguous are copied
first (callers get the copy back); the in-place kernels (add_rms_norm, rope) say so.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .qformat import QFormat, describe_format

_P, _I, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int

_SIGNATURES = {
    # name: argument types (all return void)
    "tm_qlinear": [_P, _P, _I, _I, _P, _I, _P, _INT],
    "tm_quantize_rows": [_P, _I, _I, _I, _P, _P, _P],
    "tm_rms_norm": [_P, _I, _P, _I, _P, _I, _I, _F, _F, _INT],
    "tm_add_rms_norm": [_P, _I, _P, _I, _P, _I, _I, _F, _F, _INT],
    "tm_rope": [_P, _I, _P, _I, _P, _I, _P, _I, _I, _I, _I, _I, _INT],
    "tm_silu_mul": [_P, _I, _P, _I, _I, _I, _INT],
    "tm_gelu_tanh_mul": [_P, _I, _P, _I, _I, _I, _INT],
    "tm_argmax_rows": [_P, _I, _I, _I, _P, _INT],
    "tm_paged_attention": [_P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F, _I, _P,
                           _I, _INT],
}
_COMMON_SIGNATURES = {
    "tm_repack": [_P, _P, _P, _I, _I, _I, _I, _I, _P, _P],
    "tm_qrows": [_P, _P, _I, _I, _P, _I],
}


class QWeightStruct(ctypes.Structure):
    """tm_qweight of csrc/tm_cpu.h."""

    _fields_ = [("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("scale_f16", ctypes.c_int64), ("qs", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


@dataclass(eq=False)
class PackedQWeight:
    """A weight in the kernels' tiles (csrc/tm_cpu.h): n outputs, k inputs, `bits` 4 or 8, one (d, m)
    pair per `group` inputs. The tensors own the memory the struct points into."""

    n: int
    k: int
    group: int
    bits: int
    qs: torch.Tensor  # uint8, the repacked integers
    scales: torch.Tensor  # float16 or float32, [tiles][k / group][2][16]
    struct: QWeightStruct
    address: int  # ctypes.addressof(struct): what the kernels take

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + self.scales.numel() * self.scales.element_size()

    def describe(self) -> str:
        return describe_format(self.bits, self.group, self.scales.dtype == torch.float16)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as float32 [rows, cols] with contiguous rows (a copy only when it is not already)."""
    if x.dtype != torch.float32:
        raise TypeError(f"the CPU kernels compute in float32, got {x.dtype}")
    if x.dim() != 2 or x.stride(-1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    return x


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


class CPUKernels:
    """The kernels of one ISA ("avx512_vnni", "avx2", "scalar"); see library.select_isa."""

    def __init__(self, lib: ctypes.CDLL, isa: str):
        self.isa = isa
        self._lib = lib
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, f"{name}_{isa}")
            fn.argtypes, fn.restype = argtypes, None
            setattr(self, "_" + name[3:], fn)
        for name, argtypes in _COMMON_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
            setattr(self, "_" + name[3:], fn)

    # ---- quantized weights
    def pack(self, fmt: QFormat) -> PackedQWeight:
        """A weight in a format qformat.choose_format made -> the kernels' tiles (csrc/tm_cpu.h)."""
        n, k = fmt.q.shape
        if fmt.bits == 4 and (int(fmt.q.min()) < 0 or int(fmt.q.max()) > 15):
            raise ValueError("4-bit packing needs every q in [0, 15]")
        tiles = -(-n // 16)
        qs = torch.zeros(tiles * k * (8 if fmt.bits == 4 else 16), dtype=torch.uint8)
        scales = torch.empty(tiles * (k // fmt.group) * 32, dtype=torch.float16 if fmt.scale_f16 else torch.float32)
        q, d, m = fmt.q.to(torch.int8).contiguous(), fmt.d.float().contiguous(), fmt.m.float().contiguous()
        self._repack(q.data_ptr(), d.data_ptr(), m.data_ptr(), n, k, fmt.group, fmt.bits, int(fmt.scale_f16),
                     qs.data_ptr(), scales.data_ptr())
        struct = QWeightStruct(n, k, fmt.group, fmt.bits, int(fmt.scale_f16), qs.data_ptr(), scales.data_ptr())
        return PackedQWeight(n, k, fmt.group, fmt.bits, qs, scales, struct, ctypes.addressof(struct))

    def qlinear(self, w: PackedQWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [m, k] float32 -> [m, n]: x @ W.T (+ bias), x quantized per row to int8 blocks of 32.
        out: where to write, a float32 [m, n] view whose rows are contiguous (columns of a wider
        output, say); made when None."""
        x = _rows(x)
        m = x.shape[0]
        if x.shape[1] != w.k:
            raise ValueError(f"input of {x.shape[1]} features for a weight of {w.k} inputs")
        if out is None:
            out = torch.empty((m, w.n), dtype=torch.float32)
        elif out.shape != (m, w.n) or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"out must be float32 [{m}, {w.n}] with contiguous rows")
        if bias is not None:
            bias = bias.float().contiguous()
        if m:
            self._qlinear(w.address, x.data_ptr(), x.stride(0), m, out.data_ptr(), out.stride(0), _ptr(bias),
                          torch.get_num_threads())
        return out

    def qrows(self, w: PackedQWeight, ids: torch.Tensor) -> torch.Tensor:
        """ids [t] int32 / int64 -> rows of W, dequantized: [t, k] float32 (an embedding lookup)."""
        ids = ids.reshape(-1).contiguous()
        out = torch.empty((ids.numel(), w.k), dtype=torch.float32)
        if ids.numel():
            self._qrows(w.address, ids.data_ptr(), int(ids.dtype == torch.int64), ids.numel(), out.data_ptr(), w.k)
        return out

    def quantize_rows(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The activation quantization the linear kernels apply: (xq int8 [m, k], dx [m, k/32], sx [m, k/16])."""
        x = _rows(x)
        m, k = x.shape
        xq = torch.empty((m, k), dtype=torch.int8)
        dx, sx = torch.empty((m, k // 32)), torch.empty((m, k // 16))
        self._quantize_rows(x.data_ptr(), x.stride(0), m, k, xq.data_ptr(), dx.data_ptr(), sx.data_ptr())
        return xq, dx, sx

    # ---- layer ops (float32)
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
        x = _rows(x)
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), weight.data_ptr(), x.shape[0],
                       x.shape[1], eps, offset, torch.get_num_threads())
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual), written over x and residual."""
        x, residual = _rows(x), _rows(residual)
        self._add_rms_norm(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), weight.data_ptr(),
                           x.shape[0], x.shape[1], eps, offset, torch.get_num_threads())
        return x, residual

    def rope(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate query [t, h * d] and key [t, kvh * d] in place by their positions' rows of
        cos_sin_cache [max_pos, d] (rotate-half layout); returns them."""
        query, key = _rows(query), _rows(key)
        d = cos_sin_cache.shape[1]
        positions = positions.contiguous()
        self._rope(query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0), positions.data_ptr(),
                   int(positions.dtype == torch.int64), cos_sin_cache.data_ptr(), cos_sin_cache.stride(0),
                   query.shape[0], query.shape[1] // d, key.shape[1] // d, d, torch.get_num_threads())
        return query, key

    def _gated(self, fn, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = _rows(gate_up)
        inter = gate_up.shape[1] // 2
        out = torch.empty((gate_up.shape[0], inter), dtype=torch.float32)
        fn(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), inter, gate_up.shape[0], inter,
           torch.get_num_threads())
        return out

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [m, n] float32 -> [m] int64: each row's first largest index, as logits.argmax(-1)."""
        logits = _rows(logits)
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax_rows(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], out.data_ptr(),
                          torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gated(self._silu_mul, gate_up)

    def gelu_tanh_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gated(self._gelu_tanh_mul, gate_up)

    def paged_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        step: Tuple, scale: float, window: int) -> torch.Tensor:
        """query [t, h, d], key / value [t, kvh, d] (heads contiguous in a row), kv_cache [2, blocks,
        block_size, kvh, d]; step: (slots, seq_lens, query_start, block_tables, bt_stride, seqs,
        block_size) pointers and sizes of the step (CPUAttentionMetadata.args) -> [t, h, d]."""
        t, h, d = query.shape
        kvh = key.shape[1]
        for x in (query, key, value):
            if x.stride(2) != 1 or x.stride(1) != d:
                raise ValueError("paged_attention wants each row's heads contiguous ([t, heads, d] views of rows)")
        if d > 1024:
            raise ValueError(f"the CPU attention kernel handles head_dim up to 1024, not {d}")
        out = torch.empty((t, h, d), dtype=torch.float32)
        slots, seq_lens, query_start, tables, bt_stride, seqs, block_size = step
        base = kv_cache.data_ptr()
        self._paged_attention(query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0), value.data_ptr(),
                              value.stride(0), base, base + kv_cache.stride(0) * 4, slots, seq_lens, query_start,
                              tables, bt_stride, seqs, t, h, kvh, d, block_size, scale, window or 0,
                              out.data_ptr(), h * d, torch.get_num_threads())
        return out
