"""GGUF file -> Hugging Face-format directory (config.json, model.safetensors, tokenizer).

Two forms. Dequantized (the default): every tensor as float32, through gguf-py (F32, F16, BF16,
Q4_0 .. Q8_0, Q2_K .. Q6_K, ...). At stored precision (keep_quantized, the CPU's default): every
2-D weight keeps its integers, decoded by gguf_blocks.py into `<layer>.qweight` int8 [out, in],
`<layer>.qscale` and `<layer>.qmin` float32 [out, in / 16] (w = qscale * qweight + qmin, scales
repeated where a type has one per 32 inputs, so merged projections of different types share one
shape), and config.json records quantization_config {"quant_method": "gguf"}
(layers/quantization/gguf.py runs it). Only files whose 2-D weights are all of a type gguf_blocks
decodes have this form (stored_precision_blocker says why not). Both forms are undone
from llama.cpp's conventions: Llama q/k rows are re-permuted back to Hugging Face's rotate-half
layout, Gemma norm weights (stored as 1 + w) get 1 subtracted. The config comes from the GGUF
metadata; the tokenizer from transformers' own GGUF tokenizer conversion.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import gguf_blocks

logger = logging.getLogger(__name__)

# GGUF block-tensor name -> Hugging Face name inside model.layers.N
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GEMMA3_BLOCK = {
    **_LLAMA_BLOCK, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF tensors that are config, not weights (read by the config builders)
_CONFIG_TENSORS = {"rope_freqs.weight"}


class GGUFMetadata:
    """Typed access to a GGUF file's key/value fields, `arch.` prefix handled."""

    def __init__(self, reader):
        self.reader = reader
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_get(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores each head's rows as interleaved (x0, y0, x1, y1, ...) pairs for its rope;
    # Hugging Face's rotate-half wants (x0, x1, ... | y0, y1, ...). w: [n_head * head_dim, (in)]
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_scaling(meta: GGUFMetadata) -> Optional[dict]:
    kind = meta.arch_get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.arch_get("rope.scaling.factor"))}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": float(meta.arch_get("rope.scaling.factor")),
                "original_max_position_embeddings": int(meta.arch_get("rope.scaling.original_context_length"))}
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported (supported: linear, yarn)")


def _common_config(meta: GGUFMetadata, tensor_names: set, vocab_size: int) -> dict:
    hidden = int(meta.arch_get("embedding_length"))
    heads = int(meta.arch_get("attention.head_count"))
    kv_heads = meta.arch_get("attention.head_count_kv", heads)
    config = {
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch_get("feed_forward_length")),
        "num_hidden_layers": int(meta.arch_get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(meta.arch_get("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta.arch_get("context_length", 2048)),
        "rms_norm_eps": float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(meta)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _llama3_factors(dim: int, base: float, factor: float, low: float, high: float, old_context: int):
    # llama.cpp's rope_freqs for a Llama 3 rope: what each default frequency is divided by
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    with np.errstate(divide="ignore"):  # the smoothed branch is only kept where it is finite
        smoothed = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, smoothed))


def _llama3_rope_scaling(meta: GGUFMetadata, config: dict) -> dict:
    """Llama 3.1+ GGUFs carry the rope scaling only as per-frequency factors (rope_freqs.weight);
    recover the rope_scaling that produced them (Meta's low/high/original context for Llama 3.x)."""
    tensor = next(t for t in meta.reader.tensors if t.name == "rope_freqs.weight")
    factors = _dequantize(tensor).reshape(-1)
    dim = int(meta.arch_get("rope.dimension_count", config["head_dim"]))
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = _llama3_factors(dim, config["rope_theta"], scaling["factor"], 1.0, 4.0, 8192)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ValueError("this GGUF's rope_freqs.weight does not match a Llama 3 rope scaling (low_freq_factor 1, "
                         "high_freq_factor 4, original context 8192); load the original Hugging Face checkpoint")
    return scaling


def _llama_config(meta, tensor_names, vocab_size) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              **_common_config(meta, tensor_names, vocab_size), "hidden_act": "silu",
              "rope_theta": float(meta.arch_get("rope.freq_base", 10000.0)),
              "attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": False}
    if "rope_freqs.weight" in tensor_names:
        config["rope_scaling"] = _llama3_rope_scaling(meta, config)
    return config


