"""C1 and C3 (benchmarks/WORKLOADS.md) on this CPU, every peer in the same script run, in
alternating rounds (other work on a shared machine hits them alike; the figures are medians):
tidemind on the bundled SmolLM2 GGUF at its stored precision (the CPU default: int4 / int8
kernels), Hugging Face transformers on the same GGUF dequantized to float32, and llama.cpp's
llama-bench on the same file for C3 (tg256 after a 128-token context; built by
build_llama_server.sh, skipped with a note when it is not there). --with-float32 adds tidemind's
float32 path (--dtype float32).

usage: python benchmarks/cpu_peers.py [--rounds 3] [--with-float32] [--out benchmarks/results/cpu]
writes OUT.json and OUT.png

With the machine's ceilings (tidemind/bench/cpu_ceilings.py) it reports each figure's share of its
roofline: C3's decode against copy bandwidth / the weight bytes a token streams (as each peer
stores them), C1's total tokens/s against the float32 matmul rate / (2 * weights per token).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch

from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.bench.cpu_ceilings import measure_cpu_ceilings, step_weight_bytes, step_weight_count
from tidemind.bench.cpu_kernel_choices import kernel_choices
from tidemind.bench.offline import run_requests
from tidemind.bench.workloads import WORKLOADS, chat_prompts, random_prompt
from tidemind.loader.bundled import SMOLLM2

THREADS = 2
BENCH_CACHE = os.environ.get("TIDEMIND_BENCH_CACHE", os.path.expanduser("~/.cache/tidemind-bench"))
LLAMA_BENCH = os.path.join(BENCH_CACHE, "llama-bench")


def bench_tidemind(dtype: str = "auto") -> dict:
    results = {}
    with pipeline(backend_config=EngineConfig(dtype=dtype, device="cpu", num_threads=THREADS)) as pipe:
        engine = pipe.async_engine
        c1 = [pipe.encode_prompt(p) for p in chat_prompts()]
        run_requests(engine, c1, GenerationConfig(max_new_tokens=8, ignore_eos=True))  # warm-up
        stats = run_requests(engine, c1, GenerationConfig(max_new_tokens=WORKLOADS["C1"].new_tokens, ignore_eos=True))
        results["C1"] = stats.summary()
        c3 = [random_prompt(pipe.engine.model_config.vocab_size)]
        stats = run_requests(engine, c3, GenerationConfig(max_new_tokens=WORKLOADS["C3"].new_tokens, ignore_eos=True))
        results["C3"] = {**stats.summary(), "decode_tok_s": round(stats.decode_tok_s(), 2)}
        model = pipe.engine.executor.runner.model
        results["step_weights"] = step_weight_count(model)
        results["step_weight_bytes"] = step_weight_bytes(model)
    return results


def gguf_weight_bytes() -> int:
    """Bytes of every tensor of the GGUF: what llama.cpp streams a token (its LM head is the tied
    embedding table, read whole)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(SMOLLM2.locate()).tensors)


