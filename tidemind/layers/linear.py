"""Linear layers whose weight storage and matmul are delegated to a LinearMethod.

The method decides which parameters a layer holds (a plain [out, in] weight; packed int4 weights,
scales and zeros for AWQ / GPTQ; int8 weights and scales for W8A8: layers/quantization/) and how
`x @ W.T` is computed. Each parameter carries a ParamLayout (its output / input dims and packing),
so the loader fills all of them the same way. Layers only know their logical shapes and, for merged
projections, where each checkpoint tensor lands:

    MergedLinear (e.g. gate_up_proj, output_sizes = [inter, inter])
      output rows  [0, inter)        <- shard "gate" (index 0; gate_proj.weight)
      output rows  [inter, 2*inter)  <- shard "up"   (index 1; up_proj.weight)

Tensor parallelism (layers/parallel.py) slices those same shard ranges per rank, along each
layout's output dim (column-parallel: q/k/v, gate/up) or input dim (row-parallel: o_proj, down_proj),
so shard bookkeeping lives here too. A column-parallel MergedLinear on rank r of N holds, per shard,
rows [r * size / N, (r + 1) * size / N) of the checkpoint tensor (QKVLinear: its own heads' q and the
kv heads they use), stacked in shard order:

    rank r's gate_up_proj  [gate rows of rank r | up rows of rank r]   (inter / N each)
    rank r's qkv_proj      [q of its heads | k of its kv heads | v of its kv heads]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import SINGLE_RANK, TPError, TPGroup, divide, kv_heads_of_rank

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


@dataclass(frozen=True)
class ParamLayout:
    """Where a parameter's logical dims lie, so that one loader fills dense, packed and
    tensor-parallel-sharded weights alike. Kept on the owning module (`param_layouts[name]`), not on
    the Parameter: materializing a meta-built model makes new Parameters.

        dense weight     [out, in]          output_dim=0, input_dim=1
        AWQ qweight      [in, out / 8]      output_dim=1, input_dim=0, packed_dim=1, pack_factor=8
        GPTQ qweight     [in / 8, out]      output_dim=1, input_dim=0, packed_dim=0, pack_factor=8
        group scales     [in / group, out]  output_dim=1, input_dim=0
        GPTQ g_idx       [in]               output_dim=None (every merged shard holds the same one)
    """

    output_dim: Optional[int] = 0  # dim indexing output features: merged shards are ranges of it
    input_dim: Optional[int] = None  # dim indexing input features (or groups of them): row-parallel slices it
    packed_dim: Optional[int] = None  # dim whose entries each hold pack_factor values
    pack_factor: int = 1
    dtype: Optional[torch.dtype] = None  # kept whatever the model dtype (packed ints, fp16 scales)
    # Values are group numbers of input features (GPTQ's g_idx): a row-parallel shard rebases them
    # to the rank's first group.
    group_index: bool = False

    def shard_slice(self, offset: int, size: int) -> Tuple[int, int]:
        """(offset, size) along output_dim of the output features [offset, offset + size)."""
        if self.packed_dim is not None and self.packed_dim == self.output_dim:
            if offset % self.pack_factor or size % self.pack_factor:
                raise WeightShapeError(f"output features [{offset}, {offset + size}) do not fall on whole packed "
                                       f"entries of {self.pack_factor} values; this quantized layout needs every "
                                       f"merged projection's size to be a multiple of {self.pack_factor}")
            return offset // self.pack_factor, size // self.pack_factor
        return offset, size


DENSE_WEIGHT = ParamLayout(output_dim=0, input_dim=1)
BIAS = ParamLayout(output_dim=0)


def add_param(layer: nn.Module, name: str, shape: Sequence[int], layout: ParamLayout) -> None:
    """Register an empty, frozen parameter with its layout (dtype: layout.dtype, else the default
    dtype, which model.to(dtype) later turns into the model's)."""
    dtype = layout.dtype or torch.get_default_dtype()
    layer.register_parameter(name, nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False))
    if "param_layouts" not in layer.__dict__:
        layer.param_layouts = {}
    layer.param_layouts[name] = layout


def param_layout(module: nn.Module, param: nn.Parameter) -> ParamLayout:
    for name, candidate in module.named_parameters(recurse=False):
        if candidate is param:
            return getattr(module, "param_layouts", {}).get(name, DENSE_WEIGHT)
    raise ValueError(f"parameter of shape {tuple(param.shape)} does not belong to {type(module).__name__}")


