"""Prefix caching and KV swap on the GPU machine (issue 11): three workloads, each run both ways.

    python benchmarks/gpu_prefix_swap.py MODEL [WORKLOADS]     WORKLOADS: comma-separated, default all:

    t1prefix  T1 (benchmarks/WORKLOADS.md) with a shared 1,024-token prefix on every request (random
              ids, numpy seed 1): prefix caching on vs off.
    chat      CHAT_N conversations of CHAT_TURNS turns; each turn resends the whole history (the
              first message, every earlier user message and answer, as token ids) plus a new user
              message; a turn's requests go out together once the previous turn has ended:
              prefix caching on vs off.
    swap      SWAP_N requests of SWAP_PROMPT random tokens and SWAP_NEW new tokens at once, on a
              device cache sized for 1 / SWAP_FIT of them (num_gpu_blocks): preempted requests'
              KV swapped to a host pool that holds all of them vs recomputed. Prefix caching is off
              in both runs, so that only swap differs.

Every run is a fresh pipeline, bfloat16 on a GPU (float32 on the CPU), greedy, ignore EOS, after a
warm-up of 8 short requests that share nothing with the workload (the engine counters in a record
include them). Each run appends a record to $OUT/results.jsonl (format of benchmarks/gpu_bench.py,
plus the sizes below and the engine's prefix-cache and swap counters); a table closes. MODEL: a
model directory (llama8b-shape: .peers/mkmodel.py, see benchmarks/gpu_run.sh) or a bundled name.
With the default sizes all three workloads should take about 5-6 minutes on an H200 (estimated:
six start-ups of ~25 s, T1 there in 17 s); pass one or two workloads per call if a call is shorter.

CPU dry run of the script itself (about two minutes on 2 cores):
    T1P_N=6 T1P_NEW=8 PREFIX_LEN=96 CHAT_N=3 CHAT_TURNS=2 CHAT_FIRST=64 CHAT_USER=16 CHAT_NEW=16 \\
    SWAP_N=6 SWAP_PROMPT=96 SWAP_NEW=32 BLOCK=16 python benchmarks/gpu_prefix_swap.py smollm2-135m
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import torch

from gpu_bench import record
from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.bench.offline import RunStats, run_requests
from tidemind.bench.workloads import t1_prompts


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


T1P_N, T1P_NEW, PREFIX_LEN = _env("T1P_N", 512), _env("T1P_NEW", 256), _env("PREFIX_LEN", 1024)
CHAT_N, CHAT_TURNS = _env("CHAT_N", 64), _env("CHAT_TURNS", 4)
CHAT_FIRST, CHAT_USER, CHAT_NEW = _env("CHAT_FIRST", 512), _env("CHAT_USER", 128), _env("CHAT_NEW", 128)
SWAP_N, SWAP_PROMPT, SWAP_NEW, SWAP_FIT = _env("SWAP_N", 64), _env("SWAP_PROMPT", 1024), _env("SWAP_NEW", 512), \
    _env("SWAP_FIT", 4)
BLOCK = _env("BLOCK", 64)
SIZES = dict(T1P_N=T1P_N, T1P_NEW=T1P_NEW, PREFIX_LEN=PREFIX_LEN, CHAT_N=CHAT_N, CHAT_TURNS=CHAT_TURNS,
             CHAT_FIRST=CHAT_FIRST, CHAT_USER=CHAT_USER, CHAT_NEW=CHAT_NEW, SWAP_N=SWAP_N, SWAP_PROMPT=SWAP_PROMPT,
             SWAP_NEW=SWAP_NEW, SWAP_FIT=SWAP_FIT, BLOCK=BLOCK)
CMD = "python benchmarks/gpu_prefix_swap.py " + " ".join(sys.argv[1:])
TABLE = []


def _engine_config(**fields) -> EngineConfig:
    return EngineConfig(cache_block_seq_len=BLOCK, cache_max_entry_count=0.8, **fields)


def _report(workload: str, setting: str, stats: RunStats, engine_stats: dict, **extra) -> None:
    keys = ("prefix_cache_hit_rate", "prefix_cache_hits_total", "prefix_cache_queries_total", "num_preemptions",
            "swap_out_blocks_total", "swap_in_blocks_total", "kv_blocks_total", "cpu_blocks_total")
    engine = {k: round(engine_stats[k], 4) for k in keys}
    summary = stats.summary()
    record(system="tidemind", workload=workload, setting=setting, cmd=CMD, sizes=SIZES, **extra, **summary,
           **engine)
    TABLE.append((workload, setting, summary["wall_s"], summary["output_tok_s"], summary["total_tok_s"],
                  summary["ttft_p50_s"], engine["prefix_cache_hit_rate"], engine["num_preemptions"],
                  f"{engine['swap_out_blocks_total']}/{engine['swap_in_blocks_total']}"))


def _warm_up(pipe, vocab: int) -> None:
    """8 requests of 32 random tokens (numpy seed 4): shares nothing with the workloads' prompts."""
    prompts = np.random.default_rng(4).integers(0, vocab, (8, 32)).tolist()
    run_requests(pipe.async_engine, prompts, GenerationConfig(max_new_tokens=8, ignore_eos=True))