def _qwen2_config(meta, tensor_names, vocab_size) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            **_common_config(meta, tensor_names, vocab_size), "hidden_act": "silu",
            "rope_theta": float(meta.arch_get("rope.freq_base", 1000000.0)), "use_sliding_window": False}


def _gemma3_config(meta, tensor_names, vocab_size) -> dict:
    config = _common_config(meta, tensor_names, vocab_size)
    # llama.cpp scales queries by head_dim**-0.5, except Gemma 3 27B (62 layers): (hidden/heads)**-0.5
    scalar = (config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62
              else config["head_dim"])
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **config,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "sliding_window": int(meta.arch_get("attention.sliding_window", 4096)),
            "sliding_window_pattern": 6,  # 5 local : 1 global, as llama.cpp hard-codes for Gemma 3
            "rope_theta": float(meta.arch_get("rope.freq_base", 1000000.0)), "rope_local_base_freq": 10000.0,
            "final_logit_softcapping": meta.arch_get("final_logit_softcapping"),
            "attn_logit_softcapping": meta.arch_get("attn_logit_softcapping")}


@dataclass(frozen=True)
class GGUFArch:
    build_config: Callable[[GGUFMetadata, set, int], dict]
    block_names: Dict[str, str]
    unpermute_qk: bool = False  # llama.cpp permutes q/k rows for this arch
    norm_minus_one: bool = False  # llama.cpp stores norm weights as 1 + w


GGUF_ARCHITECTURES: Dict[str, GGUFArch] = {
    "llama": GGUFArch(_llama_config, _LLAMA_BLOCK, unpermute_qk=True),
    "qwen2": GGUFArch(_qwen2_config, _LLAMA_BLOCK),
    "gemma3": GGUFArch(_gemma3_config, _GEMMA3_BLOCK, norm_minus_one=True),
}


def hf_tensor_name(gguf_name: str, arch: GGUFArch) -> Optional[str]:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight / bias
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in arch.block_names:
        return f"model.layers.{parts[1]}.{arch.block_names[parts[2]]}.{suffix}"
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{suffix}"
    return None


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize  # gguf's own "gguf" package, not this module
    # -> float32 [rows, cols] in Hugging Face orientation ([out, in] for linear weights)
    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, copy=True)


def _is_matrix(tensor) -> bool:
    return len(tensor.shape) == 2 and tensor.name not in _CONFIG_TENSORS


def stored_precision_blocker(reader) -> Optional[str]:
    """Why this GGUF cannot run at its stored precision (None: it can): a 2-D weight of a type
    gguf_blocks does not decode (floats, Q2_K, Q3_K, the IQ types), or a width not a multiple of 32."""
    for tensor in reader.tensors:
        if not _is_matrix(tensor):
            continue
        if not gguf_blocks.decodable(tensor.tensor_type):
            return f"{tensor.name} is {tensor.tensor_type.name}"
        if int(tensor.shape[0]) % 32:
            return f"{tensor.name} has {int(tensor.shape[0])} inputs, not a multiple of 32"
    return None


def _stored(tensor) -> Dict[str, np.ndarray]:
    """A quantized matrix kept as integers: qweight int8 [R, C], qscale and qmin float32 [R, C / 16]."""
    cols = int(tensor.shape[0])  # GGUF shapes are [in, out]
    q, d, m = gguf_blocks.decode_blocks(np.asarray(tensor.data), tensor.tensor_type, cols)
    repeat = cols // d.shape[1] // 16  # 2 for a scale per 32 inputs, 1 per 16
    return {"qweight": q, "qscale": np.repeat(d, repeat, axis=1) if repeat > 1 else d,
            "qmin": np.repeat(m, repeat, axis=1) if repeat > 1 else m}


