"""tidemind on the GPU machine: greedy equality with transformers, and the D1 / L1 / T1 / S1 workloads.

    python benchmarks/gpu_bench.py check GGUF        # SmolLM2 float32: 32 prompts, 64 new tokens, vs
                                                     # transformers: one at a time and batched, CUDA
                                                     # graphs and eager, and a batch limit of 4
    python benchmarks/gpu_bench.py perf MODEL_DIR    # start-up, KV tokens, D1, L1, T1 (WORKLOADS.md), bf16;
                                                     # then (PERF_PLAIN=1, the default) start-up again,
                                                     # D1 and T1 once in the plain loop (no overlap)
    python benchmarks/gpu_bench.py serve MODEL_DIR   # S1 at rate inf through tidemind's own api_server
                                                     # (engine process, then engine thread)

Every figure is appended to $OUT/results.jsonl in the same format as the peer scripts
(../shared/bench/gpu), so one summary table holds tidemind and its peers from the same machine.
For a CPU dry run of the script itself: D1_NEW=8 L1_LEN=64 T1_N=4 T1_NEW=4 python ... perf SMALL_MODEL_DIR.
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
L1_LEN = int(os.environ.get("L1_LEN", 8000))
T1_NEW = int(os.environ.get("T1_NEW", 256))
T1_N = int(os.environ.get("T1_N", 512))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
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
    runs = {}
    # (label, engine settings): CUDA graphs (the default) one at a time and batched, eager batched,
    # batched under a batch limit of 4 (other batch compositions and graph sizes), and batched in
    # the plain loop (no overlap of consecutive steps).
    modes = (("graphs, one at a time", {}), ("graphs, batched", {}), ("eager, batched", {"eager_mode": True}),
             ("graphs, max_batch_size=4", {"max_batch_size": 4}),
             ("graphs, batched, no overlap", {"overlap_schedule": False}))
    for label, settings in modes:
        config = EngineConfig(dtype="float32", device=device, **settings)
        with pipeline(gguf, backend_config=config, log_level="INFO") as pipe:
            one_by_one = label.endswith("one at a time")
            runs[label] = [pipe(p, greedy) for p in prompts] if one_by_one else pipe(prompts, greedy)
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
                         for i, r in enumerate(runs["graphs, one at a time"]) for tok in r.logprobs[0])
        for mode, got in runs.items():
            mismatched = {i: _divergence(r.token_ids, expected[i], hf_logprobs[i], r.logprobs)
                          for i, r in enumerate(got) if r.token_ids != expected[i]}
            record(system="tidemind", workload="greedy-vs-transformers", reference=impl, mode=mode,
                   prompts=len(prompts), new_tokens=64, dtype="float32", mismatched_prompts=mismatched,
                   max_first_token_logprob_diff=first_diff, cmd=CMD)
            print(f"{mode} vs transformers-{impl}: {len(prompts) - len(mismatched)}/{len(prompts)} identical; "
                  f"first-token log-prob difference up to {first_diff:.2e}; divergences {mismatched}", flush=True)
    base = [r.token_ids for r in runs["graphs, one at a time"]]
    # Without logprobs a greedy step's ids stay on the device (argmax) and the next step is queued
    # behind it before they reach the host: the overlapped loop's own path.
    with pipeline(gguf, backend_config=EngineConfig(dtype="float32", device=device), log_level="INFO") as pipe:
        runs["graphs, batched, ids only"] = pipe(prompts, GenerationConfig(max_new_tokens=64))
    for mode, got in runs.items():
        differ = [i for i, r in enumerate(got) if r.token_ids != base[i]]
        record(system="tidemind", workload="greedy-mode-invariance", mode=mode, prompts=len(prompts),
               differing_from_graphs_one_at_a_time=differ, cmd=CMD)
        print(f"{mode}: {len(prompts) - len(differ)}/{len(prompts)} identical to graphs one at a time", flush=True)


def d1(pipe, **tags) -> dict:
    """D1 after a warm-up, median of 3 (recorded with `tags`); returns the median."""
    engine = pipe.async_engine
    prompt = [random_prompt(pipe.engine.model_config.vocab_size)]
    run_requests(engine, prompt, GenerationConfig(max_new_tokens=32, ignore_eos=True))  # warm-up
    runs = []
    for _ in range(3):
        pipe.engine.reset_prefix_cache()  # every run computes its prompt (the engine is idle between runs)
        stats = run_requests(engine, prompt, GenerationConfig(max_new_tokens=D1_NEW, ignore_eos=True))
        runs.append(dict(ttft_s=stats.ttft_s[0], decode_tok_s=stats.decode_tok_s(), total_s=stats.wall_s))
        print("D1 run", runs[-1], flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    record(system="tidemind", workload="D1", runs=runs, cmd=CMD, **tags, **med)
    return med


def l1(pipe) -> None:
    """Time to first token of one L1_LEN-token prompt (64 new tokens), median of 3 after a warm-up."""
    engine = pipe.async_engine
    prompt = [random_prompt(pipe.engine.model_config.vocab_size, L1_LEN)]
    gen = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    run_requests(engine, prompt, gen)
    ttfts = []
    for _ in range(3):
        pipe.engine.reset_prefix_cache()  # else the prompt's blocks come from the run before
        ttfts.append(run_requests(engine, prompt, gen).ttft_s[0])
    print("L1 TTFT", ttfts, flush=True)
    record(system="tidemind", workload="L1", prompt_tokens=L1_LEN, ttft_s=statistics.median(ttfts), runs=ttfts, cmd=CMD)


def t1(pipe, reps: int = 0, **tags) -> list:
    """T1 after a warm-up, `reps` (else T1_REP) times; each rep recorded (with `tags`); returns their summaries."""
    engine = pipe.async_engine
    vocab = pipe.engine.model_config.vocab_size
    warm = t1_prompts(vocab, 64)
    start = time.perf_counter()
    run_requests(engine, warm, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    print(f"T1 warm-up (64 requests x 16 tokens) {time.perf_counter() - start:.1f}s", flush=True)
    prompts = t1_prompts(vocab, T1_N)
    summaries = []
    for rep in range(reps or int(os.environ.get("T1_REP", 2))):
        before = pipe.engine.scheduler.num_preemptions
        pipe.engine.reset_prefix_cache()  # the same prompts again: not served from the rep before
        stats = run_requests(engine, prompts, GenerationConfig(max_new_tokens=T1_NEW, ignore_eos=True))
        print(f"T1 rep {rep}", stats.summary(), flush=True)
        summaries.append(dict(stats.summary(), preemptions=pipe.engine.scheduler.num_preemptions - before))
        record(system="tidemind", workload="T1", rep=rep, requests=len(prompts), cmd=CMD, **tags, **summaries[-1])
    return summaries


def perf(model_dir: str) -> None:
    """Start-up, KV tokens, D1, L1, T1 with the default engine; should it fail to start (a first run
    on new hardware), the traceback is recorded and the run goes on in eager mode."""
    import traceback

    config = EngineConfig(session_len=int(os.environ.get("SESSION_LEN", 8192)), max_batch_size=256,
                          cache_max_entry_count=0.8, device=DEVICE)
    try:
        _perf_with(model_dir, config)
        if os.environ.get("PERF_PLAIN", "1") == "1":
            _plain_loop(model_dir, config)
    except Exception:
        record(system="tidemind", workload="perf-failed", traceback=traceback.format_exc(), cmd=CMD)
        traceback.print_exc()
        if config.eager_mode:
            raise
        import torch

        torch.cuda.empty_cache()
        _perf_with(model_dir, EngineConfig(**{**config.__dict__, "eager_mode": True}))


def _perf_with(model_dir: str, config: EngineConfig) -> None:
    from tidemind.bench.device_ceilings import decode_roofline, measure_copy_bandwidth

    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    kernel_cache = "cold" if cache_dir and not os.listdir(cache_dir) else "as found"
    start = time.perf_counter()
    with pipeline(model_dir, backend_config=config, log_level="INFO") as pipe:
        startup = time.perf_counter() - start
        runner = pipe.engine.executor.runner
        roofline = decode_roofline(runner.model, measure_copy_bandwidth(runner.device))
        record(system="tidemind", workload="startup", kernel_cache=kernel_cache, startup_s=startup,
               engine=pipe.engine.executor.description,
               kv_cache_tokens=pipe.engine.kv_spec.num_tokens, kv_cache_blocks=pipe.engine.kv_spec.num_blocks,
               block_size=pipe.engine.kv_spec.block_size, roofline=roofline, cmd=CMD)
        print(f"ready in {startup:.1f}s; KV cache {pipe.engine.kv_spec.num_tokens} tokens; roofline {roofline}", flush=True)
        d1(pipe)
        l1(pipe)
        t1(pipe)


def t1_only(model_dir: str) -> None:
    """T1 alone with the default engine (the figure S1 is judged against, in the same call)."""
    config = EngineConfig(session_len=int(os.environ.get("SESSION_LEN", 8192)), max_batch_size=256,
                          cache_max_entry_count=0.8, device=DEVICE)
    with pipeline(model_dir, backend_config=config, log_level="INFO") as pipe:
        t1(pipe)


def _plain_loop(model_dir: str, config: EngineConfig) -> None:
    """What the overlap of consecutive steps gives: D1 and T1 once more with it off; the start-up
    of this second engine is the one with Triton's kernel cache warm."""
    start = time.perf_counter()
    plain = EngineConfig(**{**config.__dict__, "overlap_schedule": False})
    with pipeline(model_dir, backend_config=plain, log_level="INFO") as pipe:
        startup = time.perf_counter() - start
        record(system="tidemind", workload="startup", kernel_cache="warm", startup_s=startup, cmd=CMD)
        print(f"plain loop: ready in {startup:.1f}s (Triton kernel cache warm)", flush=True)
        d1(pipe, loop="plain")
        t1(pipe, reps=int(os.environ.get("T1_REP_PLAIN", 1)), loop="plain")


