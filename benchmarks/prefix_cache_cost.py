"""What prefix caching costs when nothing is shared, on this CPU (it decides the default of
--enable-prefix-caching).

usage: python benchmarks/prefix_cache_cost.py [--rounds 3] [--skip-c1] [--out benchmarks/results/prefix_cache_cost.json]

1. scheduler: the T1 requests (benchmarks/WORKLOADS.md: 512 random prompts of 128-1024 tokens,
   256 new tokens, ignore EOS) through the scheduler alone, with a stand-in runner that samples
   token 0 (no model): microseconds of schedule() + update() per engine step, prefix caching on and
   off, with a cache that holds every request at once (no eviction) and one that holds a quarter
   of them (constant preemption and, with caching on, eviction from the LRU). For contrast, the
   same requests with a shared 1,024-token prefix.
2. C1 through the engine (32 chat prompts, 128 new tokens, greedy, ignore EOS, all at once), with
   prefix caching on and off, in alternating rounds on two pipelines loaded side by side (this
   machine is shared: alternation spreads the noise over both). The C1 prompts share only the chat
   template's first tokens, less than one 64-token block: no hits.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.bench.offline import run_requests
from tidemind.bench.workloads import WORKLOADS, chat_prompts, t1_prompts
from tidemind.core.block_manager import BlockManager
from tidemind.core.outputs import RunnerOutput
from tidemind.core.request import Request
from tidemind.core.scheduler import Scheduler

BLOCK = 64
VOCAB = 49152


def _scheduler_run(prompts, caching: bool, num_blocks: int) -> dict:
    scheduler = Scheduler(BlockManager(num_blocks, BLOCK, enable_prefix_caching=caching), 256, 8192)
    gen = GenerationConfig(max_new_tokens=256, ignore_eos=True)
    for rid, prompt in enumerate(prompts):
        scheduler.add_request(Request(rid, prompt, gen, seed=0, eos_token_ids=frozenset(), max_total_tokens=4096))
    steps = 0
    start = time.perf_counter()
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            request = scheduler.get_request(rid)
            if request.num_computed_tokens + n == request.num_tokens:
                sampled[rid] = 0
        scheduler.update(out, RunnerOutput(sampled_token_ids=sampled))
        steps += 1
    wall = time.perf_counter() - start
    return {"us_per_step": wall / steps * 1e6, "steps": steps, "preemptions": scheduler.num_preemptions,
            "hit_tokens": scheduler.num_hit_tokens}


def bench_scheduler(rounds: int) -> dict:
    plain = t1_prompts(VOCAB)
    prefix = np.random.default_rng(1).integers(0, VOCAB, 1024).tolist()
    cases = {"T1, cache for all": (plain, 512 * 21), "T1, cache for a quarter": (plain, 128 * 21),
             "T1 + shared 1,024-token prefix, cache for all": ([prefix + p for p in plain], 512 * 37)}
    results = {}
    for name, (prompts, num_blocks) in cases.items():
        runs = {"off": [], "on": []}
        for _ in range(rounds):
            for mode in ("off", "on"):
                runs[mode].append(_scheduler_run(prompts, mode == "on", num_blocks))
        results[name] = {mode: {**r[0], "us_per_step": round(statistics.median(x["us_per_step"] for x in r), 1)}
                         for mode, r in runs.items()}
        print(name, json.dumps(results[name]), flush=True)
    return results


def bench_c1(rounds: int) -> dict:
    config = dict(dtype="float32", device="cpu", num_threads=2)
    pipes = {mode: pipeline(backend_config=EngineConfig(enable_prefix_caching=mode == "on", **config))
             for mode in ("off", "on")}
    try:
        prompts = [pipes["off"].encode_prompt(p) for p in chat_prompts()]
        full = GenerationConfig(max_new_tokens=WORKLOADS["C1"].new_tokens, ignore_eos=True)
        runs = {"off": [], "on": []}
        for pipe in pipes.values():
            run_requests(pipe.async_engine, prompts, GenerationConfig(max_new_tokens=8, ignore_eos=True))  # warm-up
        for round_ in range(rounds):
            for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
                stats = run_requests(pipes[mode].async_engine, prompts, full)
                runs[mode].append(stats.summary())
                print("C1", mode, runs[mode][-1], flush=True)
        hits = pipes["on"].engine.stats()["prefix_cache_hits_total"]
    finally:
        for pipe in pipes.values():
            pipe.close()
    return {mode: {"runs": r, "output_tok_s_median": statistics.median(x["output_tok_s"] for x in r)}
            for mode, r in runs.items()} | {"hit_tokens_with_caching_on": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-c1", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/prefix_cache_cost.json")
    args = parser.parse_args()
    results = {"scheduler": bench_scheduler(args.rounds)}
    if not args.skip_c1:
        results["C1"] = bench_c1(args.rounds)
    results["command"] = "python benchmarks/prefix_cache_cost.py"
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
