"""tidemind on the GPU machine: greedy equality with transformers, and the D1 / T1 workloads.

    python benchmarks/gpu_bench.py check GGUF        # SmolLM2 float32: 32 prompts, 64 new tokens,
                                                     # one at a time and batched, vs transformers
    python benchmarks/gpu_bench.py d1t1 MODEL_DIR    # D1 and T1 (benchmarks/WORKLOADS.md) in bfloat16

Every figure is appended to $OUT/results.jsonl in the same format as the peer scripts
(../shared/bench/gpu), so one summary table holds tidemind and its peers from the same machine.
For a CPU dry run of the script itself: D1_NEW=8 T1_N=4 T1_NEW=4 python ... d1t1 SMALL_MODEL_DIR.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.bench.offline import run_requests
from tidemind.bench.workloads import chat_prompts, random_prompt, t1_prompts

D1_NEW = int(os.environ.get("D1_NEW", 512))
T1_NEW = int(os.environ.get("T1_NEW", 256))
T1_N = int(os.environ.get("T1_N", 512))
CMD = "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:])


def record(**fields) -> None:
    fields.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
    fields.setdefault("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "results.jsonl"), "a") as f:
        f.write(line + "\n")


def _hf_reference(gguf: str, prompts, device: str, attn_implementation: str = "sdpa"):
    """transformers' greedy ids and, per prompt, its log-softmax at every generated position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=attn_implementation).to(device).eval()
    expected, logprobs = [], []
    with torch.inference_mode():
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text).input_ids], device=device)
            out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id, output_scores=True,
                                 return_dict_in_generate=True)
            expected.append(out.sequences[0, ids.shape[1]:].tolist())
            logprobs.append([torch.log_softmax(s[0].float(), -1).cpu() for s in out.scores])
    return expected, logprobs


def _divergence(ours, theirs, hf_logprobs, our_logprobs):
    """Where greedy paths part and how close to a tie transformers' top two tokens were there."""
    j = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if j is None:  # one is a prefix of the other: it stopped (EOS) where the other went on
        j = min(len(ours), len(theirs))
        return {"position": j, "our_len": len(ours), "hf_len": len(theirs),
                "next_tokens": {"ours": ours[j:j + 2], "hf": theirs[j:j + 2]}}
    lp = hf_logprobs[j]
    return {"position": j, "hf_token": theirs[j], "our_token": ours[j],
            "hf_logprob_gap": round(float(lp[theirs[j]] - lp[ours[j]]), 6),
            "our_logprob_gap": round(our_logprobs[j][ours[j]] - our_logprobs[j].get(theirs[j], float("-inf")), 6)}


