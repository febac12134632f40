"""The layer kernels (norms, rotary, gated activations, the greedy choice) as one set, chosen once
at start-up.

Layers receive a KernelSet through the model's BuildContext and call its functions; they never
import a kernel module. "reference" is kernels/reference.py (torch; the CPU path and the
definition every kernel is tested against); "triton" holds the Triton twins, imported only when
chosen; "cpu" the C kernels of kernels/cpu (float32, chosen with the cpu attention backend). Both sets compute the same functions; the Triton ones may work in place (see each kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from . import reference

KERNEL_SETS: Tuple[str, ...] = ("reference", "triton", "cpu")


@dataclass(frozen=True)
class KernelSet:
    name: str
    # (x [n, hidden], weight [hidden], eps, weight_offset) -> [n, hidden]
    rms_norm: Callable
    # (x, residual, weight, eps, weight_offset) -> (rms_norm(x + residual), x + residual)
    add_rms_norm: Callable
    # (query [T, H*D], key [T, KVH*D], positions [T], cos_sin_cache [max_pos, D]) -> rotated (query, key)
    rotary_embedding: Callable
    silu_and_mul: Callable  # gate_up [n, 2d] -> [n, d]
    gelu_tanh_and_mul: Callable  # gate_up [n, 2d] -> [n, d]
    # logits [rows, vocab] float32 -> [rows] int64: each row's first largest index (greedy decoding)
    greedy_ids: Callable = reference.greedy_ids


REFERENCE_KERNELS = KernelSet(
    name="reference", rms_norm=reference.rms_norm, add_rms_norm=reference.add_rms_norm,
    rotary_embedding=reference.rotary_embedding_cached, silu_and_mul=reference.silu_and_mul,
    gelu_tanh_and_mul=reference.gelu_tanh_and_mul)


def _triton_kernels() -> KernelSet:
    from . import activation, rms_norm, rotary

    return KernelSet(name="triton", rms_norm=rms_norm.rms_norm, add_rms_norm=rms_norm.add_rms_norm,
                     rotary_embedding=rotary.rotary_embedding, silu_and_mul=activation.silu_and_mul,
                     gelu_tanh_and_mul=activation.gelu_tanh_and_mul)


def _cpu_kernels() -> KernelSet:
    from .cpu.library import kernels

    cpu = kernels()

    def rms_norm(x, weight, eps, weight_offset=0.0):
        return cpu.rms_norm(x, weight, eps, weight_offset).view(x.shape)

    def add_rms_norm(x, residual, weight, eps, weight_offset=0.0):
        normed, summed = cpu.add_rms_norm(x, residual, weight, eps, weight_offset)  # in place when rows are dense
        return normed.view(x.shape), summed.view(residual.shape)

    return KernelSet(name="cpu", rms_norm=rms_norm, add_rms_norm=add_rms_norm, rotary_embedding=cpu.rope,
                     silu_and_mul=cpu.silu_and_mul, gelu_tanh_and_mul=cpu.gelu_tanh_and_mul,
                     greedy_ids=cpu.argmax_rows)


def kernel_set(name: str) -> KernelSet:
    """The kernels an attention-backend-style name stands for ("reference", "triton" or "cpu")."""
    if name == "reference":
        return REFERENCE_KERNELS
    if name == "triton":
        return _triton_kernels()
    if name == "cpu":
        return _cpu_kernels()
    raise ValueError(f"kernel set {name!r} is not one of {', '.join(KERNEL_SETS)}")


def default_kernel_set(device: torch.device) -> str:
    """Triton on a CUDA device where it is installed, else the torch reference."""
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reference"
    return "triton"
