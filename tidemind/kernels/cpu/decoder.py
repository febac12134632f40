"""Decoder layers as one C call each (csrc/decoder_layer.c tm_decoder_layer), for the CPU
stored-precision path.

The per-op path makes ~10 Python calls a layer (norms, linear segments, rope, attention, the gated
activation), each a few microseconds of Python and ctypes: at batch 1 that is as long as the
arithmetic. Here a tm_layer struct per layer (pointers to the packed weights, norm weights and
biases, the sizes) is built once, after loading; each step fills one tm_step struct (positions,
rotary table, the attention metadata's arrays) and calls the layer function once per layer with
the hidden and residual rows, which it updates in place. The C side runs the same kernels in the
same order as the per-op path, so the results are the same, bit for bit.

Which layers qualify is decided by the model (models/cpu_layers.py); this module knows only
structs and pointers.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .ops import CPUKernels, PackedQWeight

_P, _I = ctypes.c_void_p, ctypes.c_int64
MAX_SEGMENTS = 4  # TM_MAX_SEGMENTS of csrc/tm_cpu.h
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


class LinearStruct(ctypes.Structure):
    """tm_linear of csrc/tm_cpu.h."""

    _fields_ = [("count", _I), ("start", _I * MAX_SEGMENTS), ("w", _P * MAX_SEGMENTS), ("bias", _P)]


class LayerStruct(ctypes.Structure):
    """tm_layer of csrc/tm_cpu.h."""

    _fields_ = [("qkv", LinearStruct), ("o", LinearStruct), ("gate_up", LinearStruct), ("down", LinearStruct),
                ("input_norm", _P), ("post_norm", _P), ("eps", ctypes.c_float), ("norm_offset", ctypes.c_float),
                ("scale", ctypes.c_float), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I),
                ("inter", _I), ("window", _I), ("act", _I)]


class StepStruct(ctypes.Structure):
    """tm_step of csrc/tm_cpu.h."""

    _fields_ = [("ntokens", _I), ("positions", _P), ("pos64", _I), ("cos_sin", _P), ("ldcs", _I), ("slots", _P),
                ("seq_lens", _P), ("query_start", _P), ("block_tables", _P), ("bt_stride", _I), ("nseqs", _I),
                ("block_size", _I), ("nthreads", _I)]


@dataclass
class FusedLinear:
    """A quantized linear layer as the layer call takes it: (first output, outputs, weight) runs."""

    segments: Sequence[Tuple[int, int, PackedQWeight]]
    bias: Optional[torch.Tensor]  # float32 [n], or None


@dataclass
class LayerSpec:
    """Everything one decoder layer's call needs, taken from the model once after loading."""

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear
    input_norm: torch.Tensor  # float32 [hidden]
    post_norm: torch.Tensor
    eps: float
    norm_offset: float
    scale: float  # attention
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    window: int  # 0: none
    act: str  # a key of ACTIVATIONS


def _linear_struct(linear: FusedLinear, keep: list) -> LinearStruct:
    if not 1 <= len(linear.segments) <= MAX_SEGMENTS:
        raise ValueError(f"a fused linear layer takes 1 to {MAX_SEGMENTS} segments, got {len(linear.segments)}")
    struct = LinearStruct()
    struct.count = len(linear.segments)
    for i, (start, width, packed) in enumerate(linear.segments):
        if width != packed.n:
            raise ValueError(f"segment of {width} outputs holds a weight of {packed.n}")
        struct.start[i] = start
        struct.w[i] = packed.address
        keep.append(packed)
    if linear.bias is not None:
        bias = linear.bias.detach().float().contiguous()
        keep.append(bias)
        struct.bias = bias.data_ptr()
    return struct


def _float_vector(x: torch.Tensor, size: int, keep: list) -> int:
    x = x.detach().float().contiguous()
    if x.shape != (size,):
        raise ValueError(f"expected a vector of {size}, got {tuple(x.shape)}")
    keep.append(x)
    return x.data_ptr()


