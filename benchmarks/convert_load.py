"""Load time of a model directory against its `tidemind convert` output, on this CPU (float32).

usage: python benchmarks/convert_load.py [MODEL] [--runs 7] [--out benchmarks/results/convert_load.json]

MODEL (default: the bundled SmolLM2, as the Hugging Face directory its GGUF converts to) is converted
once with `tidemind convert --dtype float32`; then each run loads the source and the converted
directory in turn, each in a fresh process (no allocator or module state carried over; the files
stay in the page cache, as on a machine that has read them before). A load is what the runner does
at start-up: load_model (build, read, place the weights) then the CPU dense backend's repacking,
timed apart. Figures are medians with the spread of the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import sys, time, torch
from tidemind.loader import load_model
from tidemind.runner.dense_backend import apply_dense_backend, resolve_dense_backend
torch.set_num_threads(int(sys.argv[2]))
start = time.perf_counter()
model, _ = load_model(sys.argv[1], torch.float32, torch.device("cpu"))
loaded = time.perf_counter()
apply_dense_backend(model, resolve_dense_backend("auto", torch.device("cpu"), torch.float32))
print(loaded - start, time.perf_counter() - loaded)
"""


def load_once(path: str, threads: int) -> tuple:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(threads)], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return float(out[0]), float(out[1])


def summary(samples: list) -> dict:
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3),
            "max_s": round(max(samples), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/convert_load.json")
    args = parser.parse_args()

    from tidemind.convert import convert
    from tidemind.loader.resolve import resolve_model

    source = resolve_model(args.model).path
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert(source, os.path.join(tmp, "prefused"), "float32")
        times = {"source": [], "prefused": []}
        for _ in range(args.runs):
            for name, path in (("source", source), ("prefused", converted.dst_path)):
                times[name].append(load_once(path, args.threads))
    result = {"model": args.model or "smollm2-135m (bundled, as its HF directory)", "runs": args.runs,
              "threads": args.threads, "convert_s": round(converted.seconds, 2),
              "tensors": {"prefused": converted.num_tensors}}
    for name, samples in times.items():
        result[name] = {"load_model": summary([s[0] for s in samples]), "repack": summary([s[1] for s in samples]),
                        "total": summary([s[0] + s[1] for s in samples])}
    result["speedup_total"] = round(result["source"]["total"]["median_s"] / result["prefused"]["total"]["median_s"], 2)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
