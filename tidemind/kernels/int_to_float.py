"""Small integers to float32 without the int-to-float instruction, for the kernels that dequantize
8- and 4-bit KV cache values in registers (the W4A16 kernels go further: their nibbles become
floats by masking alone, kernels/w4a16_layout.py awq_unpack_biased).

A GPU converts int to float at a fraction of its float rate (on Hopper a quarter of the FMA rate or
less). Adding v to the bits of 1.5 * 2^23 gives the bits of the float 1.5 * 2^23 + v whenever
|v| < 2^22 (v lands in the mantissa), so one integer add, a free reinterpretation and one float
subtract give v exactly: the same value as v.to(tl.float32), on full-rate instructions.
"""
from __future__ import annotations

import triton
import triton.language as tl

# constexpr: a jitted function reads only globals made with tl.constexpr (the interpreter reads any)
_MAGIC_BITS = tl.constexpr(0x4B400000)  # 1.5 * 2^23 as float32 bits
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def small_int_to_float(v):
    """v: int32 tensor with |v| < 2^22 -> float32, exactly v.to(tl.float32)."""
    return (v + _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