def convert_tensors(reader, meta: GGUFMetadata, arch: GGUFArch, config: dict,
                    keep_quantized: bool = False) -> Dict[str, torch.Tensor]:
    tensors = {}
    desc = "Decoding GGUF tensors" if keep_quantized else "Dequantizing GGUF tensors"
    for tensor in tqdm(reader.tensors, desc=desc, unit="tensor", leave=False):
        if tensor.name in _CONFIG_TENSORS:
            continue
        name = hf_tensor_name(tensor.name, arch)
        if name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no place in {config['architectures'][0]}; "
                             f"this GGUF variant of {meta.arch!r} is not supported")
        if keep_quantized and _is_matrix(tensor):
            parts = {f"{name[:-len('.weight')]}.{key}": value for key, value in _stored(tensor).items()}
        else:
            parts = {name: _dequantize(tensor)}
        for part_name, weights in parts.items():
            # q / k rows (and their scales: one row each) back to rotate-half order
            if arch.unpermute_qk and ".attn_q." in tensor.name:
                weights = _unpermute_rope_rows(weights, config["num_attention_heads"])
            elif arch.unpermute_qk and ".attn_k." in tensor.name:
                weights = _unpermute_rope_rows(weights, config["num_key_value_heads"])
            if arch.norm_minus_one and tensor.name.endswith("norm.weight"):
                weights = weights - 1.0
            tensors[part_name] = torch.from_numpy(np.ascontiguousarray(weights))
    return tensors


def _generation_config(meta: GGUFMetadata) -> dict:
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = sorted({i for i in (eos, eot) if i is not None})
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": (eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
              "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    return {key: value for key, value in config.items() if value is not None}


def save_tokenizer(gguf_path: str, meta: GGUFMetadata, out_dir: str) -> None:
    """transformers' GGUF tokenizer conversion, saved with the chat template in tokenizer_config.json."""
    from transformers import AutoTokenizer

    if meta.get("tokenizer.ggml.model") is None:
        logger.warning("%s holds no tokenizer; its converted directory gets no tokenizer files (copy the "
                       "model's tokenizer.json and tokenizer_config.json into it by hand)", gguf_path)
        return
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                              gguf_file=os.path.basename(gguf_path))
    template = meta.get("tokenizer.chat_template")
    if template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    logger.info("converted the GGUF tokenizer in %.1f s", time.perf_counter() - start)


def open_gguf(gguf_path: str):
    from gguf import GGUFReader

    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{gguf_path} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")
    try:
        return GGUFReader(gguf_path)
    except Exception as exc:  # gguf-py fails in numpy (reshape, index errors) on a short file
        size = os.path.getsize(gguf_path)
        raise ValueError(f"cannot read {gguf_path} ({size} bytes) as GGUF ({exc}): the file is truncated or corrupt; "
                         f"download or copy it again") from None


def convert_gguf(gguf_path: str, out_dir: str, keep_quantized: bool = False) -> None:
    """Write the Hugging Face-format model of `gguf_path` into the (existing, empty) `out_dir`,
    dequantized or (keep_quantized) at stored precision (module docstring)."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    reader = open_gguf(gguf_path)
    meta = GGUFMetadata(reader)
    if meta.arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {meta.arch!r} of {gguf_path} is not supported; supported GGUF "
                         f"architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    arch = GGUF_ARCHITECTURES[meta.arch]
    names = {tensor.name for tensor in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{gguf_path} has no token_embd.weight tensor; it is not a complete language model")
    config = arch.build_config(meta, names, int(embed.shape[-1]))  # GGUF shapes are [in, out]
    if keep_quantized:
        blocker = stored_precision_blocker(reader)
        if blocker is not None:
            raise ValueError(f"{gguf_path} cannot run at its stored precision ({blocker}); run it dequantized")
        config["quantization_config"] = {"quant_method": "gguf"}
    tensors = convert_tensors(reader, meta, arch, config, keep_quantized)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(_generation_config(meta), f, indent=2)
    save_tokenizer(gguf_path, meta, out_dir)
    logger.info("converted %s (%s, %d tensors) in %.1f s", gguf_path, meta.arch, len(names),
                time.perf_counter() - start)
