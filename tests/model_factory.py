"""Tiny random Hugging Face checkpoints of each architecture, and a paged-KV driver for our models.

Sizes are small enough for a test to build, save, load and run a model in well under a second,
while keeping what matters: GQA (4 q heads on 2 kv heads), head_dim != hidden / heads where the
architecture allows it, biases and norm weights that are random (HF initializes them to 0 / 1,
which would hide a wrong bias layout or a missing (1 + w)).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors.torch import save_file

from tidemind.attention.base import layout_from_lists
from tidemind.attention.kv_cache import LayerKVCache

VOCAB = 256
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def hf_config(arch: str, **overrides):
    """A transformers config object of `arch` ("llama", "mistral", "qwen2", "gemma3")."""
    import transformers

    if arch == "llama":
        kw = dict(_BASE, head_dim=24, attention_bias=True, mlp_bias=True)
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        kw = dict(_BASE, sliding_window=4)
        cls = transformers.MistralConfig
    elif arch == "qwen2":
        kw = dict(_BASE, use_sliding_window=True, sliding_window=5, max_window_layers=1)
        cls = transformers.Qwen2Config
    elif arch == "gemma3":
        kw = dict(_BASE, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                  final_logit_softcapping=3.0, tie_word_embeddings=True,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                      "rope_theta": 1000000.0}})
        cls = transformers.Gemma3TextConfig
    else:
        raise ValueError(arch)
    kw.update(overrides)
    config = cls(**kw)
    config._attn_implementation = "eager"
    return config


def randomize_(model: torch.nn.Module, seed: int, gemma_norms: bool = False) -> None:
    """Weights N(0, 0.08), biases N(0, 0.1), norm weights 1 + N(0, 0.1) (Gemma: N(0, 0.1), it adds 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(noise * 0.1 + (0.0 if gemma_norms else 1.0))
            elif name.endswith(".bias"):
                param.copy_(noise * 0.1)
            else:
                param.copy_(noise * 0.08)


def make_hf_model(arch: str, path: str, seed: int = 0, **overrides):
    """Build, randomize and save_pretrained (safetensors) a tiny model; returns the HF model (eval, fp32)."""
    import transformers

    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    cls = transformers.Gemma3ForCausalLM if arch == "gemma3" else transformers.AutoModelForCausalLM
    model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
    model = model.float().eval()
    randomize_(model, seed, gemma_norms=arch == "gemma3")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(path)
    return model


def write_internlm2_from_llama(llama, path: str) -> None:
    """Save the weights of a tiny HF Llama (no mlp bias) as an InternLM2 checkpoint: renamed, with
    q/k/v packed per kv group into attention.wqkv. Both compute the same function."""
    cfg = llama.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_kv = heads // kv_heads
    source = llama.state_dict()
    state = {}
    for name, tensor in source.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            rest = tuple(tensor.shape[1:])  # (hidden,) for weights, () for biases
            q = tensor.reshape(kv_heads, per_kv, head_dim, *rest)
            k = source[name.replace("q_proj", "k_proj")].reshape(kv_heads, 1, head_dim, *rest)
            v = source[name.replace("q_proj", "v_proj")].reshape(kv_heads, 1, head_dim, *rest)
            packed = torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # per group: its q heads, k, v
            state[name.replace(".self_attn.q_proj.", ".attention.wqkv.")] = packed.contiguous()
            continue
        for old, new in ((".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
                         (".mlp.up_proj.", ".feed_forward.w3."), (".mlp.down_proj.", ".feed_forward.w2."),
                         (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
                         ("model.embed_tokens.", "model.tok_embeddings."), ("lm_head.", "output.")):
            name = name.replace(old, new)
        state[name] = tensor.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": bool(cfg.attention_bias),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"], "rope_scaling": None,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


class PagedKV:
    """KV caches for our model plus per-sequence block tables drawn from a shuffled free list, so
    consecutive blocks of a sequence are not adjacent in memory."""

    def __init__(self, model_config, num_blocks: int = 64, block_size: int = 4, dtype=torch.float32, seed=0):
        self.block_size = block_size
        shape = (2, num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
        # Filled with large finite garbage: a slot read without being written (or without being
        # masked) wrecks the output. Not NaN: masked slots still enter P @ V with weight 0, and
        # 0 * NaN would poison correct code too.
        gen = torch.Generator().manual_seed(seed + 1)
        self.kv_caches = [LayerKVCache((torch.randn(shape, generator=gen) * 1e3).to(dtype))
                          for _ in range(model_config.num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: Dict[int, List[int]] = {}
        self.lengths: Dict[int, int] = {}

    def grow(self, seq_id: int, new_len: int) -> List[int]:
        table = self.tables.setdefault(seq_id, [])
        while len(table) * self.block_size < new_len:
            table.append(self.free.pop())
        return table


@torch.no_grad()
def run_step(model, kv: PagedKV, batch: Sequence[Tuple[int, Sequence[int]]]) -> List[torch.Tensor]:
    """One engine step: batch = [(seq_id, new token ids)] in runner order (single-token decodes
    first). Returns each sequence's logits rows [len(new tokens), vocab] (float32)."""
    ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
    for seq_id, tokens in batch:
        start = kv.lengths.get(seq_id, 0)
        end = start + len(tokens)
        tables.append(list(kv.grow(seq_id, end)))
        ids += list(tokens)
        positions += list(range(start, end))
        query_lens.append(len(tokens))
        seq_lens.append(end)
        kv.lengths[seq_id] = end
    layout = layout_from_lists(query_lens, seq_lens, tables, kv.block_size, torch.device("cpu"))
    meta = model.ctx.attention_backend.build_metadata(layout)
    hidden = model(torch.tensor(ids), torch.tensor(positions), kv.kv_caches, meta)
    logits = model.compute_logits(hidden)
    return list(logits.split(query_lens))


@torch.no_grad()
def hf_logits(hf_model, token_ids: Sequence[int]) -> torch.Tensor:
    """Full-sequence forward of the HF reference: [len(token_ids), vocab] float32."""
    out = hf_model(input_ids=torch.tensor([list(token_ids)]), use_cache=False)
    return out.logits[0].float()


# ---- synthetic GGUF files -----------------------------------------------------------------------

# Hugging Face name inside model.layers.N -> GGUF block-tensor name (llama.cpp's naming)
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if base in top:
        return f"{top[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}.{suffix}"


def llama_cpp_permute(w, n_head: int):
    # what llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (numpy array [n_head * D, ...])
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_synthetic_gguf(hf_model, path: str, arch: str, qtypes: Dict[str, str],
                         extra_f32: Dict[str, "object"] = None) -> Dict[str, "object"]:
    """Write hf_model (a tiny HF Llama or Qwen2) as a GGUF file, each tensor in the type named by the
    first matching key of qtypes (substring of the GGUF name; "" matches all), plus extra_f32
    tensors as they are. Returns {GGUF name: the float32 array stored, after quantization
    round-trip} for checking."""
    import gguf
    import numpy as np

    cfg = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    stored = {}
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        data = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        qtype = next(gguf.GGMLQuantizationType[t] for key, t in qtypes.items() if key in name)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            stored[name] = data.astype(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
            stored[name] = data.astype(np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(packed, qtype)
    for name, array in (extra_f32 or {}).items():
        writer.add_tensor(name, np.asarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def llama_cpp_rope_freqs(head_dim: int, base: float, factor: float, low: float = 1.0, high: float = 4.0,
                         old_context: int = 8192) -> list:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for a Llama 3 rope."""
    import math

    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def save_tiny_tokenizer(path: str, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer whose ids are "t0" .. "t{vocab_size-1}" (t2 is EOS), saved next to a
    tiny model so that the engine can load the directory; tests feed token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(path)