def restore_fixed_dtypes(model: nn.Module) -> None:
    """Put back the dtypes layouts fix (fp16 scales, say) after model.to(dtype) converted every
    floating parameter; call it before loading, while the model is still on the meta device."""
    for module in model.modules():
        for name, layout in getattr(module, "param_layouts", {}).items():
            param = getattr(module, name, None)
            if layout.dtype is not None and isinstance(param, nn.Parameter) and param.dtype != layout.dtype:
                module.register_parameter(name, nn.Parameter(param.data.to(layout.dtype), requires_grad=False))


class LinearMethod:
    """How a linear layer (or an embedding table, or the LM head) stores its weight and applies it.

    create_weights registers the layer's parameters with add_param (their layouts tell the loader
    where each checkpoint tensor lands); process_weights_after_loading may repack them once for the
    device's kernels; apply computes x @ W.T (+ bias); embedding looks rows of W up.
    """

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int]) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights for the device's kernels (called once, after loading)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        # ids [num_tokens] -> rows of W [num_tokens, input_size]
        raise NotImplementedError(f"{type(self).__name__} cannot serve as an embedding table; keep the embedding "
                                  f"unquantized (list it in quantization_config.modules_to_not_convert)")


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [output_size, input_size] in the model dtype."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int]) -> None:
        add_param(layer, "weight", (sum(output_sizes), input_size), DENSE_WEIGHT)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


