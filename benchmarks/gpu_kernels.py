"""The Triton kernels on the GPU: correctness at real model shapes, then speed against the roofline.

    python benchmarks/gpu_kernels.py               # on the device machine (H200), about 2 minutes
    python benchmarks/gpu_kernels.py --cpu-smoke   # dry run of this script on the CPU: Triton's
                                                   # interpreter, tiny sizes, float16 for bfloat16
                                                   # (the interpreter has no bfloat16), a wall-clock
                                                   # timer instead of do_bench

(a) the copy ceiling: device-to-device copy of a 1 GiB buffer, bytes read + written, median of 10;
(b) every kernel against its torch reference (tidemind/kernels/reference.py) at the shapes of
    llama8b-shape (bf16), Gemma-3-270M (bf16, window 512) and SmolLM2-135M (float32): max abs
    error, error relative to the largest reference value, PASS / FAIL at the tests' tolerances;
(c) timings, median, inputs rotating over enough sets that L2 holds none: each kernel's calls
    replayed from a CUDA graph (triton.testing.do_bench_cudagraph: device time, and proof that
    the launcher can be captured), the torch reference eagerly beside it (do_bench); elementwise
    kernels and decode attention as GB/s and a share of the copy ceiling (each byte moved counted
    once), prefill attention as TFLOP/s;
(d) every record appended to $OUT/kernels.jsonl (OUT defaults to /tmp), a compact table last.
A failing kernel prints its traceback and the others go on. Workload names: benchmarks/WORKLOADS.md.
"""
from __future__ import annotations

import os
import sys

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at import
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402


def _fix_interpreter_loop_bounds() -> None:
    # Triton 3.6's interpreter int()s shape-(1,) arrays, which numpy >= 2.4 refuses
    # (triton-lang/triton#9171); tests/conftest.py applies the same fix for the tests.
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_loop_bounds()

from tidemind.bench.device_ceilings import measure_copy_bandwidth  # noqa: E402
from tidemind.kernels import activation, decode_attention, kv_cache, prefill_attention, reference  # noqa: E402
from tidemind.kernels import rms_norm as rms_norm_kernels  # noqa: E402
from tidemind.kernels import rotary  # noqa: E402

DEVICE = torch.device("cpu" if SMOKE else "cuda")
BF16 = torch.float16 if SMOKE else torch.bfloat16
OUT_FILE = os.path.join(os.environ.get("OUT", "/tmp"), "kernels.jsonl")
# the tests' tolerances (tests/test_kernels.py says why); float32 attention gets 1e-4 here because
# the GPU reference may take another SDPA backend over thousands of keys
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
ATTENTION_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
ROTATING_BYTES = 512 << 20  # a timing's input sets together span this (L2: 50-60 MB), at most 256 sets
RESULTS: List[dict] = []


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    dtype: torch.dtype
    rope_theta: float
    sliding_window: Optional[int]
    activation: str  # "silu_and_mul" or "gelu_tanh_and_mul"


LLAMA8B = ModelShape("llama8b-shape", 4096, 32, 8, 128, 14336, BF16, 500000.0, None, "silu_and_mul")
SHAPES = [LLAMA8B,
          ModelShape("gemma3-270m", 640, 4, 1, 256, 2048, BF16, 10000.0, 512, "gelu_tanh_and_mul"),
          ModelShape("smollm2-135m", 576, 9, 3, 64, 1536, torch.float32, 100000.0, None, "silu_and_mul")]


def record(**fields) -> dict:
    fields.setdefault("device", torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu (interpreter)")
    RESULTS.append(fields)
    with open(OUT_FILE, "a") as f:
        f.write(json.dumps(fields) + "\n")
    return fields


def randn(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], graph: bool = False) -> Tuple[float, str]:
    """(median milliseconds of one call, how it was timed). graph: replay the calls from a CUDA graph,
    which times the device alone (and shows the launcher can be captured); else eager do_bench."""
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, "wall"
    synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"), "graph"
        except Exception as error:  # not capturable: say so, time it eagerly
            print(f"  CUDA graph capture failed ({type(error).__name__}: {error}); timing eagerly", flush=True)
            synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"), "eager"


def rotating(make_inputs: Callable[[], tuple], bytes_per_set: int) -> Callable[[Callable], Callable[[], object]]:
    """Several input sets, so that consecutive timed calls never find their inputs in L2."""
    count = 1 if SMOKE else max(1, min(256, math.ceil(ROTATING_BYTES / max(bytes_per_set, 1))))
    sets = itertools.cycle([make_inputs() for _ in range(count)])
    return lambda fn: (lambda: fn(*next(sets)))


