"""Tensor parallelism on the GPU machine (benchmarks/gpu_run.sh stage tp, on nvidia-h200-x2): D1 and
T1 of tidemind at --tp 1 and --tp 2 on the same model, in one call, and their ratios (issue 11: D1 at
tp 2 >= 1.7x tp 1; T1 at tp 2 >= 1.3x LMDeploy's at tp 2, which stage peerstp2 measures after it in the
same call: STAGES="setup mk allreduce tp peerstp2", about 5 minutes). NCCL_NVLS_ENABLE=0 (gpu_run.sh
exports it; the workers set it too).

    python benchmarks/gpu_tp.py MODEL_DIR                    # on the H200s: /tmp/llama8b, bf16
    TP_SIZES=1,2 D1_NEW=8 T1_N=4 T1_NEW=4 T1_REP=1 BENCH_DEVICE=cpu python benchmarks/gpu_tp.py TINY_DIR
                                                             # dry run of the script on the CPU (gloo)

First a check (TP_CHECK=0 skips it): a tiny random Llama (tests/tp_helpers.py) in float32 on the GPUs,
greedy at tp 2 with CUDA graphs, at tp 2 eager and at tp 2 with NCCL's all-reduce, each against tp 1:
the tokens must be equal (record "tp-check"). Then per tp: one start-up (seconds, engine description,
KV tokens), gpu_bench.py's D1 (warm-up, median of 3) and T1 (warm-up, T1_REP reps), each recorded with
tp; then a summary record of the ratios tp N / tp 1. TP_NCCL_TOO=1 (the default) adds D1 at the
largest tp with every all-reduce on NCCL (TIDEMIND_TP_ALLREDUCE=nccl), for the symmetric-memory
all-reduce's share.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import gpu_bench  # noqa: E402
from gpu_bench import DEVICE, d1, record, t1  # noqa: E402
from tidemind import EngineConfig, GenerationConfig, pipeline  # noqa: E402
from tidemind.bench.offline import run_requests  # noqa: E402
from tidemind.bench.workloads import random_prompt  # noqa: E402
from tidemind.engine.distributed_executor import DistributedExecutor, StepTiming  # noqa: E402
from tidemind.runner.kernel_profile import KernelProfile  # noqa: E402

CMD = gpu_bench.CMD = "python benchmarks/gpu_tp.py " + " ".join(sys.argv[1:])  # d1() / t1() record it too
TP_SIZES = [int(t) for t in os.environ.get("TP_SIZES", "1,2").split(",")]


@contextlib.contextmanager
def all_reduce_setting(setting: str):
    """TIDEMIND_TP_ALLREDUCE for the engines started inside (their workers inherit it)."""
    os.environ["TIDEMIND_TP_ALLREDUCE"] = setting
    try:
        yield
    finally:
        os.environ.pop("TIDEMIND_TP_ALLREDUCE")


def bench_config(tp: int) -> EngineConfig:
    """The engine of D1 / T1 on llama8b-shape, as gpu_bench.py runs it."""
    return EngineConfig(tp=tp, device=DEVICE, session_len=int(os.environ.get("SESSION_LEN", 8192)),
                        max_batch_size=256, cache_max_entry_count=0.8)


def check_tiny() -> bool:
    """Greedy tokens of a tiny float32 Llama at tp 2 (graphs, eager, NCCL all-reduces) equal tp 1's."""
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from tp_helpers import tiny_prompts, tiny_tp_model

    path = tiny_tp_model(tempfile.mkdtemp(prefix="tiny-tp-"))
    prompts, greedy = tiny_prompts(8), GenerationConfig(max_new_tokens=32, ignore_eos=True)
    runs = {"tp 1": dict(tp=1), "tp 2": dict(tp=2), "tp 2 eager": dict(tp=2, eager_mode=True),
            "tp 2 nccl": dict(tp=2, allreduce="nccl")}
    tokens = {}
    for name, settings in runs.items():
        allreduce = settings.pop("allreduce", "auto")
        config = EngineConfig(device=DEVICE, dtype="float32", session_len=256, **settings)
        with all_reduce_setting(allreduce), pipeline(path, backend_config=config) as pipe:
            tokens[name] = [r.token_ids for r in pipe(prompts, greedy)]
    equal = {name: ids == tokens["tp 1"] for name, ids in tokens.items()}
    record(system="tidemind", workload="tp-check", equal=equal, prompts=len(prompts),
           new_tokens=greedy.max_new_tokens, cmd=CMD)
    print(f"tp check (tiny float32 Llama, greedy, against tp 1): {equal}", flush=True)
    return all(equal.values())


