"""Host time of an engine decode step, without the model's device work: how much of a step the
host spends scheduling, preparing the runner's inputs, sampling bookkeeping, updating requests and
making their outputs (detokenizing included) -- the time the GPU waits for the host unless the two
overlap.

    python benchmarks/host_step_time.py [--batch 256] [--steps 100]

The bundled SmolLM2 is loaded (its tokenizer makes detokenizing real), then its forward pass and LM
head are replaced by stubs that return at once (fixed random logits, so every request gets a real
token to detokenize); `batch` requests of 128-token prompts decode together, and each phase of
Engine.step is timed over `steps` steps. Results are printed and appended to
benchmarks/results/host_step_time.jsonl.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import torch

from tidemind import EngineConfig, GenerationConfig
from tidemind.bench.host_timers import timed
from tidemind.bench.workloads import chat_prompts
from tidemind.engine.engine import Engine
from tidemind.runner import model_runner as model_runner_module

RESULTS = Path(__file__).resolve().parent / "results" / "host_step_time.jsonl"


def stub_model(engine: Engine) -> None:
    """Forward and LM head that cost nothing: hidden states are not looked at, logits are fixed
    random tensors made once (several, used in turn, so that the text varies from step to step),
    over the first 4,096 token ids only: the argmax over a full vocabulary is device work on a GPU,
    not host work, and would dominate here."""
    runner = engine.executor.runner
    vocab, hidden = 4096, engine.model_config.hidden_size
    generator = torch.Generator().manual_seed(0)
    tables = [torch.randn(engine.max_batch_size, vocab, generator=generator) for _ in range(7)]
    calls = [0]

    def forward(input_ids, positions, kv_caches, metadata):
        return torch.empty(input_ids.shape[0], hidden)

    def compute_logits(hidden_states):
        calls[0] += 1
        return tables[calls[0] % len(tables)][:hidden_states.shape[0]]

    runner.model.forward = forward
    runner.model.compute_logits = compute_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--label", default="", help="names this measurement in the results file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # host work is single-threaded; the stub's argmax stays small and steady
    engine = Engine(None, EngineConfig(device="cpu", dtype="float32", max_batch_size=args.batch, session_len=2048))
    stub_model(engine)
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(p)[:128] for p in chat_prompts()]
    gen = GenerationConfig(max_new_tokens=args.steps + 20, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(i, prompts[i % len(prompts)], gen)
    for _ in range(5):  # prefill and settle
        engine.step()
    totals = collections.defaultdict(float)
    scheduler, runner = engine.scheduler, engine.executor.runner
    scheduler.schedule = timed(totals, "schedule", scheduler.schedule)
    scheduler.update = timed(totals, "update", scheduler.update)
    runner.execute = timed(totals, "runner", runner.execute)
    model_runner_module.prepare_step = timed(totals, "prepare_step", model_runner_module.prepare_step)
    engine._new_texts = timed(totals, "detokenize", engine._new_texts)
    engine._token_output = timed(totals, "outputs", engine._token_output)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    total = time.perf_counter() - start
    per_step = {key: round(1e3 * value / args.steps, 3) for key, value in totals.items()}
    per_step["step"] = round(1e3 * total / args.steps, 3)
    per_step["runner_other"] = round(per_step["runner"] - per_step["prepare_step"], 3)
    result = {"batch": args.batch, "steps": args.steps, "label": args.label, "per_step_ms": per_step,
              "cpu": platform.processor() or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "cmd": "python benchmarks/host_step_time.py " + f"--batch {args.batch} --steps {args.steps}"}
    print(json.dumps(result))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")
    engine.close()


if __name__ == "__main__":
    main()