def onednn_rows(num_rows: int) -> int:
    """The row count a oneDNN matmul runs at: exact up to 16 (decode batches), then rounded up to a
    multiple of 16 up to 256 and of 64 beyond. oneDNN compiles and caches a kernel per input shape
    (up to 1,024, tens of KiB each): unbucketed, every new number of tokens in a step added one, and
    a server's RSS crept up for as long as it ran (RELIABILITY.md, soak). The padded rows cost
    little: at these sizes the matmul's time is mostly reading the weights."""
    if num_rows <= 16:
        return num_rows
    step = 16 if num_rows <= 256 else 64
    return -(-num_rows // step) * step


def onednn_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [rows, in] @ packed W.T (+ bias) -> [rows, out], run at onednn_rows(rows) rows."""
    rows = x.shape[0]
    padded = onednn_rows(rows) if x.dim() == 2 else rows
    if padded != rows:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
    out = torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
    return out[:rows] if padded != rows else out


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
        return onednn_linear(x, layer.packed_weight, bias)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("oneDNN-packed weights keep no dense copy to look embedding rows up in")


COLUMN, ROW = "column", "row"  # Linear(parallel=...): which dim tensor parallelism splits


class Linear(nn.Module):
    """y = x @ W.T + b with W loaded from one checkpoint tensor per parameter.

    Parameters are loaded through the module's `weight_loader(param, tensor, shard_id)` (looked up
    on the module, not on the parameter: materializing a meta-built model makes new Parameters);
    each parameter's ParamLayout says where output (and input) features lie in it.

    Tensor parallelism over `tp` (layers/parallel.py): parallel=None keeps the whole weight on every
    rank; COLUMN splits the output features (each rank computes its slice of y, no communication);
    ROW splits the input features (x arrives as the rank's slice; partial outputs are all-reduced
    and the bias is added once, after the reduce). The constructor takes the layer's full sizes;
    input_size, output_size and output_sizes are then what this rank holds (the same at tp 1), the
    loader slices each checkpoint tensor to them.

    forward: x [num_tokens, input_size] -> [num_tokens, output_size]
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: Optional[LinearMethod] = None, output_sizes: Optional[Sequence[int]] = None,
                 parallel: Optional[str] = None, tp: Optional[TPGroup] = None):
        super().__init__()
        if parallel not in (None, COLUMN, ROW):
            raise ValueError(f"parallel={parallel!r} is not one of None, {COLUMN!r}, {ROW!r}")
        self.tp = tp or SINGLE_RANK
        self.parallel = parallel
        self.full_input_size = input_size
        self.full_output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        self.input_size = divide(input_size, self.tp.size, "input features of a row-parallel layer") \
            if parallel == ROW else input_size
        self.output_sizes = self.local_output_sizes() if parallel == COLUMN else list(self.full_output_sizes)
        self.output_size = sum(self.output_sizes)
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self._create_weights()
        if bias:
            add_param(self, "bias", (self.output_size,), BIAS)
        else:
            self.register_parameter("bias", None)

    def _create_weights(self) -> None:
        try:
            self.linear_method.create_weights(self, self.input_size, self.output_sizes)
        except ValueError as exc:
            if self.tp.size == 1 or self.parallel is None:
                raise
            raise TPError(f"at tp={self.tp.size} each rank holds {self.input_size} of the layer's "
                          f"{self.full_input_size} input features and {self.output_sizes} of its "
                          f"{self.full_output_sizes} output features, and this rank's shard cannot be built: {exc}; "
                          f"lower --tp, or quantize with a group size that divides the rank's share") from exc

    # ---- tensor-parallel slicing (hooks QKVLinear overrides) ----------------------------------------
    def local_output_sizes(self) -> List[int]:
        """Output features of each merged shard this rank holds (column-parallel)."""
        return [divide(size, self.tp.size, "output features of a column-parallel shard")
                for size in self.full_output_sizes]

    def shard_source(self, index: int) -> Tuple[int, int]:
        """(offset, size) in output features, within shard `index`'s checkpoint tensor, of the rows
        this rank holds (column-parallel)."""
        size = self.output_sizes[index]
        return self.tp.rank * size, size

    def rank_part(self, param: nn.Parameter, loaded: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The part of a checkpoint tensor (shard `index`'s, or the unmerged layer's) this rank
        holds: a view narrowed along the layout's output dim (COLUMN) or input dim (ROW)."""
        if self.tp.size == 1 or self.parallel is None:
            return loaded
        layout = param_layout(self, param)
        if self.parallel == COLUMN:
            if layout.output_dim is None:
                return loaded
            full = layout.shard_slice(0, self.full_output_sizes[index])[1]
            if loaded.dim() <= layout.output_dim or loaded.shape[layout.output_dim] != full:
                check_shape(f"shard {index}", _with_dim(param.shape, layout.output_dim, full), loaded.shape)
            return loaded.narrow(layout.output_dim, *layout.shard_slice(*self.shard_source(index)))
        if layout.input_dim is None:  # e.g. a bias or per-output-channel scales: whole on every rank
            return loaded
        return self._input_part(param, layout, loaded)

    def _input_part(self, param: nn.Parameter, layout: ParamLayout, loaded: torch.Tensor) -> torch.Tensor:
        local = param.shape[layout.input_dim]  # input features, packed words or groups of the rank
        full = loaded.shape[layout.input_dim] if loaded.dim() > layout.input_dim else -1
        if full != local * self.tp.size:
            raise WeightShapeError(
                f"the checkpoint holds {full} entries along the input dim of a tensor whose row-parallel shard "
                f"holds {local} on each of tp={self.tp.size} ranks ({local * self.tp.size} in all): the checkpoint "
                f"does not match config.json, or a group-wise quantized layer's group size does not divide "
                f"in_features / tp (group_size=-1, one group per row, cannot be split): lower --tp")
        part = loaded.narrow(layout.input_dim, self.tp.rank * local, local)
        if not layout.group_index:
            return part
        num_groups = self.input_size // self.group_size  # groups per rank; group_size set by the method
        part = part - self.tp.rank * num_groups
        if part.numel() and (int(part.min()) < 0 or int(part.max()) >= num_groups):
            raise TPError("this GPTQ checkpoint was quantized with act-order (desc_act): its input features' "
                          "groups are permuted across the whole row, so a row-parallel layer's shard would need "
                          "other ranks' scales; use tp=1, or a checkpoint quantized without desc_act")
        return part

    def reduce_input_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row maxima over this rank's input slice [rows, 1] -> over the whole input row (a MAX
        all-reduce when row-parallel at tp > 1): what per-token activation quantization (W8A8) scales
        by, so that every rank quantizes its slice with the scale tp 1 would use."""
        if self.parallel == ROW and self.tp.size > 1:
            return self.tp.all_reduce_max(values)
        return values

    # ---- loading and forward ---------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not merged; got shard {shard_id!r}")
        default_weight_loader(param, self.rank_part(param, loaded_weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel != ROW or self.tp.size == 1:
            return self.linear_method.apply(self, x, self.bias)
        out = self.tp.all_reduce(self.linear_method.apply(self, x, None))  # partial sums of every rank
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        method = "" if type(self.linear_method) is UnquantizedLinearMethod else f", {type(self.linear_method).__name__}"
        parallel = f", {self.parallel}-parallel rank {self.tp.rank}/{self.tp.size}" if self.tp.size > 1 else ""
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}{method}{parallel}"


def _with_dim(shape: Sequence[int], dim: int, size: int) -> Tuple[int, ...]:
    return tuple(size if i == dim else s for i, s in enumerate(shape))


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, loaded shard by shard.

    output_sizes[i] output features belong to shard i; `shard_names` gives the shards string ids too
    (e.g. ("q", "k", "v")). Every shard of every parameter of this module must be loaded. Where a
    parameter packs output features (AWQ's qweight [in, out / 8]) a shard is a range of packed
    columns; a parameter with no output dim (GPTQ's g_idx) is the same in every shard. With a `tp`
    group of more than one rank it is column-parallel (see the module docstring).
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 shard_names: Optional[Sequence[str]] = None, linear_method: Optional[LinearMethod] = None,
                 tp: Optional[TPGroup] = None):
        self.shard_names = list(shard_names) if shard_names is not None else [str(i) for i in
                                                                             range(len(output_sizes))]
        if len(self.shard_names) != len(output_sizes):
            raise ValueError(f"{len(self.shard_names)} shard names for {len(output_sizes)} outputs")
        super().__init__(input_size, sum(output_sizes), bias, linear_method, output_sizes=output_sizes,
                         parallel=COLUMN, tp=tp)
        self._shared_loaded: set = set()  # names of output-less parameters some shard has filled

    def shard_index(self, shard_id: ShardId) -> int:
        return self.shard_names.index(shard_id) if isinstance(shard_id, str) else shard_id

    def shard_range(self, shard_id: ShardId) -> Tuple[int, int]:
        """(offset, size) of a shard's features in this rank's merged output dim."""
        index = self.shard_index(shard_id)
        offset = sum(self.output_sizes[:index])
        return offset, self.output_sizes[index]

    def shard_offsets(self) -> Dict[str, Tuple[int, int]]:
        return {name: self.shard_range(name) for name in self.shard_names}

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        if shard_id is None:
            self._load_merged(param, loaded_weight)
            return
        layout = param_layout(self, param)
        if layout.output_dim is None:
            self._load_shared(param, loaded_weight, shard_id)
            return
        index = self.shard_index(shard_id)
        part = self.rank_part(param, loaded_weight, index)
        target = param.data.narrow(layout.output_dim, *layout.shard_slice(*self.shard_range(index)))
        check_shape(f"shard {shard_id!r}", target.shape, part.shape)
        target.copy_(part)

    def _load_merged(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """An already merged checkpoint tensor (e.g. our own converted format): whole at tp 1, else
        cut into its shards (full sizes along the output dim), each loaded as its shard."""
        layout = param_layout(self, param)
        if self.tp.size == 1 or layout.output_dim is None:
            default_weight_loader(param, loaded_weight)
            return
        full = layout.shard_slice(0, sum(self.full_output_sizes))[1]
        check_shape("merged tensor", _with_dim(loaded_weight.shape, layout.output_dim, full), loaded_weight.shape)
        offset = 0
        for index, size in enumerate(self.full_output_sizes):
            start, length = layout.shard_slice(offset, size)
            self.weight_loader(param, loaded_weight.narrow(layout.output_dim, start, length), index)
            offset += size

    def _load_shared(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId) -> None:
        check_shape(f"shard {shard_id!r}", param.shape, loaded_weight.shape)
        name = next(n for n, p in self.named_parameters(recurse=False) if p is param)
        if name not in self._shared_loaded:
            param.data.copy_(loaded_weight)
            self._shared_loaded.add(name)
        elif not torch.equal(param.data, loaded_weight.to(param.device, param.dtype)):
            raise WeightShapeError(f"shard {shard_id!r} holds a different {name!r} than the shards before it; the "
                                   f"merged projections must share it (re-quantize them with one setting)")


class QKVLinear(MergedLinear):
    """q, k and v projections in one matmul: output = [q (H*D) | k (KVH*D) | v (KVH*D)].

    num_heads and num_kv_heads are this rank's (the model's at tp 1): its query heads
    [rank * H / tp, (rank + 1) * H / tp) and the kv heads they use, split or replicated
    (layers/parallel.kv_heads_of_rank)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 linear_method: Optional[LinearMethod] = None, tp: Optional[TPGroup] = None):
        tp = tp or SINGLE_RANK
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "num_attention_heads")
        self.kv_head_start, self.num_kv_heads = kv_heads_of_rank(num_heads, num_kv_heads, tp.rank, tp.size)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias=bias, shard_names=("q", "k", "v"), linear_method=linear_method, tp=tp)

    def local_output_sizes(self) -> List[int]:
        return [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2

    def shard_source(self, index: int) -> Tuple[int, int]:
        if index == 0:
            return super().shard_source(index)
        return self.kv_head_start * self.head_dim, self.num_kv_heads * self.head_dim

    def split(self, qkv: torch.Tensor) -> List[torch.Tensor]:
        # qkv: [num_tokens, (H + 2 * KVH) * D] -> q [num_tokens, H*D], k and v [num_tokens, KVH*D] (views)
        return list(qkv.split(self.output_sizes, dim=-1))
