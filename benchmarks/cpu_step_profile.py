"""Where a CPU decode step's time goes: linear layers, attention, the rest of the layers, the LM
head and sampling, for the bundled SmolLM2 in float32 at batch sizes 1, 16 and 32 (C3, C2, C1).

usage: python benchmarks/cpu_step_profile.py [--batch 1 16 32] [--new-tokens 128] [--dtype auto] [--per-op]
                                             [--out benchmarks/results/cpu_step_profile.json]

Each batch runs the first B chat prompts of prompts.jsonl through the engine in this thread (no
server) with 128 new tokens, ignore EOS, after a warm-up; times are milliseconds per decode step
(the prefill step is left out), the mean over the run. Where the decoder layers run as one C call
each (GGUF at stored precision, kernels/cpu/decoder.py), their linear layers and attention are
inside layer_calls, not timed apart; --per-op runs them op by op instead. The linear-layer time is
set beside its floor on this machine: the float32 matmul FLOPs of a step at the measured matmul
rate, or the weight bytes at the measured copy bandwidth, whichever is larger
(tidemind/bench/cpu_ceilings.py).
"""
from __future__ import annotations

import argparse
import collections
import json

import torch

from tidemind import EngineConfig, GenerationConfig
from tidemind.bench.cpu_ceilings import measure_cpu_ceilings, step_weight_count
from tidemind.bench.host_timers import timed
from tidemind.bench.workloads import chat_prompts
from tidemind.chat.templates import get_chat_template
from tidemind.engine.engine import Engine
from tidemind.layers.attention import Attention
from tidemind.layers.embedding import LMHead
from tidemind.layers.linear import Linear

THREADS = 2


def instrument(engine: Engine) -> dict:
    """Wrap the forward of every Linear, Attention and the LM head, the whole model's forward
    and the sampler with timers; returns the totals (seconds) they add to."""
    totals = collections.defaultdict(float)
    runner = engine.executor.runner
    for module in runner.model.modules():
        if isinstance(module, Linear):
            module.forward = timed(totals, "linear", module.forward)
        elif isinstance(module, Attention):
            module.forward = timed(totals, "attention", module.forward)
        elif isinstance(module, LMHead):
            module.forward = timed(totals, "lm_head", module.forward)
    fused = getattr(runner.model, "cpu_layers", None)
    if fused is not None:  # the decoder layers as one C call each: linear and attention are inside
        fused.run = timed(totals, "layer_calls", fused.run)
    runner.model.forward = timed(totals, "model", runner.model.forward)
    runner._sample = timed(totals, "sampler", runner._sample)
    engine.step = timed(totals, "step", engine.step)
    return totals


def profile_batch(engine: Engine, totals: dict, prompts: list, new_tokens: int) -> dict:
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)

    def run(first_id: int) -> int:
        for i, ids in enumerate(prompts):
            engine.add_request(first_id + i, ids, config)
        engine.step()  # the prefill of every prompt (well under max_prefill_token_num): not timed
        totals.clear()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return steps

    run(0)  # warm-up
    steps = run(len(prompts))
    ms = collections.defaultdict(float, {key: 1000 * value / steps for key, value in totals.items()})
    rest = ms["model"] - ms["linear"] - ms["attention"] - ms["layer_calls"]
    return {"batch": len(prompts), "steps": steps, "ms_per_step": round(ms["step"], 2),
            "linear": round(ms["linear"], 2), "attention": round(ms["attention"], 2),
            "layer_calls": round(ms["layer_calls"], 2),
            "other_layer_ops": round(rest, 2), "lm_head": round(ms["lm_head"], 2),
            "sampler": round(ms["sampler"], 2),
            "engine_and_inputs": round(ms["step"] - ms["model"] - ms["lm_head"] - ms["sampler"], 2)}


def linear_floor_ms(batch: int, weights: int, ceilings: dict) -> float:
    """The linear layers' and LM head's floor for one decode step of `batch` tokens (ms)."""
    compute = 2 * weights * batch / (ceilings["matmul_fp32_GFLOPs"] * 1e9)
    memory = 4 * weights / (ceilings["copy_GBps"] * 1e9)
    return 1000 * max(compute, memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="auto: the GGUF at its stored precision")
    parser.add_argument("--out", default="benchmarks/results/cpu_step_profile.json")
    parser.add_argument("--per-op", action="store_true",
                        help="stored precision: run the decoder layers op by op, not one C call each")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    ceilings = measure_cpu_ceilings()
    engine = Engine(None, EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=max(args.batch),
                                       num_threads=THREADS))
    template = get_chat_template(engine.tokenizer)
    prompts = [engine.tokenizer.encode(template.messages2prompt(p)) for p in chat_prompts()]
    if args.per_op:
        engine.executor.runner.model.cpu_layers = None
    weights = step_weight_count(engine.executor.runner.model)
    totals = instrument(engine)
    rows = []
    for batch in args.batch:
        row = profile_batch(engine, totals, prompts[:batch], args.new_tokens)
        row["linear_and_lm_head_floor"] = round(linear_floor_ms(batch, weights, ceilings), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.close()
    result = {"command": "python benchmarks/cpu_step_profile.py", "machine": ceilings, "step_weights": weights,
              "threads": THREADS, "torch": torch.__version__, "ms_per_step": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
