"""Quantized checkpoints written by the tests themselves, independently of tidemind's packing code:
round-to-nearest int4 / int8 of a tiny Hugging Face model, packed word by word with explicit
shifts in the layouts AutoAWQ, AutoGPTQ and LMDeploy write. The float model with the same
dequantized weights is the reference the loaded checkpoint must match."""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch
from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_NIBBLE_COLUMN = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8j + this[i]


def rtn_int4(w: torch.Tensor, group: int, sym: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q [out, in] in 0..15, scale [out, in / group], zero [out, in / group] integers)."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group, group)
    if sym:
        scale = wg.abs().amax(-1).clamp(min=1e-6) / 7
        zero = torch.full_like(scale, 8.0)
    else:
        hi, lo = wg.amax(-1), wg.amin(-1)
        scale = (hi - lo).clamp(min=1e-6) / 15
        zero = (-lo / scale).round().clamp(0, 15)
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    return q.reshape(out_f, in_f).to(torch.int64), scale.half(), zero.to(torch.int64)


def dequantize_int4(q, scale, zero, group: int) -> torch.Tensor:
    # every operand as stored: scale in float16
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.float().repeat_interleave(group, dim=1)
    return (q.float() - z) * s


def _to_int32(words):
    return torch.tensor([[w - (1 << 32) if w >= (1 << 31) else w for w in row] for row in words], dtype=torch.int32)


