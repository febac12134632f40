"""Per-step cost of structured output in the sampler at batch 32, on this CPU (SmolLM2's 49,152-token
vocabulary, random logits: the model's forward is not part of it).

usage: python benchmarks/grammar_step_cost.py [--batch 32] [--steps 300] [--out benchmarks/results/grammar_step_cost.json]

Three batches of greedy rows go through the runner's sampling path (InputBatch + Sampler, as
ModelRunner._sample does): rows without a grammar (the argmax fast path), the same rows through the full
sampler (the grammar hook's emptiness check included), and rows held to a JSON schema (llguidance's
masks for all rows, computed in parallel, unpacked and applied, then argmax, then every matcher
advanced). Finished rows are replaced by fresh requests, so matchers are at all depths of the answer.
Reported: median and p90 milliseconds per step, what the grammar adds per step, and, for the
grammar rows, llguidance's masks alone and the whole hook (masks, unpacking, applying) timed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from tidemind.config import GenerationConfig
from tidemind.core.outputs import NewRequestData
from tidemind.core.sampling_params import SamplingParams
from tidemind.loader import resolve_model
from tidemind.runner.input_batch import InputBatch
from tidemind.runner.sampler import Sampler
from tidemind.runner.structured_output import GrammarCompiler, _executor, apply_grammar_masks

SCHEMA = {"type": "object", "required": ["name", "age", "tags"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}}}
EOS = 2


class Rows:
    """`batch_size` requests kept alive in an InputBatch: one that ends is replaced by a new one."""

    def __init__(self, batch: InputBatch, batch_size: int, response_format):
        self.batch, self.format, self.next_id = batch, response_format, 0
        self.ids = [self._add() for _ in range(batch_size)]

    def _add(self) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        sampling = SamplingParams.from_generation_config(GenerationConfig(response_format=self.format), rid,
                                                         frozenset({EOS}))
        self.batch.add(NewRequestData(rid, (1, 2, 3), (), sampling, (0,), 0))
        return rid

    def step(self, logits: torch.Tensor, fast_path: bool, sampler: Sampler) -> float:
        rows = np.array([self.batch.row(rid) for rid in self.ids])
        start = time.perf_counter()
        if fast_path and self.batch.plain_greedy[rows].all():
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = sampler(logits, [self.batch.sampling_inputs(int(r)) for r in rows]).token_ids
        self.batch.append_tokens(rows, np.asarray(tokens, dtype=np.int32))
        elapsed = time.perf_counter() - start
        for i, (rid, token) in enumerate(zip(self.ids, tokens)):
            if token == EOS or self.batch.num_tokens[self.batch.row(rid)] >= self.batch.max_model_len - 1:
                self.batch.remove(rid)
                self.ids[i] = self._add()
        return elapsed


def _summary(times) -> dict:
    times = times[10:]  # warm-up
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(float(np.percentile(times, 90)), 3)}


def _mask_parts(rows: Rows, logits: torch.Tensor) -> tuple:
    """(ms of llguidance's masks for all rows, ms of the whole hook: masks, unpacking, applying), timed
    on a copy: masks change no matcher."""
    import llguidance.torch as llg_torch

    batch = rows.batch
    inputs = [batch.sampling_inputs(batch.row(rid)) for rid in rows.ids]
    live = [(inp.grammar.matcher, i) for i, inp in enumerate(inputs) if not inp.grammar.done]
    words = llg_torch.allocate_token_bitmask(len(inputs), logits.shape[1])
    start = time.perf_counter()
    llg_torch.fill_next_token_bitmask_par(_executor(), live, words)
    masks = time.perf_counter() - start
    start = time.perf_counter()
    apply_grammar_masks(logits.clone(), inputs)
    return masks * 1000, (time.perf_counter() - start) * 1000


def measure(rows: Rows, steps: int, fast_path: bool, vocab: int, seed: int, parts: bool = False) -> dict:
    generator, sampler, times, masks, hook = torch.Generator().manual_seed(seed), Sampler(), [], [], []
    for _ in range(steps):
        logits = torch.randn(len(rows.ids), vocab, generator=generator) * 3
        if parts:
            mask_ms, hook_ms = _mask_parts(rows, logits)
            masks.append(mask_ms)
            hook.append(hook_ms)
        times.append(rows.step(logits, fast_path, sampler) * 1000)
    result = _summary(times)
    if parts:
        result.update(llguidance_masks=_summary(masks), whole_hook=_summary(hook))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/grammar_step_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(None).path
    vocab = 49152
    compiler = GrammarCompiler(model_dir, vocab)
    make = lambda form: Rows(InputBatch(args.batch * 2, 512, 8, compiler), args.batch, form)  # noqa: E731
    form = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    result = {"batch": args.batch, "steps": args.steps, "threads": args.threads, "vocab": vocab,
              "no_grammar_fast_path": measure(make(None), args.steps, True, vocab, 1),
              "no_grammar_full_sampler": measure(make(None), args.steps, False, vocab, 1),
              "json_schema": measure(make(form), args.steps, True, vocab, 1, parts=True),
              "load_average_1min": os.getloadavg()[0]}
    result["grammar_adds_ms"] = round(result["json_schema"]["median_ms"] - result["no_grammar_full_sampler"]["median_ms"], 3)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