def _wait_healthy(url: str, server, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the api_server exited with {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the api_server was not healthy within {timeout:.0f}s")


def serve(model_dir: str) -> None:
    """S1 at rate inf: the T1 requests over HTTP to `tidemind serve api_server`, streamed, after the
    warm-up T1 has; once with the engine in a process of its own (the default on a GPU), once in a
    thread of the server (S1_ENGINE_MODES picks: "process thread")."""
    for mode in os.environ.get("S1_ENGINE_MODES", "process thread").split():
        _serve_once(model_dir, mode)


def _serve_once(model_dir: str, engine: str) -> None:
    import subprocess

    port = int(os.environ.get("S1_PORT", 23400))
    out = os.path.join(os.environ.get("OUT", "/tmp"), f"s1-{engine}")
    flag = "--engine-process" if engine == "process" else "--no-engine-process"
    server = subprocess.Popen([sys.executable, "-m", "tidemind.cli.main", "serve", "api_server", model_dir,
                               "--server-port", str(port), "--session-len", "8192", "--max-batch-size", "256",
                               flag, "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def bench_serve(num_prompts: int, max_tokens: int, vocab: str, out: str) -> list:
            return [sys.executable, "-m", "tidemind.cli.main", "bench", "serve", "--url", f"http://127.0.0.1:{port}",
                    "--workload", "S1", "--request-rate", "inf", "--num-prompts", str(num_prompts),
                    "--max-tokens", str(max_tokens), "--vocab-size", vocab, "--out", out, "--no-progress",
                    "--label", f"tidemind, engine {engine}"]
        _wait_healthy(f"http://127.0.0.1:{port}/health", server, timeout=300)
        # the warm-up T1 has (64 requests x 16 tokens): the first prefills compile their kernels. Its ids
        # are drawn below another bound, so they share no prefix (cached KV) with the measured prompts.
        started = time.perf_counter()
        subprocess.run(bench_serve(64, 16, "32000", out + "-warmup"), check=True, stdout=subprocess.DEVNULL)
        print(f"S1 warm-up (64 requests x 16 tokens) {time.perf_counter() - started:.1f}s", flush=True)
        cmd = bench_serve(T1_N, T1_NEW, os.environ.get("S1_VOCAB", "49152"), out)
        subprocess.run(cmd, check=True)
        with open(out + ".json") as f:
            summary = json.load(f)["runs"][0]["summary"]
        record(system="tidemind", workload="S1", request_rate="inf", engine=engine,
               cmd=f"serve api_server {flag}; " + " ".join(cmd[1:]), **summary)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    verb, path = sys.argv[1], sys.argv[2]
    if verb == "check":
        check(path, os.environ.get("CHECK_DEVICE", "cuda"))
    elif verb == "perf":
        perf(path)
    elif verb == "serve":
        serve(path)
    elif verb == "t1":
        t1_only(path)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