# ---- (a) the copy ceiling ------------------------------------------------------------------------


def copy_ceiling_gbs() -> float:
    gbs = measure_copy_bandwidth(DEVICE)  # the roofline's bandwidth, measured as tidemind's benches do
    record(kind="ceiling", name="copy", gbs=round(gbs, 1))
    print(f"copy ceiling: {gbs:.0f} GB/s (read + written)", flush=True)
    return gbs


# ---- shared set-up of the attention inputs -------------------------------------------------------


def paged_cache(seq_lens: List[int], shape: ModelShape, block_size: int = 64, garbage: bool = True):
    """(key_cache, value_cache, block_tables int32) with each sequence's blocks at random ids."""
    blocks = [max(1, -(-n // block_size)) for n in seq_lens]
    num_blocks = sum(blocks) + 1
    order = torch.randperm(num_blocks, device=DEVICE).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=DEVICE)
    used = 0
    for s, n in enumerate(blocks):
        tables[s, :n] = order[used:used + n]
        used += n
    cache_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    scale = 1e3 if garbage else 1.0  # garbage stays where no key was written (checks only)
    key_cache, value_cache = randn(*cache_shape, dtype=shape.dtype), randn(*cache_shape, dtype=shape.dtype)
    if garbage:
        key_cache.mul_(scale)
        value_cache.mul_(scale)
        for s, n in enumerate(seq_lens):
            positions = torch.arange(n, device=DEVICE)
            slots = tables[s, positions // block_size].long() * block_size + positions % block_size
            keys = randn(n, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype)
            values = randn(n, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype)
            reference.write_kv_cache_split(keys, values, key_cache, value_cache, slots)
    return key_cache, value_cache, tables


def prefill_inputs(seq_lens: List[int], query_lens: List[int], shape: ModelShape, garbage: bool = True):
    key_cache, value_cache, tables = paged_cache(seq_lens, shape, garbage=garbage)
    starts = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
    query = randn(starts[-1], shape.num_heads, shape.head_dim, dtype=shape.dtype)
    return (query, key_cache, value_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            torch.tensor(starts, dtype=torch.int32, device=DEVICE), max(query_lens))


def cos_sin_cache(shape: ModelShape, max_positions: int = 8192) -> torch.Tensor:
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim))
    return reference.build_cos_sin_cache(inv_freq.to(DEVICE), max_positions)


# ---- (b) correctness at the models' shapes ----------------------------------------------------------


def _check_norms(shape: ModelShape, num_tokens: int):
    x = randn(num_tokens, shape.hidden, dtype=shape.dtype)
    residual = randn(num_tokens, shape.hidden, dtype=shape.dtype)
    weight = randn(shape.hidden, dtype=shape.dtype)
    yield "rms_norm", rms_norm_kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    expected = torch.cat(reference.add_rms_norm(x, residual, weight, 1e-6, 1.0))
    actual = torch.cat(rms_norm_kernels.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6, 1.0))
    yield "add_rms_norm", actual, expected


def _check_activation(shape: ModelShape, num_tokens: int):
    gate_up = randn(num_tokens, 2 * shape.intermediate, dtype=shape.dtype, scale=3.0)
    kernel, torch_reference = getattr(activation, shape.activation), getattr(reference, shape.activation)
    yield shape.activation, kernel(gate_up), torch_reference(gate_up)


def _check_rotary(shape: ModelShape, num_tokens: int):
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    query, key, _ = randn(num_tokens, q_width + 2 * kv_width, dtype=shape.dtype).split([q_width, kv_width, kv_width], -1)
    positions = torch.randint(0, 8192, (num_tokens,), device=DEVICE)
    table = cos_sin_cache(shape)
    expected = torch.cat(reference.rotary_embedding_cached(query, key, positions, table), -1)
    actual = torch.cat(rotary.rotary_embedding(query, key, positions, table), -1)
    yield "rotary_embedding", actual, expected


