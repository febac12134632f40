"""KV cache quantization on the GPU (benchmarks/gpu_run.sh stage kvquant): the decode and KV-write
kernels on int8 / int4 caches beside bf16, then the engine's KV tokens and T1 with quant_policy
0, 8 and 4 (issue 10: int8 >= 1.94x and int4 >= 3.7x the KV tokens of bf16, T1 within 5% of bf16's).

    python benchmarks/gpu_kv_quant.py MODEL_DIR            # on the H200: /tmp/llama8b, bf16
    T1_N=4 T1_NEW=4 T1_REP=1 python benchmarks/gpu_kv_quant.py TINY_MODEL_DIR --cpu-smoke
                                                           # dry run on the CPU: Triton's interpreter,
                                                           # tiny kernel sizes, wall-clock timing

Kernels at llama8b's attention shape (32 / 8 heads, head_dim 128): decode of B sequences of ctx
keys, timed from a CUDA graph (gpu_kernels.time_ms: do_bench_cudagraph, median), the bytes it must read
(K and V, scales included) per ms as GB/s. Engine: per policy, one start-up (KV tokens, KV dtype,
start-up seconds), then gpu_bench.py's T1 (warm-up, T1_REP reps), each recorded; a summary record
gives the KV tokens and the last rep's output tokens/s as ratios to quant_policy 0. Records go to
$OUT/results.jsonl with gpu_bench.py's others.
"""
from __future__ import annotations

import os
import sys
import time

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at import
    os.environ.setdefault("BENCH_DEVICE", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import gpu_bench  # noqa: E402
from gpu_bench import DEVICE, record, t1  # noqa: E402
from gpu_kernels import time_ms  # noqa: E402  (importing it also readies Triton's interpreter for --cpu-smoke)
from tidemind import EngineConfig, pipeline  # noqa: E402
from tidemind.kernels import decode_attention, kv_cache, reference  # noqa: E402

POLICIES = (0, 8, 4)
CMD = gpu_bench.CMD = "python benchmarks/gpu_kv_quant.py " + " ".join(sys.argv[1:])  # t1() records it too
HEADS, KV_HEADS, HEAD_DIM, BLOCK = (4, 2, 64, 16) if SMOKE else (32, 8, 128, 64)
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # the interpreter has no bfloat16


def paged(batch: int, context: int, policy: int):
    """(key_cache, value_cache, quant kwargs, block tables, bytes one decode step reads)."""
    blocks_per_seq = -(-context // BLOCK)
    shape = (batch * blocks_per_seq, BLOCK, KV_HEADS, HEAD_DIM)
    key, value = (torch.randn(shape, device=DEVICE).to(DTYPE) for _ in range(2))
    tables = torch.randperm(batch * blocks_per_seq, device=DEVICE, dtype=torch.int32).view(batch, blocks_per_seq)
    rows = 2 * batch * context * KV_HEADS
    if not policy:
        return key, value, {}, tables, rows * HEAD_DIM * DTYPE.itemsize
    (key, key_scales), (value, value_scales) = reference.quantize_kv(key, policy), reference.quantize_kv(value, policy)
    quant = dict(key_scales=key_scales, value_scales=value_scales, kv_bits=policy)
    return key, value, quant, tables, rows * (HEAD_DIM * policy // 8 + 4)


def bench_kernels() -> None:
    cases = [(2, 40)] if SMOKE else [(1, 4096), (64, 1024), (64, 4096), (256, 1024), (256, 4096)]
    for batch, context in cases:
        base_ms = None
        for policy in POLICIES:
            key, value, quant, tables, kv_bytes = paged(batch, context, policy)
            query = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE).to(DTYPE)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
            out = torch.empty_like(query)

            def run():
                decode_attention.paged_decode_attention(query, key, value, tables, seq_lens, HEAD_DIM ** -0.5, None,
                                                        context, out=out, **quant)

            ms, timing = time_ms(run, graph=True)
            base_ms = base_ms or ms
            record(system="tidemind", workload="kvquant-decode-kernel", quant_policy=policy, batch=batch,
                   context=context, ms=ms, timing=timing, kv_bytes=kv_bytes, gbs=kv_bytes / ms / 1e6,
                   speedup_vs_16bit=base_ms / ms, cmd=CMD)
            del key, value, quant
    tokens = 16 if SMOKE else 8000
    for policy in POLICIES:
        key, value, quant, _, _ = paged(1, tokens, policy)
        new = torch.randn(tokens, 2, KV_HEADS, HEAD_DIM, device=DEVICE).to(DTYPE)
        slots = torch.randperm(key.shape[0] * BLOCK, device=DEVICE)[:tokens]
        ms, timing = time_ms(lambda: kv_cache.write_kv_cache(new[:, 0], new[:, 1], key, value, slots, **quant),
                             graph=True)
        record(system="tidemind", workload="kvquant-write-kernel", quant_policy=policy, tokens=tokens, ms=ms,
               timing=timing, cmd=CMD)


def bench_engine(model_dir: str) -> None:
    figures = {}
    for policy in POLICIES:
        config = EngineConfig(session_len=int(os.environ.get("SESSION_LEN", 8192)), max_batch_size=256,
                              cache_max_entry_count=0.8, device=DEVICE, quant_policy=policy)
        start = time.perf_counter()
        with pipeline(model_dir, backend_config=config, log_level="INFO") as pipe:
            spec = pipe.engine.kv_spec
            record(system="tidemind", workload="kvquant-startup", quant_policy=policy, kv_dtype=spec.kv_dtype,
                   kv_cache_tokens=spec.num_tokens, kv_cache_blocks=spec.num_blocks, bytes_per_block=spec.bytes_per_block,
                   startup_s=time.perf_counter() - start, engine=pipe.engine.executor.description, cmd=CMD)
            runs = t1(pipe, quant_policy=policy)
        figures[policy] = (spec.num_tokens, runs[-1]["output_tok_s"])
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    base_tokens, base_tok_s = figures[0]
    for policy, (tokens, tok_s) in figures.items():
        record(system="tidemind", workload="kvquant-summary", quant_policy=policy, kv_cache_tokens=tokens,
               kv_tokens_ratio=tokens / base_tokens, t1_output_tok_s=tok_s, t1_ratio=tok_s / base_tok_s, cmd=CMD)


def main() -> None:
    model_dir = next(a for a in sys.argv[1:] if not a.startswith("--"))
    bench_kernels()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    bench_engine(model_dir)


if __name__ == "__main__":
    main()
