"""The standard benchmark workloads (see benchmarks/WORKLOADS.md for their definitions).

Token ids are generated exactly as the shared GPU peer scripts do, so figures stay comparable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "prompts.jsonl"


@dataclass(frozen=True)
class Workload:
    name: str
    new_tokens: int
    description: str


WORKLOADS = {
    "C1": Workload("C1", 128, "32 chat prompts, 128 new tokens each, greedy, ignore EOS, all at once"),
    "C3": Workload("C3", 256, "batch 1, 128-token prompt, 256 new tokens"),
    "D1": Workload("D1", 512, "batch 1, 128 random token ids (seed 0), 512 new tokens, greedy, ignore EOS"),
    "T1": Workload("T1", 256, "512 requests, prompt lengths uniform in [128, 1024] (seed 0), 256 new tokens"),
}


def chat_prompts(path: Path = PROMPTS_FILE) -> List[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def random_prompt(vocab_size: int, length: int = 128) -> List[int]:
    """D1 / C3: `length` random token ids, numpy seed 0."""
    return np.random.default_rng(0).integers(0, vocab_size, length).tolist()


def t1_prompts(vocab_size: int, count: int = 512) -> List[List[int]]:
    """T1: 512 prompts, lengths uniform in [128, 1024], ids from the same generator (seed 0)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(128, 1025, size=512)
    prompts = [rng.integers(0, vocab_size, int(n)).tolist() for n in lengths]
    return prompts[:count]
