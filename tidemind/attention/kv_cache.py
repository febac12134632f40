"""One layer's paged KV cache: its data and, when quantized (quant_policy 8 or 4), its scales.

The attention backends receive one LayerKVCache per layer; the runner allocates them
(runner/kv_cache.py). Keys are index 0, values index 1; a block id indexes data and scales alike:

    quant_policy 0  data   [2, num_blocks, block_size, num_kv_heads, head_dim]       model dtype
    quant_policy 8  data   [2, num_blocks, block_size, num_kv_heads, head_dim]       uint8, one value a byte
    quant_policy 4  data   [2, num_blocks, block_size, num_kv_heads, head_dim // 2]  uint8, two values a byte
                    scales [2, num_blocks, block_size, num_kv_heads, 2]               float16: (scale, zero)

Quantization is online (written by the KV-write path as tokens arrive, no calibration), one
(scale, zero) per token, head and K/V row of head_dim values, asymmetric:

    zero  = float16(min(x) rounded down)        scale = float16((max(x) - zero) / qmax, rounded up)
    q     = clamp(floor((x - zero) / scale + 0.5), 0, qmax)      qmax = 255 (int8) or 15 (int4)
    x'    = q * scale + zero                                     (in float32, then the model dtype)

Rounding zero down and the scale up when they are stored in float16 keeps every x of the row in
[zero, zero + qmax * scale], so |x' - x| <= scale / 2 for every element (rows must stay within
float16's range, |x| <= 65504; beyond it values saturate). kernels/reference.py (quantize_kv,
dequantize_kv) is the definition; kernels/kv_cache.py holds the Triton twins the kernels share.

int4 packing, along head_dim in split halves: byte j of a row holds element j in its low nibble and
element j + head_dim / 2 in its high nibble, so a kernel reads a [tokens, head_dim] tile as bytes
d % (head_dim / 2) shifted right by 4 * (d >= head_dim / 2), with no shuffles.

Bytes of one (token, head) K or V row: head_dim x element size unquantized; head_dim + 4 (int8) or
head_dim / 2 + 4 (int4) quantized. At head_dim 128 against a 16-bit cache that is 256 / 132 =
1.939x the tokens (int8) and 256 / 68 = 3.76x (int4): LMDeploy's layout and ratios.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

KV_QUANT_POLICIES = (0, 4, 8)
KV_SCALES_DTYPE = torch.float16
_SCALES_BYTES = 2 * 2  # (scale, zero) in float16, per (token, head) row


def check_kv_quant(quant_policy: int, head_dim: int) -> None:
    """Raise ValueError naming the fix when a model's KV rows cannot be stored with quant_policy."""
    if quant_policy not in KV_QUANT_POLICIES:
        raise ValueError(f"quant_policy={quant_policy!r} is not one of 0 (none), 4 (int4), 8 (int8)")
    if quant_policy == 4 and head_dim % 2:
        raise ValueError(f"quant_policy=4 packs two 4-bit values a byte along head_dim, and this model's head_dim "
                         f"is {head_dim} (odd): use quant_policy 8 or 0")


def kv_dtype_name(dtype: torch.dtype, quant_policy: int) -> str:
    """What a KV cache stores, for logs: the model dtype's name, or int8 / int4."""
    return f"int{quant_policy}" if quant_policy else str(dtype).replace("torch.", "")


def kv_row_bytes(head_dim: int, dtype: torch.dtype, quant_policy: int) -> int:
    """Bytes of one (token, head) key or value row, scales included."""
    if quant_policy == 0:
        return head_dim * torch.empty((), dtype=dtype).element_size()
    return head_dim * quant_policy // 8 + _SCALES_BYTES


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's paged KV cache (shapes in the module docstring)."""

    data: torch.Tensor
    scales: Optional[torch.Tensor] = None  # None when quant_policy is 0
    quant_policy: int = 0  # 0, or the bits of a stored value (8, 4): the kernels' kv_bits

    def __post_init__(self):
        if (self.scales is None) != (self.quant_policy == 0):
            raise ValueError(f"quant_policy={self.quant_policy} needs scales exactly when it is not 0")

    @property
    def key(self) -> torch.Tensor:  # [num_blocks, block_size, num_kv_heads, head_dim // pack]
        return self.data[0]

    @property
    def value(self) -> torch.Tensor:
        return self.data[1]

    @property
    def key_scales(self) -> Optional[torch.Tensor]:  # [num_blocks, block_size, num_kv_heads, 2]; None unquantized
        return None if self.scales is None else self.scales[0]

    @property
    def value_scales(self) -> Optional[torch.Tensor]:
        return None if self.scales is None else self.scales[1]

    @property
    def num_blocks(self) -> int:
        return self.data.shape[1]

    @property
    def block_size(self) -> int:
        return self.data.shape[2]

    def quant_args(self) -> dict:
        """The keyword arguments the KV write and attention functions (Triton and reference) take
        for this cache: key_scales / value_scales [num_blocks, block_size, num_kv_heads, 2] and
        kv_bits (0: unquantized, no scales)."""
        if self.scales is None:
            return {}
        return {"key_scales": self.key_scales, "value_scales": self.value_scales, "kv_bits": self.quant_policy}