def t1_prefix(model: str) -> None:
    gen = GenerationConfig(max_new_tokens=T1P_NEW, ignore_eos=True)
    for caching in (True, False):
        config = _engine_config(session_len=PREFIX_LEN + 1024 + T1P_NEW, enable_prefix_caching=caching)
        with pipeline(model, backend_config=config, log_level="INFO") as pipe:
            vocab = pipe.engine.model_config.vocab_size
            prefix = np.random.default_rng(1).integers(0, vocab, PREFIX_LEN).tolist()
            prompts = [prefix + p for p in t1_prompts(vocab, T1P_N)]
            _warm_up(pipe, vocab)
            stats = run_requests(pipe.async_engine, prompts, gen)
            _report(f"T1-prefix{PREFIX_LEN}", "prefix caching " + ("on" if caching else "off"), stats,
                    pipe.engine.stats(), requests=len(prompts))


def _conversations(vocab: int):
    """The first message of each conversation and each turn's new user message (numpy seed 2)."""
    rng = np.random.default_rng(2)
    first = [rng.integers(0, vocab, CHAT_FIRST).tolist() for _ in range(CHAT_N)]
    users = [[rng.integers(0, vocab, CHAT_USER).tolist() for _ in range(CHAT_N)] for _ in range(CHAT_TURNS)]
    return first, users


def chat(model: str) -> None:
    gen = GenerationConfig(max_new_tokens=CHAT_NEW, ignore_eos=True)
    session_len = CHAT_FIRST + CHAT_TURNS * (CHAT_USER + CHAT_NEW)
    for caching in (True, False):
        with pipeline(model, backend_config=_engine_config(session_len=session_len, enable_prefix_caching=caching),
                      log_level="INFO") as pipe:
            vocab = pipe.engine.model_config.vocab_size
            _warm_up(pipe, vocab)
            histories, users = _conversations(vocab)
            turns, start = [], time.perf_counter()
            for turn in range(CHAT_TURNS):
                prompts = [h + u for h, u in zip(histories, users[turn])]
                stats = run_requests(pipe.async_engine, prompts, gen)
                histories = [p + out for p, out in zip(prompts, stats.token_ids)]
                turns.append(stats)
                print(f"chat turn {turn}: {stats.summary()}", flush=True)
            total = RunStats(wall_s=time.perf_counter() - start, prompt_tokens=sum(t.prompt_tokens for t in turns),
                             output_tokens=sum(t.output_tokens for t in turns),
                             ttft_s=[x for t in turns for x in t.ttft_s])
            _report("chat-resend-history", "prefix caching " + ("on" if caching else "off"), total,
                    pipe.engine.stats(), conversations=CHAT_N, turns=CHAT_TURNS,
                    ttft_p50_by_turn_s=[round(statistics.median(t.ttft_s), 4) for t in turns])


def swap(model: str) -> None:
    gen = GenerationConfig(max_new_tokens=SWAP_NEW, ignore_eos=True)
    blocks_each = -(-(SWAP_PROMPT + SWAP_NEW) // BLOCK)
    device_blocks = max(blocks_each + 1, SWAP_N * blocks_each // SWAP_FIT)
    for host_blocks in (SWAP_N * blocks_each, 0):
        config = _engine_config(session_len=SWAP_PROMPT + SWAP_NEW, max_batch_size=SWAP_N,
                                num_gpu_blocks=device_blocks, num_cpu_blocks=host_blocks,
                                enable_prefix_caching=False)
        with pipeline(model, backend_config=config, log_level="INFO") as pipe:
            vocab = pipe.engine.model_config.vocab_size
            prompts = np.random.default_rng(3).integers(0, vocab, (SWAP_N, SWAP_PROMPT)).tolist()
            _warm_up(pipe, vocab)
            stats = run_requests(pipe.async_engine, prompts, gen)
            _report("swap-heavy", f"swap ({host_blocks} host blocks)" if host_blocks else "recompute only", stats,
                    pipe.engine.stats(), requests=SWAP_N, device_blocks=device_blocks, block_size=BLOCK)


WORKLOADS = {"t1prefix": t1_prefix, "chat": chat, "swap": swap}


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    model = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}: choose from {', '.join(WORKLOADS)}")
    print("torch", torch.__version__, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          flush=True)
    for name in names:
        WORKLOADS[name](model)
    header = ("workload", "setting", "wall s", "out tok/s", "total tok/s", "TTFT p50 s", "hit rate", "preempt",
              "swap out/in")
    print(" | ".join(header))
    for row in TABLE:
        print(" | ".join(str(x) for x in row))


if __name__ == "__main__":
    main()