def pack_columns(values: torch.Tensor, bits: int, order) -> torch.Tensor:
    """[rows, cols] unsigned -> int32 [rows, cols * bits / 32], value of column per_word*j + order[i]
    in bits [bits*i, bits*i + bits) of word j."""
    per_word = 32 // bits
    rows = values.tolist()
    words = [[sum(row[j * per_word + order[i]] << (bits * i) for i in range(per_word))
              for j in range(len(row) // per_word)] for row in rows]
    return _to_int32(words)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] unsigned -> int32 [rows * bits / 32, cols], GPTQ's packing along the input dim."""
    return pack_columns(values.t().contiguous(), bits, list(range(32 // bits))).t().contiguous()


def _write(path: str, hf_model, tensors: Dict[str, torch.Tensor], quantization_config: dict) -> None:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    config = hf_model.config.to_dict()
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = "float16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _split(hf_model):
    """(dense tensors kept as they are, {module name: weight [out, in]} of the linears to quantize)."""
    dense, linears = {}, {}
    for name, tensor in hf_model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in LINEARS:
            linears[module] = tensor.detach().float()
        elif not (name == "lm_head.weight" and hf_model.config.tie_word_embeddings):
            dense[name] = tensor.detach().clone()
    return dense, linears


def write_awq(hf_model, path: str, group: int, sym: bool = False) -> None:
    """Save hf_model as an AutoAWQ GEMM checkpoint and replace its linear weights, in place, by the
    dequantized ones (the reference)."""
    dense, linears = _split(hf_model)
    state = hf_model.state_dict()
    for module, w in linears.items():
        q, scale, zero = rtn_int4(w, group, sym)
        dense[f"{module}.qweight"] = pack_columns(q.t(), 4, AWQ_NIBBLE_COLUMN)  # [in, out / 8]
        dense[f"{module}.qzeros"] = pack_columns(zero.t(), 4, AWQ_NIBBLE_COLUMN)  # [in / g, out / 8]
        dense[f"{module}.scales"] = scale.t().contiguous()  # [in / g, out]
        state[f"{module}.weight"].copy_(dequantize_int4(q, scale, zero, group))
    _write(path, hf_model, dense, {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm"})


def write_gptq(hf_model, path: str, group: int, bits: int = 4, act_order: bool = False, v2: bool = False) -> None:
    """Save hf_model as a GPTQ checkpoint (v1 stores zero - 1) and put the dequantized weights in
    place. act_order: input rows get a shuffled group assignment through g_idx."""
    dense, linears = _split(hf_model)
    state = hf_model.state_dict()
    top = (1 << bits) - 1
    for index, (module, w) in enumerate(linears.items()):
        in_f = w.shape[1]
        g_idx = torch.arange(in_f) // group
        if act_order:  # a fixed permutation per input width, so merged projections share it
            g_idx = g_idx[torch.randperm(in_f, generator=torch.Generator().manual_seed(in_f))]
        # quantize the rows of each group together: gather them, quantize, scatter back
        order = torch.argsort(g_idx, stable=True)
        wq = w[:, order]
        wg = wq.reshape(w.shape[0], in_f // group, group)
        hi, lo = wg.amax(-1), wg.amin(-1)
        scale = ((hi - lo).clamp(min=1e-6) / top).half()
        zero = (-lo / scale.float()).round().clamp(0, top).to(torch.int64)
        q_sorted = (wg / scale.float()[..., None] + zero[..., None]).round().clamp(0, top).reshape(w.shape)
        q = torch.empty_like(q_sorted)
        q[:, order] = q_sorted
        q = q.to(torch.int64)
        stored_zero = zero if v2 else (zero - 1) & top
        dense[f"{module}.qweight"] = pack_rows(q.t(), bits)  # [in / P, out]
        dense[f"{module}.qzeros"] = pack_columns(stored_zero.t(), bits, list(range(32 // bits)))  # [in / g, out / P]
        dense[f"{module}.scales"] = scale.t().contiguous()
        dense[f"{module}.g_idx"] = g_idx.to(torch.int32)
        s = scale.float().t()[g_idx].t()  # [out, in]
        z = zero.float().t()[g_idx].t()
        state[f"{module}.weight"].copy_((q.float() - z) * s)
    _write(path, hf_model, dense, {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                                   "sym": False, "checkpoint_format": "gptq_v2" if v2 else "gptq"})


def write_w8a8(hf_model, path: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Save hf_model as an LMDeploy smooth_quant checkpoint (no smoothing: plain per-channel int8);
    returns {module: (int8 weight, scale)} and puts the dequantized weights in place."""
    dense, linears = _split(hf_model)
    state = hf_model.state_dict()
    stored = {}
    for module, w in linears.items():
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # [out, 1]
        q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        dense[f"{module}.weight"] = q
        dense[f"{module}.scale"] = scale
        stored[module] = (q, scale)
        state[f"{module}.weight"].copy_(q.float() * scale)
    _write(path, hf_model, dense, {"quant_method": "smooth_quant"})
    return stored


def unpack_columns(words: torch.Tensor, bits: int, order) -> torch.Tensor:
    """The inverse of pack_columns, word by word: int32 [rows, n] -> [rows, n * 32 / bits]."""
    per_word = 32 // bits
    out = []
    for row in words.tolist():
        values = [0] * (len(row) * per_word)
        for j, word in enumerate(row):
            word &= 0xFFFFFFFF
            for i in range(per_word):
                values[j * per_word + order[i]] = (word >> (bits * i)) & ((1 << bits) - 1)
        out.append(values)
    return torch.tensor(out, dtype=torch.int64)


def dense_state_from_awq(tensors: Dict[str, torch.Tensor], group: int) -> Dict[str, torch.Tensor]:
    """What an independent AWQ reader makes of a checkpoint: every (qweight, qzeros, scales) triple
    turned back into a float32 weight [out, in]; other tensors as float32."""
    dense = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            q = unpack_columns(tensor, 4, AWQ_NIBBLE_COLUMN)  # [in, out]
            z = unpack_columns(tensors[f"{module}.qzeros"], 4, AWQ_NIBBLE_COLUMN).repeat_interleave(group, 0)
            s = tensors[f"{module}.scales"].float().repeat_interleave(group, 0)
            dense[f"{module}.weight"] = ((q - z).float() * s).t().contiguous()
        elif leaf not in ("qzeros", "scales"):
            dense[name] = tensor.float()
    return dense