class FusedDecoderLayers:
    """The model's decoder layers as C calls. run() takes the hidden rows after the embedding and
    returns (hidden, residual) as the per-op loop leaves them before the final norm."""

    def __init__(self, kernels: CPUKernels, specs: List[LayerSpec]):
        self.isa = kernels.isa
        self.head_dim = specs[0].head_dim
        self.hidden = specs[0].hidden
        self._fn = getattr(kernels._lib, f"tm_decoder_layer_{kernels.isa}")
        self._fn.argtypes, self._fn.restype = [_P, _P, _P, _P, _I, _P, _I], None
        self._keep: list = []  # the tensors the structs point into
        self._structs = [self._layer_struct(spec) for spec in specs]
        self._addresses = [ctypes.addressof(s) for s in self._structs]
        self._step = StepStruct()
        self._step_address = ctypes.addressof(self._step)

    def __len__(self) -> int:
        return len(self._structs)

    def _layer_struct(self, spec: LayerSpec) -> LayerStruct:
        if spec.head_dim != self.head_dim or spec.hidden != self.hidden:
            raise ValueError("every fused layer must share the model's hidden size and head_dim")
        if spec.head_dim > 1024:
            raise ValueError(f"the CPU attention kernel handles head_dim up to 1024, not {spec.head_dim}")
        keep = self._keep
        return LayerStruct(
            qkv=_linear_struct(spec.qkv, keep), o=_linear_struct(spec.o, keep),
            gate_up=_linear_struct(spec.gate_up, keep), down=_linear_struct(spec.down, keep),
            input_norm=_float_vector(spec.input_norm, spec.hidden, keep),
            post_norm=_float_vector(spec.post_norm, spec.hidden, keep), eps=spec.eps, norm_offset=spec.norm_offset,
            scale=spec.scale, hidden=spec.hidden, heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
            inter=spec.inter, window=spec.window or 0, act=ACTIVATIONS[spec.act])

    def accepts(self, hidden: torch.Tensor, table: torch.Tensor, kv_caches, meta) -> bool:
        """Whether this step can run here: the CPU attention backend's metadata, a float32
        unquantized cache (the runner allocates every layer's alike: the first stands for all), a
        rotary table as wide as head_dim. Otherwise the model runs its per-op path."""
        args = getattr(meta, "args", None)
        if args is None or len(kv_caches) != len(self._structs) or hidden.dtype != torch.float32:
            return False
        cache = kv_caches[0]
        return (not cache.quant_policy and cache.data.dtype == torch.float32 and cache.data.is_contiguous()
                and table.dtype == torch.float32 and table.dim() == 2 and table.shape[1] == self.head_dim
                and table.stride(1) == 1)

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, kv_caches,
            meta) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden [t, hidden] float32 (overwritten) -> (hidden, residual) after the last layer."""
        hidden = hidden.reshape(-1, self.hidden).contiguous()
        residual = torch.empty_like(hidden)
        positions = positions.contiguous()
        if positions.dtype not in (torch.int32, torch.int64) or positions.numel() != hidden.shape[0]:
            raise ValueError("positions must be int32 or int64, one per token")
        slots, seq_lens, query_start, tables, bt_stride, seqs, block_size = meta.args
        step = self._step
        step.ntokens = hidden.shape[0]
        step.positions = positions.data_ptr()
        step.pos64 = int(positions.dtype == torch.int64)
        step.cos_sin = table.data_ptr()
        step.ldcs = table.stride(0)
        step.slots, step.seq_lens, step.query_start, step.block_tables = slots, seq_lens, query_start, tables
        step.bt_stride, step.nseqs, step.block_size = bt_stride, seqs, block_size
        step.nthreads = torch.get_num_threads()
        fn, step_address = self._fn, self._step_address
        x, res = hidden.data_ptr(), residual.data_ptr()
        first = 1
        for address, cache in zip(self._addresses, kv_caches):
            data = cache.data
            fn(address, step_address, x, res, first, data.data_ptr(), data.stride(0))
            first = 0
        return hidden, residual
