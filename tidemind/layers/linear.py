"""Linear layers whose weight storage and matmul are delegated to a LinearMethod.

The method decides which parameters a layer holds (a plain [out, in] weight today; packed int4
weights, scales and zeros for AWQ later) and how `x @ W.T` is computed. Layers only know their
logical shapes and, for merged projections, where each checkpoint tensor lands:

    MergedLinear (e.g. gate_up_proj, output_sizes = [inter, inter])
      output rows  [0, inter)        <- shard "gate" (index 0; gate_proj.weight)
      output rows  [inter, 2*inter)  <- shard "up"   (index 1; up_proj.weight)

Tensor parallelism will slice those same shard ranges per rank, so shard bookkeeping lives here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

ShardId = Union[int, str]


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects for it."""


def check_shape(what: str, expected: Sequence[int], found: Sequence[int]) -> None:
    if tuple(expected) != tuple(found):
        raise WeightShapeError(f"{what}: expected shape {tuple(expected)}, found {tuple(found)} in the checkpoint; "
                               f"the checkpoint does not match its config.json (fix the config or re-export "
                               f"the model)")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None):
    """Copy a whole tensor into a parameter (dtype and device converted by copy_)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not merged; got shard {shard_id!r}")
    check_shape("weight", param.shape, loaded_weight.shape)
    param.data.copy_(loaded_weight)


class LinearMethod:
    """How a linear layer stores its weight and applies it. Quantized methods subclass this."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights for the device's kernels (called once, after loading)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [output_size, input_size] in the model dtype."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.register_parameter("weight", nn.Parameter(torch.empty(output_size, input_size), requires_grad=False))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class OneDNNPackedLinearMethod(UnquantizedLinearMethod):
    """Dense float32 weights on the CPU, repacked once into oneDNN's blocked layout.

    At the small batches of decoding this runs 1.4-2x faster than F.linear on the same weights
    (measured on AVX2 cores). The dense weight is dropped after packing: the packed copy is the
    layer's only weight from then on.
    """

    # Batch size oneDNN optimizes the layout for; any batch size works with it.
    PACK_FOR_BATCH = 32

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.data, self.PACK_FOR_BATCH)
        layer.weight = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")


class Linear(nn.Module):
    """y = x @ W.T + b with W loaded whole from one checkpoint tensor.

    Parameters are loaded through the module's `weight_loader(param, tensor, shard_id)` (looked up
    on the module, not on the parameter: materializing a meta-built model makes new Parameters).

    forward: x [num_tokens, input_size] -> [num_tokens, output_size]
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: Optional[LinearMethod] = None):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, input_size, output_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, loaded shard by shard.

    output_sizes[i] rows belong to shard i; `shard_names` gives the shards string ids too
    (e.g. ("q", "k", "v")). Every shard of every parameter of this module must be loaded.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 shard_names: Optional[Sequence[str]] = None, linear_method: Optional[LinearMethod] = None):
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names) if shard_names is not None else [str(i) for i in
                                                                             range(len(output_sizes))]
        if len(self.shard_names) != len(self.output_sizes):
            raise ValueError(f"{len(self.shard_names)} shard names for {len(self.output_sizes)} outputs")
        super().__init__(input_size, sum(self.output_sizes), bias, linear_method)

    def shard_range(self, shard_id: ShardId) -> Tuple[int, int]:
        """(offset, size) of a shard's rows in the merged output dim."""
        index = self.shard_names.index(shard_id) if isinstance(shard_id, str) else shard_id
        offset = sum(self.output_sizes[:index])
        return offset, self.output_sizes[index]

    def shard_offsets(self) -> Dict[str, Tuple[int, int]]:
        return {name: self.shard_range(name) for name in self.shard_names}

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        if shard_id is None:
            # An already merged checkpoint tensor (e.g. our own converted format).
            default_weight_loader(param, loaded_weight)
            return
        offset, size = self.shard_range(shard_id)
        target = param.data.narrow(0, offset, size)  # weight: [size, input_size]; bias: [size]
        check_shape(f"shard {shard_id!r}", target.shape, loaded_weight.shape)
        target.copy_(loaded_weight)


class QKVLinear(MergedLinear):
    """q, k and v projections in one matmul: output = [q (H*D) | k (KVH*D) | v (KVH*D)]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 linear_method: Optional[LinearMethod] = None):
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias=bias, shard_names=("q", "k", "v"), linear_method=linear_method)

    def split(self, qkv: torch.Tensor) -> List[torch.Tensor]:
        # qkv: [num_tokens, (H + 2 * KVH) * D] -> q [num_tokens, H*D], k and v [num_tokens, KVH*D] (views)
        return list(qkv.split(self.output_sizes, dim=-1))