def check(gguf: str, device: str = "cuda") -> None:
    """Greedy token ids of tidemind and transformers on the same GGUF, float32.

    transformers runs twice, with its SDPA and its eager attention: how often those two disagree
    with each other is the float32 noise floor of the comparison on this device."""
    prompts = chat_prompts()[:int(os.environ.get("CHECK_PROMPTS", 32))]  # fewer only for dry runs
    print("float32 matmul precision:", torch.get_float32_matmul_precision(),
          "cuda.matmul.allow_tf32:", torch.backends.cuda.matmul.allow_tf32, flush=True)
    implementations = os.environ.get("CHECK_REFERENCES", "sdpa,eager").split(",")
    references = {impl: _hf_reference(gguf, prompts, device, impl) for impl in implementations}
    if device == "cuda":
        torch.cuda.empty_cache()
    if {"sdpa", "eager"} <= references.keys():
        floor = [i for i in range(len(prompts)) if references["sdpa"][0][i] != references["eager"][0][i]]
        record(system="hf-transformers", workload="greedy-sdpa-vs-eager", prompts=len(prompts), new_tokens=64,
               dtype="float32", mismatched_prompts=floor, cmd=CMD)
        print(f"transformers sdpa vs eager: {len(prompts) - len(floor)}/{len(prompts)} prompts identical", flush=True)
    greedy = GenerationConfig(max_new_tokens=64, logprobs=2)
    with pipeline(gguf, backend_config=EngineConfig(dtype="float32", device=device), log_level="INFO") as pipe:
        runs = {"one at a time": [pipe(p, greedy) for p in prompts], "batched": pipe(prompts, greedy)}
        stop_ids = pipe.engine.eos_token_ids
    # transformers versions disagree on a GGUF tokenizer's EOS (5.17 takes <|endoftext|>, 5.24
    # <|im_end|>), so transformers generates with its own and its output is cut after the first
    # token of the model's EOS set (generation_config + tokenizer, what our engine stops on).
    for expected, _ in references.values():
        for i, ids in enumerate(expected):
            end = next((j + 1 for j, t in enumerate(ids) if t in stop_ids), len(ids))
            expected[i] = ids[:end]
    for impl, (expected, hf_logprobs) in references.items():
        # Noise level: our log-probs of the first answer token's top two against transformers' own.
        first_diff = max(abs(r.logprobs[0][tok] - hf_logprobs[i][0][tok].item())
                         for i, r in enumerate(runs["one at a time"]) for tok in r.logprobs[0])
        for mode, got in runs.items():
            mismatched = {i: _divergence(r.token_ids, expected[i], hf_logprobs[i], r.logprobs)
                          for i, r in enumerate(got) if r.token_ids != expected[i]}
            record(system="tidemind", workload="greedy-vs-transformers", reference=impl, mode=mode,
                   prompts=len(prompts), new_tokens=64, dtype="float32", mismatched_prompts=mismatched,
                   max_first_token_logprob_diff=first_diff, cmd=CMD)
            print(f"{mode} vs transformers-{impl}: {len(prompts) - len(mismatched)}/{len(prompts)} identical; "
                  f"first-token log-prob difference up to {first_diff:.2e}; divergences {mismatched}", flush=True)


def d1(pipe) -> None:
    engine = pipe.async_engine
    prompt = [random_prompt(pipe.engine.model_config.vocab_size)]
    run_requests(engine, prompt, GenerationConfig(max_new_tokens=32, ignore_eos=True))  # warm-up
    runs = []
    for _ in range(3):
        stats = run_requests(engine, prompt, GenerationConfig(max_new_tokens=D1_NEW, ignore_eos=True))
        runs.append(dict(ttft_s=stats.ttft_s[0], decode_tok_s=stats.decode_tok_s(), total_s=stats.wall_s))
        print("D1 run", runs[-1], flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    record(system="tidemind", workload="D1", runs=runs, cmd=CMD, **med)


def t1(pipe) -> None:
    engine = pipe.async_engine
    vocab = pipe.engine.model_config.vocab_size
    warm = t1_prompts(vocab, 64)
    start = time.perf_counter()
    run_requests(engine, warm, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    print(f"T1 warm-up (64 requests x 16 tokens) {time.perf_counter() - start:.1f}s", flush=True)
    prompts = t1_prompts(vocab, T1_N)
    stats = run_requests(engine, prompts, GenerationConfig(max_new_tokens=T1_NEW, ignore_eos=True))
    print("T1", stats.summary(), flush=True)
    record(system="tidemind", workload="T1", requests=len(prompts), preemptions=pipe.engine.scheduler.num_preemptions,
           cmd=CMD, **stats.summary())


def main() -> None:
    verb, path = sys.argv[1], sys.argv[2]
    if verb == "check":
        check(path, os.environ.get("CHECK_DEVICE", "cuda"))
    elif verb == "d1t1":
        config = EngineConfig(session_len=2048, max_batch_size=256, cache_max_entry_count=0.8)
        with pipeline(path, backend_config=config, log_level="INFO") as pipe:
            d1(pipe)
            t1(pipe)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