def run(model_dir: str, tp: int) -> dict:
    start = time.perf_counter()
    with pipeline(model_dir, backend_config=bench_config(tp), log_level="INFO") as pipe:
        startup = time.perf_counter() - start
        spec = pipe.engine.kv_spec
        record(system="tidemind", workload="startup", tp=tp, startup_s=startup, kv_cache_tokens=spec.num_tokens,
               engine=pipe.engine.executor.description, cmd=CMD)
        print(f"tp {tp}: ready in {startup:.1f}s, {pipe.engine.executor.description}, KV {spec.num_tokens} tokens",
              flush=True)
        profiles = decode_kernels(pipe, tp)
        decode, d1_steps = with_step_times(pipe, lambda: d1(pipe, tp=tp))
        throughput, t1_steps = with_step_times(pipe, lambda: t1(pipe, tp=tp)[-1])
    return dict(d1_tok_s=decode["decode_tok_s"], t1_tok_s=throughput["output_tok_s"], d1_step_ms=d1_steps,
                t1_step_ms=t1_steps, decode_busy_ms=[p["busy_ms"] for p in profiles])


def decode_kernels(pipe, tp: int) -> list:
    """Every rank's device kernels over one D1-like request (PROFILE_NEW tokens after a 128-token prompt):
    busy ms and the top kernels, each per generated token (the prefill's one step included)."""
    new_tokens = int(os.environ.get("PROFILE_NEW", 128))
    executor = pipe.engine.executor
    prompt = [random_prompt(pipe.engine.model_config.vocab_size)]
    generation = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    pipe.engine.reset_prefix_cache()
    if isinstance(executor, DistributedExecutor):
        executor.profile_ranks(True)
        run_requests(pipe.async_engine, prompt, generation)
        profiles = executor.profile_ranks(False)
    else:
        profile = KernelProfile(executor.device_type)
        profile.start()
        run_requests(pipe.async_engine, prompt, generation)
        profiles = [profile.stop()]
    per_token = [{"busy_ms": round(p["busy_ms"] / new_tokens, 3) if p["busy_ms"] is not None else None,
                  "kernels_us": [(name, round(us / new_tokens, 2)) for name, us in p["kernels"]]} for p in profiles]
    for rank, p in enumerate(per_token):
        print(f"tp {tp} rank {rank}: device busy {p['busy_ms']} ms a token; top kernels (us a token):", flush=True)
        for name, us in p["kernels_us"]:
            print(f"  {us:9.2f}  {name}", flush=True)
    record(system="tidemind", workload="decode-kernels", tp=tp, new_tokens=new_tokens, ranks=per_token, cmd=CMD)
    return per_token


def with_step_times(pipe, run):
    """run()'s result, and where its steps' time went at tp > 1 (ms a step: the engine's view, then each
    rank's: launching, collecting, idle between steps); None at tp 1."""
    executor = pipe.engine.executor
    if not isinstance(executor, DistributedExecutor):
        return run(), None
    executor.timing = StepTiming()
    executor.rank_step_phases()  # from zero
    result = run()
    return result, dict(engine=executor.timing.per_step_ms(), ranks=executor.rank_step_phases())


def d1_with_nccl(model_dir: str, tp: int) -> None:
    with all_reduce_setting("nccl"), pipeline(model_dir, backend_config=bench_config(tp), log_level="INFO") as pipe:
        _, steps = with_step_times(pipe, lambda: d1(pipe, tp=tp, allreduce="nccl"))
    print(f"tp {tp}, all-reduces on NCCL: ms a step in D1 {steps}", flush=True)


def main() -> None:
    model_dir = sys.argv[1]
    if os.environ.get("TP_CHECK", "1") == "1":
        check_tiny()
    results = {tp: run(model_dir, tp) for tp in TP_SIZES}
    base = results[TP_SIZES[0]]
    for tp, res in results.items():
        ratios = dict(d1_ratio=res["d1_tok_s"] / base["d1_tok_s"], t1_ratio=res["t1_tok_s"] / base["t1_tok_s"])
        record(system="tidemind", workload="tp-summary", tp=tp, base_tp=TP_SIZES[0], cmd=CMD, **res, **ratios)
        print(f"tp {tp}: D1 {res['d1_tok_s']:.1f} tok/s ({ratios['d1_ratio']:.2f}x tp {TP_SIZES[0]}), "
              f"T1 {res['t1_tok_s']:.0f} tok/s ({ratios['t1_ratio']:.2f}x); ms a step in D1 {res['d1_step_ms']}, "
              f"in T1 {res['t1_step_ms']}",
              flush=True)
    if os.environ.get("TP_NCCL_TOO", "1") == "1" and max(TP_SIZES) > 1:
        d1_with_nccl(model_dir, max(TP_SIZES))


if __name__ == "__main__":
    main()