def bench_llama_cpp() -> dict:
    """C3 with llama-bench: 256 tokens generated after a 128-token context, THREADS threads."""
    command = [LLAMA_BENCH, "-m", SMOLLM2.locate(), "-p", "0", "-n", str(WORKLOADS["C3"].new_tokens), "-d", "128",
               "-t", str(THREADS), "-r", "1", "-o", "json"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {proc.stderr[-2000:]}")
    row = json.loads(proc.stdout)[0]
    return {"C3": {"decode_tok_s": round(float(row["avg_ts"]), 2), "build": row.get("build_commit"),
                   "command": "llama-bench -m <gguf> -p 0 -n 256 -d 128 -t 2 -r 1 -o json"},
            "step_weight_bytes": gguf_weight_bytes()}


def median_of(runs: list, workload: str, key: str):
    values = [run[workload][key] for run in runs if workload in run]
    return round(statistics.median(values), 2) if values else None


class _TokenTimes:
    """transformers streamer: put() is called with the prompt, then once per generated token."""

    def __init__(self):
        self.times = []

    def put(self, _value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def bench_transformers() -> dict:
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = SMOLLM2.locate()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = dict(do_sample=False, eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in chat_prompts()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    results = {}
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=8, min_new_tokens=8, **config)  # warm-up
        new = WORKLOADS["C1"].new_tokens
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, **config)
        wall = time.perf_counter() - start
        generated = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
        prompt_tokens = int(batch.attention_mask.sum())  # without the padding
        results["C1"] = {"wall_s": round(wall, 3), "prompt_tokens": prompt_tokens, "output_tokens": generated,
                         "output_tok_s": round(generated / wall, 2),
                         "total_tok_s": round((prompt_tokens + generated) / wall, 2),
                         "batch_padded_to": batch.input_ids.shape[1]}
        ids = torch.tensor([random_prompt(model.config.vocab_size)])
        new = WORKLOADS["C3"].new_tokens
        streamer = _TokenTimes()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       streamer=streamer, **config)
        wall = time.perf_counter() - start
        first, last = streamer.times[1], streamer.times[-1]
        results["C3"] = {"wall_s": round(wall, 3), "output_tokens": new, "output_tok_s": round(new / wall, 2),
                         "ttft_p50_s": round(first - start, 4), "decode_tok_s": round((new - 1) / (last - first), 2)}
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, (("C1_output_tok_s", "C1: 32 prompts batched, output tok/s"),
                                       ("C3_decode_tok_s", "C3: batch 1 decode, tok/s"))):
        names = [n for n, m in results["median"].items() if m[key]]
        bars = ax.bar(names, [results["median"][n][key] for n in names],
                      color=["#1f77b4" if n.startswith("tidemind") else "#999999" for n in names])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    env = results["env"]
    kernels = f", tidemind's {env['tidemind_cpu_isa']} kernels" if "tidemind_cpu_isa" in env else ""
    fig.suptitle(f"SmolLM2-135M GGUF (tidemind, llama.cpp: Q4_1 as stored; transformers: float32) on {THREADS} CPU "
                 f"threads ({results['machine']['cpu']}{kernels}), median of {env['rounds']} rounds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with-float32", action="store_true", help="also tidemind --dtype float32")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    ceilings = measure_cpu_ceilings()
    peers = {"tidemind": bench_tidemind, "transformers": bench_transformers}
    if args.with_float32:
        peers["tidemind_float32"] = lambda: bench_tidemind("float32")
    notes = []
    if os.path.exists(LLAMA_BENCH):
        peers["llama.cpp"] = bench_llama_cpp
    else:
        notes.append("llama.cpp left out: no llama-bench (run benchmarks/build_llama_server.sh)")
    runs = {name: [] for name in peers}
    for i in range(args.rounds):
        for name, bench in peers.items():
            runs[name].append(bench())
            print(f"round {i} {name}: {json.dumps(runs[name][-1].get('C3'))}", flush=True)
    weights = runs["tidemind"][0]["step_weights"]
    roof = {"C1_total_tok_s": round(ceilings["matmul_fp32_GFLOPs"] * 1e9 / (2 * weights), 1)}
    results = {"machine": ceilings, "rounds": runs, "median": {}, "share_of_roofline": {}, "notes": notes}
    for name, name_runs in runs.items():
        median = {f"{w}_{k}": median_of(name_runs, w, k) for w, k in
                  (("C1", "output_tok_s"), ("C1", "total_tok_s"), ("C3", "decode_tok_s"))}
        results["median"][name] = median
        step_bytes = name_runs[0].get("step_weight_bytes") or 4 * weights  # transformers: float32
        c3_roof = ceilings["copy_GBps"] * 1e9 / step_bytes
        roof[f"C3_decode_tok_s_{name}"] = round(c3_roof, 1)
        results["share_of_roofline"][name] = {
            "C3_decode_tok_s": round(median["C3_decode_tok_s"] / c3_roof, 3),
            **({"C1_total_tok_s": round(median["C1_total_tok_s"] / roof["C1_total_tok_s"], 3)}
               if median["C1_total_tok_s"] else {})}
    results["machine"]["roofline_tok_s"] = roof
    ours = results["median"]["tidemind"]
    results["ratio"] = {f"{key}_vs_{peer}": round(ours[key] / results["median"][peer][key], 2)
                        for peer in results["median"] if peer != "tidemind"
                        for key in ("C1_output_tok_s", "C3_decode_tok_s") if results["median"][peer][key]}
    results["env"] = {"torch": torch.__version__, "threads": THREADS, "cpu": ceilings["cpu"],
                      **kernel_choices(BENCH_CACHE), "rounds": args.rounds,
                      "command": "python benchmarks/cpu_peers.py" + (" --with-float32" if args.with_float32 else "")
                      + f" --rounds {args.rounds}"}
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out + ".png")
    print(json.dumps({k: results[k] for k in ("median", "ratio", "share_of_roofline", "machine")}, indent=1))


if __name__ == "__main__":
    main()