def _check_write_kv_cache(shape: ModelShape, num_tokens: int):
    caches = randn(2, num_tokens // 16 + 4, 16, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype, scale=1e3)
    slots = torch.randperm(caches.shape[1] * 16, device=DEVICE)[:num_tokens]
    slots[::7] = -1  # padding rows
    kv = randn(num_tokens, 2, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype)
    expected = caches.clone()
    reference.write_kv_cache_split(kv[:, 0], kv[:, 1], expected[0], expected[1], slots)
    kv_cache.write_kv_cache(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    yield "write_kv_cache", caches, expected


def _check_decode(shape: ModelShape, batch: int, max_len: int):
    seq_lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    seq_lens[batch // 2] = 0  # a padding row
    key_cache, value_cache, tables = paged_cache(seq_lens, shape)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn(batch, shape.num_heads, shape.head_dim, dtype=shape.dtype)
    scale = shape.head_dim ** -0.5
    expected = reference.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, scale,
                                                shape.sliding_window, max_len)
    out = torch.full_like(query, float("nan"))
    decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, scale,
                                            shape.sliding_window, max_len, out=out)
    yield "paged_decode_attention", out, expected


def _check_prefill(shape: ModelShape, seq_lens: List[int], query_lens: List[int]):
    query, key_cache, value_cache, tables, seq_lens_t, starts, max_query_len = prefill_inputs(seq_lens, query_lens,
                                                                                              shape)
    scale = shape.head_dim ** -0.5
    expected = reference.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens_t, starts,
                                                 max_query_len, scale, shape.sliding_window)
    out = torch.full_like(query, float("nan"))
    prefill_attention.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens_t, starts,
                                              max_query_len, scale, shape.sliding_window, out=out)
    yield "paged_prefill_attention", out, expected


def run_checks() -> None:
    num_tokens = 37 if SMOKE else 300
    batch, max_len = (3, 80) if SMOKE else (24, 2048)
    seq_lens, query_lens = ([40, 70, 1], [40, 30, 1]) if SMOKE else ([700, 1500, 1], [700, 500, 1])
    for shape in SHAPES:
        torch.manual_seed(0)
        groups = [("norms", lambda: _check_norms(shape, num_tokens)),
                  ("activation", lambda: _check_activation(shape, num_tokens)),
                  ("rotary_embedding", lambda: _check_rotary(shape, num_tokens)),
                  ("write_kv_cache", lambda: _check_write_kv_cache(shape, num_tokens)),
                  ("paged_decode_attention", lambda: _check_decode(shape, batch, max_len)),
                  ("paged_prefill_attention", lambda: _check_prefill(shape, seq_lens, query_lens))]
        for label, group in groups:
            try:
                for kernel, actual, expected in group():
                    _report_check(shape, kernel, actual, expected)
            except Exception:
                traceback.print_exc()
                record(kind="check", model=shape.name, kernel=label, passed=False, error=traceback.format_exc(limit=3))


