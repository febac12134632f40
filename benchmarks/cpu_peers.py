"""C1 and C3 (benchmarks/WORKLOADS.md) on this CPU: tidemind and Hugging Face transformers, same
weights (the bundled SmolLM2 GGUF dequantized to float32), same prompts, same process.

usage: python benchmarks/cpu_peers.py [--out benchmarks/results/cpu]   (writes OUT.json and OUT.png)

With the machine's ceilings (tidemind/bench/cpu_ceilings.py) it reports each figure's share of its
roofline: C3's decode against copy bandwidth / weight bytes, C1's total tokens/s against the
float32 matmul rate / (2 * weights per token).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.bench.cpu_ceilings import measure_cpu_ceilings, step_weight_count
from tidemind.bench.offline import run_requests
from tidemind.bench.workloads import WORKLOADS, chat_prompts, random_prompt
from tidemind.loader.bundled import SMOLLM2

THREADS = 2


def bench_tidemind() -> dict:
    results = {}
    with pipeline(backend_config=EngineConfig(dtype="float32", device="cpu", num_threads=THREADS)) as pipe:
        engine = pipe.async_engine
        c1 = [pipe.encode_prompt(p) for p in chat_prompts()]
        run_requests(engine, c1, GenerationConfig(max_new_tokens=8, ignore_eos=True))  # warm-up
        stats = run_requests(engine, c1, GenerationConfig(max_new_tokens=WORKLOADS["C1"].new_tokens, ignore_eos=True))
        results["C1"] = stats.summary()
        c3 = [random_prompt(pipe.engine.model_config.vocab_size)]
        stats = run_requests(engine, c3, GenerationConfig(max_new_tokens=WORKLOADS["C3"].new_tokens, ignore_eos=True))
        results["C3"] = {**stats.summary(), "decode_tok_s": round(stats.decode_tok_s(), 2)}
        results["step_weights"] = step_weight_count(pipe.engine.executor.runner.model)
    return results


def rooflines(ceilings: dict, step_weights: int) -> dict:
    """Upper bounds in tokens/s for float32 weights on this machine (see cpu_ceilings)."""
    return {"C3_decode_tok_s": round(ceilings["copy_GBps"] * 1e9 / (4 * step_weights), 1),
            "C1_total_tok_s": round(ceilings["matmul_fp32_GFLOPs"] * 1e9 / (2 * step_weights), 1)}


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

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (workload, key, label) in zip(axes, (("C1", "output_tok_s", "C1: 32 prompts batched, output tok/s"),
                                                  ("C3", "decode_tok_s", "C3: batch 1 decode, tok/s"))):
        names = ["tidemind", "transformers"]
        values = [results[n][workload][key] for n in names]
        bars = ax.bar(names, values, color=["#1f77b4", "#999999"])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"SmolLM2-135M float32 on {THREADS} CPU threads ({results['env']['cpu']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    ceilings = measure_cpu_ceilings()
    results = {"tidemind": bench_tidemind(), "transformers": bench_transformers()}
    roof = rooflines(ceilings, results["tidemind"].pop("step_weights"))
    results["machine"] = {**ceilings, "roofline_tok_s": roof}
    results["share_of_roofline"] = {
        name: {"C1_total_tok_s": round(results[name]["C1"]["total_tok_s"] / roof["C1_total_tok_s"], 3),
               "C3_decode_tok_s": round(results[name]["C3"]["decode_tok_s"] / roof["C3_decode_tok_s"], 3)}
        for name in ("tidemind", "transformers")}
    results["ratio"] = {
        "C1_output_tok_s": round(results["tidemind"]["C1"]["output_tok_s"] / results["transformers"]["C1"]["output_tok_s"], 2),
        "C3_decode_tok_s": round(results["tidemind"]["C3"]["decode_tok_s"] / results["transformers"]["C3"]["decode_tok_s"], 2)}
    results["env"] = {"torch": torch.__version__, "threads": THREADS, "cpu": ceilings["cpu"],
                      "command": "python benchmarks/cpu_peers.py"}
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out + ".png")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