def _report_check(shape: ModelShape, kernel: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    attention = kernel.startswith("paged")
    tol = 0.0 if kernel == "write_kv_cache" else (ATTENTION_TOL if attention else ELEMENTWISE_TOL)[shape.dtype]
    actual, expected = actual.float(), expected.float()
    max_abs = float((actual - expected).abs().max())
    relative = max_abs / max(float(expected.abs().max()), 1e-30)
    passed = bool(torch.allclose(actual, expected, rtol=tol, atol=tol))
    record(kind="check", model=shape.name, kernel=kernel, dtype=str(shape.dtype).replace("torch.", ""),
           max_abs_err=max_abs, rel_err=relative, tol=tol, passed=passed)
    print(f"check {shape.name:14s} {kernel:24s} max abs {max_abs:.2e}  rel {relative:.2e}  tol {tol:.0e}  "
          f"{'PASS' if passed else 'FAIL'}", flush=True)


# ---- (c) timings -------------------------------------------------------------------------------------


def bench(kernel: str, case: str, make_inputs: Callable[[], tuple], run_kernel: Callable, run_reference: Callable,
          ceiling_gbs: float, bytes_moved: Optional[int] = None, flops: Optional[float] = None,
          bytes_per_set: Optional[int] = None) -> None:
    """Time the kernel and its reference on rotating input sets; record ms, GB/s or TFLOP/s."""
    try:
        timed = rotating(make_inputs, bytes_per_set or bytes_moved or 0)
        ms, timing = time_ms(timed(run_kernel), graph=True)
        try:
            reference_ms, reference_timing = time_ms(timed(run_reference))  # host reads: no graph
        except Exception:
            traceback.print_exc()
            reference_ms = reference_timing = None
    except Exception:
        traceback.print_exc()
        record(kind="time", kernel=kernel, case=case, error=traceback.format_exc(limit=3))
        return
    fields = dict(kind="time", kernel=kernel, case=case, ms=ms, timing=timing, reference_ms=reference_ms,
                  reference_timing=reference_timing)
    if bytes_moved:
        fields.update(bytes=bytes_moved, gbs=bytes_moved / ms / 1e6, ceiling_share=bytes_moved / ms / 1e6 / ceiling_gbs)
    if flops:
        fields.update(flops=flops, tflops=flops / ms / 1e9)
    record(**fields)
    print(f"time  {kernel:24s} {case:44s} {ms:9.4f} ms {timing}  (reference {reference_ms or float('nan'):9.4f} ms "
          f"{reference_timing})", flush=True)


def bench_elementwise(ceiling: float) -> None:
    shape = LLAMA8B
    size = shape.dtype.itemsize
    hidden, inter, heads, kv_heads, dim = (shape.hidden, shape.intermediate, shape.num_heads, shape.num_kv_heads,
                                           shape.head_dim)
    table = cos_sin_cache(shape)
    for tokens in ((4, 16) if SMOKE else (256, 8000)):
        case = f"{shape.name} T={tokens}"
        weight = randn(hidden, dtype=shape.dtype)
        bench("rms_norm", case, lambda: (randn(tokens, hidden, dtype=shape.dtype),),
              lambda x: rms_norm_kernels.rms_norm(x, weight, 1e-5), lambda x: reference.rms_norm(x, weight, 1e-5),
              ceiling, bytes_moved=(2 * tokens + 1) * hidden * size)
        bench("add_rms_norm", case,
              lambda: (randn(tokens, hidden, dtype=shape.dtype), randn(tokens, hidden, dtype=shape.dtype)),
              lambda x, r: rms_norm_kernels.add_rms_norm(x, r, weight, 1e-5),
              lambda x, r: reference.add_rms_norm(x, r, weight, 1e-5), ceiling,
              bytes_moved=(4 * tokens + 1) * hidden * size)
        bench("silu_and_mul", case, lambda: (randn(tokens, 2 * inter, dtype=shape.dtype),), activation.silu_and_mul,
              reference.silu_and_mul, ceiling, bytes_moved=3 * tokens * inter * size)

        def rotary_inputs():
            qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=shape.dtype)
            query, key = qkv[:, :heads * dim], qkv[:, heads * dim:(heads + kv_heads) * dim]
            return query, key, torch.randint(0, table.shape[0], (tokens,), device=DEVICE)

        bench("rotary_embedding", case, rotary_inputs, lambda q, k, p: rotary.rotary_embedding(q, k, p, table),
              lambda q, k, p: reference.rotary_embedding_cached(q, k, p, table), ceiling,
              bytes_moved=tokens * (2 * (heads + kv_heads) * dim * size + dim * 4 + 8))

        def kv_inputs():
            caches = randn(2, tokens // 16 + 1, 16, kv_heads, dim, dtype=shape.dtype)
            kv = randn(tokens, 2, kv_heads, dim, dtype=shape.dtype)
            return kv[:, 0], kv[:, 1], caches[0], caches[1], torch.randperm(tokens, device=DEVICE)

        bench("write_kv_cache", case, kv_inputs, kv_cache.write_kv_cache, reference.write_kv_cache_split, ceiling,
              bytes_moved=tokens * (4 * kv_heads * dim * size + 8))


def bench_decode(ceiling: float) -> None:
    cases = [(LLAMA8B, b, ctx) for b in ((1, 2) if SMOKE else (1, 16, 64, 256)) for ctx in ((40,) if SMOKE else
                                                                                          (128, 1024, 4096))]
    cases.append((SHAPES[1], 2 if SMOKE else 64, 40 if SMOKE else 4096))  # Gemma 3: window 512
    for shape, batch, context in cases:
        size = shape.dtype.itemsize
        window = shape.sliding_window
        keys_read = min(context, window) if window else context
        scale = shape.head_dim ** -0.5

        def make_inputs(shape=shape, batch=batch, context=context):
            key_cache, value_cache, tables = paged_cache([context] * batch, shape, garbage=False)
            query = randn(batch, shape.num_heads, shape.head_dim, dtype=shape.dtype)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
            return query, key_cache, value_cache, tables, seq_lens

        def run_kernel(q, kc, vc, t, s, window=window, context=context, scale=scale):
            return decode_attention.paged_decode_attention(q, kc, vc, t, s, scale, window, context)

        def run_reference(q, kc, vc, t, s, window=window, context=context, scale=scale):
            return reference.paged_decode_attention(q, kc, vc, t, s, scale, window, context)

        kv_bytes = batch * keys_read * shape.num_kv_heads * shape.head_dim * 2 * size
        query_out_bytes = 2 * batch * shape.num_heads * shape.head_dim * size
        splits = decode_attention.num_kv_splits(batch, shape.num_kv_heads, keys_read, DEVICE)
        bench("paged_decode_attention", f"{shape.name} B={batch} ctx={context} splits={splits}", make_inputs,
              run_kernel, run_reference, ceiling, bytes_moved=kv_bytes + query_out_bytes,
              bytes_per_set=batch * context * shape.num_kv_heads * shape.head_dim * 2 * size)


def attended_pairs(seq_len: int, query_len: int, window: Optional[int]) -> int:
    """(query, key) pairs a causal (windowed) chunk of query_len rows ending at seq_len attends."""
    visible = np.arange(seq_len - query_len, seq_len) + 1
    return int(np.minimum(visible, window).sum() if window else visible.sum())


def bench_prefill() -> None:
    t1_lens = np.random.RandomState(0).randint(128, 1025, 16).tolist()
    cases = [("T1-like 16 prompts 128..1024", LLAMA8B, t1_lens, t1_lens),
             ("L1 8000-token prompt", LLAMA8B, [8000], [8000]),
             ("L1 last 2048-token chunk", LLAMA8B, [8000], [2048]),
             ("gemma3 8000-token prompt w512", SHAPES[1], [8000], [8000])]
    if SMOKE:
        cases = [(name, shape, [min(n, 96) for n in seq_lens[:3]], [min(n, 96) // (1 + (n != q)) for n, q in
                                                                     zip(seq_lens[:3], query_lens[:3])])
                 for name, shape, seq_lens, query_lens in cases]
    for name, shape, seq_lens, query_lens in cases:
        scale = shape.head_dim ** -0.5
        window = shape.sliding_window
        pairs = sum(attended_pairs(n, q, window) for n, q in zip(seq_lens, query_lens))
        flops = 4.0 * shape.num_heads * shape.head_dim * pairs  # QK^T and PV, 2 flops a multiply-add

        def run_kernel(q, kc, vc, t, s, starts, max_q, window=window, scale=scale):
            return prefill_attention.paged_prefill_attention(q, kc, vc, t, s, starts, max_q, scale, window)

        def run_reference(q, kc, vc, t, s, starts, max_q, window=window, scale=scale):
            return reference.paged_prefill_attention(q, kc, vc, t, s, starts, max_q, scale, window)

        bench("paged_prefill_attention", f"{shape.name} {name}",
              lambda seq_lens=seq_lens, query_lens=query_lens, shape=shape: prefill_inputs(seq_lens, query_lens, shape,
                                                                                            garbage=False),
              run_kernel, run_reference, 0.0, flops=flops, bytes_per_set=ROTATING_BYTES)


# ---- (d) the table -----------------------------------------------------------------------------------


def print_table() -> None:
    checks = [r for r in RESULTS if r["kind"] == "check"]
    failed = [f"{r['model']}/{r['kernel']}" for r in checks if not r.get("passed")]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    print("ms: the kernel's calls replayed from a CUDA graph (device time; 'eager' if capture failed); ref ms: "
          "the torch reference, eager (do_bench, L2 flushed); ceil: GB/s / copy ceiling")
    print(f"{'kernel':24s} {'case':44s} {'ms':>9s} {'ref ms':>9s} {'speedup':>8s} {'GB/s':>7s} {'ceil':>6s} "
          f"{'TFLOP/s':>8s} timing")
    for r in RESULTS:
        if r["kind"] != "time":
            continue
        if "error" in r:
            print(f"{r['kernel']:24s} {r['case']:44s} ERROR")
            continue
        speedup = f"{r['reference_ms'] / r['ms']:7.2f}x" if r.get("reference_ms") else "       -"
        gbs = f"{r['gbs']:7.0f} {100 * r['ceiling_share']:5.1f}%" if "gbs" in r else f"{'-':>7s} {'-':>6s}"
        tflops = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'-':>8s}"
        print(f"{r['kernel']:24s} {r['case']:44s} {r['ms']:9.4f} {r['reference_ms'] or float('nan'):9.4f} {speedup} "
              f"{gbs} {tflops} {r['timing']}")


def main() -> None:
    start = time.time()
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name(0) if DEVICE.type == 'cuda' else 'CPU, Triton interpreter'}; -> {OUT_FILE}")
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 references stay float32
    os.makedirs(os.path.dirname(OUT_FILE), exist_ok=True)
    try:
        ceiling = copy_ceiling_gbs()
    except Exception:
        traceback.print_exc()
        ceiling = float("nan")
    run_checks()
    for stage in (bench_elementwise, bench_decode):
        stage(ceiling)
    bench_prefill()
    print_table()
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
