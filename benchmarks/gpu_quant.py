"""Quantization on the GPU: the W4A16 kernels at llama8b-shape sizes, and workload Q1 (D1 / T1 of an
AWQ-layout round-to-nearest int4 copy of a bf16 model) through the engine.

    python benchmarks/gpu_quant.py kernels                 # about 2 minutes on an H200
    python benchmarks/gpu_quant.py sweep                   # the GEMV / GEMM tile configurations, ~3 minutes
    python benchmarks/gpu_quant.py q1 /tmp/llama8b [--bf16-too]
    python benchmarks/gpu_quant.py launches                # the GEMV's launches for ncu (gpu_run.sh gemvprof)
    python benchmarks/gpu_quant.py --cpu-smoke kernels     # dry run on the CPU: Triton's interpreter,
    python benchmarks/gpu_quant.py --cpu-smoke q1 smollm2-135m   # tiny sizes, wall-clock timers

kernels: (a) the copy ceiling (device-to-device copy of 1 GiB, bytes read + written, median of 10);
(b) for the four linear shapes of llama8b-shape (qkv 4096->6144, o 4096->4096, gate/up
4096->28672, down 14336->4096), group 128, M = 1 .. 4096 rows of bf16 input: the GEMV (M <= 16)
and the GEMM against dequantize-then-matmul in float32 (max error relative to the largest output:
PASS under 1.5e-2, the tests' bf16 bound); (c) timings, median, weight sets rotating so that L2
(50 MB) holds none: the kernels replayed from CUDA graphs (triton.testing.do_bench_cudagraph:
device time, and proof the launchers can be captured), the reference eagerly, and bf16 cuBLAS
(F.linear on the dense weight, also from a graph) beside them; bandwidth counts every byte the
kernel must read or write once, and is given as a share of the copy ceiling.
sweep: every configuration of GEMV_SWEEP and SLAB_GEMV_SWEEP (M = 1, 4; the second on K slabs,
kernels/w4a16_gemv_slabs.py) and of GEMM_SWEEP on either layout (M = 8 .. 4096), plus dequantize-
then-cuBLAS from M = 32, timed as in kernels at the four shapes; per M, the configurations ranked by
their time summed over the four shapes (one decoder layer's linear layers), which is what the
defaults in kernels/w4a16_gemv*.py, kernels/w4a16_gemm.py and layers/quantization/awq.py are set from.
SWEEP_PARTS="gemv" or "gemm" times one part; SWEEP_GEMM_ROWS="4 16 64" picks the GEMM's row counts;
for a sweep short enough to share a device call, SWEEP_GEMV_FIRST / SWEEP_GEMM_FIRST keep the first
configurations of each list and SWEEP_LAYOUT=slabs (or awq) the candidates of one layout.
q1: `tidemind lite auto_awq MODEL --rtn --w-group-size 128` on the GPU (timed), then benchmarks/
gpu_bench.py's D1 and T1 on the result (and on the bf16 model with --bf16-too, for the ratio); the
model is the `llama8b-shape` directory made by ../shared/bench/gpu/mkmodel.py (see benchmarks/
gpu_run.sh). The smoke run skips T1.
Every record goes to $OUT/quant.jsonl (OUT defaults to /tmp); a table is printed last.
"""
from __future__ import annotations

import os
import sys

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at import
    for name, value in (("D1_NEW", "8"), ("T1_N", "4"), ("T1_NEW", "4")):
        os.environ.setdefault(name, value)  # gpu_bench reads them at import
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Callable, List, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter int()s shape-(1,) arrays, which numpy >= 2.4 refuses
    # (triton-lang/triton#9171); tests/conftest.py applies the same fix for the tests.
    from triton.runtime import interpreter as _interpreter
    _patch = _interpreter._patch_lang_tensor

    def _patch_squeezed(tensor, scope) -> None:
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    _interpreter._patch_lang_tensor = _patch_squeezed

from tidemind.bench.device_ceilings import measure_copy_bandwidth  # noqa: E402
from tidemind.kernels.w4a16_dequant import w4a16_dequantize  # noqa: E402
from tidemind.kernels.w4a16_gemm import GemmConfig, w4a16_gemm  # noqa: E402
from tidemind.kernels import w4a16_gemv as gemv_module  # noqa: E402
from tidemind.kernels.w4a16_gemv import GemvConfig, w4a16_gemv  # noqa: E402
from tidemind.kernels import w4a16_gemv_slabs as slabs_module  # noqa: E402
from tidemind.kernels.w4a16_gemv_slabs import SlabGemvConfig, w4a16_gemv_slabs  # noqa: E402
from tidemind.kernels.w4a16_layout import awq_to_slabs  # noqa: E402
from tidemind.layers.quantization import awq as awq_module  # noqa: E402
from tidemind.layers.quantization.awq import awq_dequantize  # noqa: E402
from tidemind.layers.quantization.packing import pack_awq  # noqa: E402

DEVICE = torch.device("cpu" if SMOKE else "cuda")
BF16 = torch.float16 if SMOKE else torch.bfloat16  # the interpreter has no bfloat16
GROUP = 128
TOL = 1.5e-2
ROTATING_BYTES = 512 << 20
OUT_FILE = os.path.join(os.environ.get("OUT", "/tmp"), "quant.jsonl")
# (name, K, N) of llama8b-shape's linear layers; the smoke run shrinks them
SHAPES = ([("qkv", 256, 384), ("down", 384, 256)] if SMOKE else
          [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)])
ROWS = [1, 3, 17] if SMOKE else [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
GEMV_ROWS = 16  # the GEMV is timed up to this many rows (the runtime switches at w4a16_gemv.MAX_ROWS)
RESULTS: List[dict] = []
# The GEMV's tiles (columns, K rows, warps), its pipeline's depth and launch width. On an H200
# (BENCHMARKS.md, docs/GPU_NOTES.md section 8) two packed words a thread per tile did best, four
# or eight worse, and 5 stages beat 3: these explore fewer words and deeper pipelines
GEMV_SWEEP = [GemvConfig(block_n=bn, block_k=bk, num_warps=w, programs_per_sm=p, stages=st)
              for bn, bk, w in ((64, 16, 2), (64, 16, 4), (128, 16, 4), (64, 32, 4), (128, 32, 4))
              for st in (5, 8) for p in (4, 8)]
# The GEMV on K slabs (kernels/w4a16_gemv_slabs.py): columns a program (a thread holds block_n /
# (32 x warps) of them), warps, pipeline depth in slabs, programs a SM; the defaults and the best of
# the fourth session of 2026-11-29 first
SLAB_GEMV_SWEEP = list(dict.fromkeys(
    [SlabGemvConfig(), SlabGemvConfig(programs_per_sm=4), SlabGemvConfig(block_n=512, num_warps=4)]
    + [SlabGemvConfig(block_n=bn, num_warps=w, programs_per_sm=p, stages=st)
       for bn, w in ((128, 1), (256, 1), (256, 2), (512, 2), (512, 4)) for st in (3, 5) for p in (4, 8)]))
# The GEMM's tiles; K is split for programs_per_sm programs a SM (split_k.py) where the tiles are
# fewer. The ones that led at 4 to 64 rows on slabs first
GEMM_SWEEP = [GemmConfig(*tiles, swap_ab=swap, programs_per_sm=p) for tiles, swap, p in (
    ((16, 64, 128, 4, 3), True, 2), ((16, 64, 64, 4, 3), False, 2), ((16, 64, 64, 4, 3), False, 4),
    ((64, 128, 64, 4, 3), False, 2), ((32, 128, 64, 4, 3), True, 2), ((128, 128, 64, 8, 3), True, 2),
    ((16, 128, 64, 4, 3), False, 2), ((32, 128, 64, 4, 3), False, 2), ((64, 128, 64, 4, 4), False, 2),
    ((64, 256, 64, 8, 3), False, 2), ((128, 128, 64, 8, 3), False, 2), ((128, 256, 64, 8, 3), False, 2),
    ((128, 128, 32, 4, 4), False, 2), ((16, 128, 64, 4, 3), True, 2), ((64, 128, 64, 4, 3), True, 2),
    ((64, 256, 64, 8, 3), True, 2), ((16, 64, 64, 4, 3), False, 0))]  # the last: no K split
# a short sweep: only the first few configurations of each list, only the candidates on one layout
GEMV_SWEEP = GEMV_SWEEP[:int(os.environ.get("SWEEP_GEMV_FIRST", len(GEMV_SWEEP)))]
SLAB_GEMV_SWEEP = SLAB_GEMV_SWEEP[:int(os.environ.get("SWEEP_GEMV_FIRST", len(SLAB_GEMV_SWEEP)))]
GEMM_SWEEP = GEMM_SWEEP[:int(os.environ.get("SWEEP_GEMM_FIRST", len(GEMM_SWEEP)))]
SWEEP_LAYOUT = os.environ.get("SWEEP_LAYOUT", "both")  # "slabs" or "awq": only that layout's candidates
SWEEP_PARTS = os.environ.get("SWEEP_PARTS", "gemv gemm").split()  # "gemv" alone: M = 1 and 4, ~4 minutes
SWEEP_GEMV_ROWS = ([1] if SMOKE else [1, 4]) if "gemv" in SWEEP_PARTS else []
SWEEP_GEMM_ROWS = ([int(m) for m in os.environ.get("SWEEP_GEMM_ROWS", "8 16 64 256 1024 4096").split()] if not SMOKE
                   else [17]) if "gemm" in SWEEP_PARTS else []
CMD = "python benchmarks/gpu_quant.py " + " ".join(sys.argv[1:])


def record(**fields) -> dict:
    fields.setdefault("device", torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu (interpreter)")
    fields.setdefault("cmd", CMD)
    RESULTS.append(fields)
    os.makedirs(os.path.dirname(OUT_FILE), exist_ok=True)
    with open(OUT_FILE, "a") as f:
        f.write(json.dumps(fields) + "\n")
    return fields


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], calls: int, graph: bool) -> Tuple[float, str]:
    """(median ms of one call, how it was timed); fn makes `calls` calls (rotating weight sets)."""
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3 / calls, "wall"
    synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / calls, "graph"
        except Exception as error:  # not capturable: say so, time it eagerly
            print(f"  CUDA graph capture failed ({type(error).__name__}: {error}); timing eagerly", flush=True)
            synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") / calls, "eager"


def copy_ceiling_gbs() -> float:
    gbs = measure_copy_bandwidth(DEVICE)  # the roofline's bandwidth, measured as tidemind's benches do
    record(kind="ceiling", name="copy", gbs=round(gbs, 1))
    print(f"copy ceiling: {gbs:.0f} GB/s (read + written)", flush=True)
    return gbs


def awq_set(k: int, n: int, seed: int):
    """(qweight, qzeros, scales, dense bf16 weight [N, K]) of random int4 values."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // GROUP, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // GROUP, n, generator=gen) * 0.02 + 0.001).half()
    tensors = [pack_awq(q).to(DEVICE), pack_awq(z).to(DEVICE), s.to(DEVICE)]
    dense = awq_dequantize(*tensors, GROUP, torch.float32).t().contiguous().to(BF16)
    return (*tensors, dense)


def weight_sets(k: int, n: int):
    """(bytes of one AWQ weight set: int4 values, fp16 scales, int4 zeros; enough random sets to
    rotate past L2, one in the smoke run)."""
    w_bytes = k * n // 2 + (k // GROUP) * n * (2 + 0.5)
    count = 1 if SMOKE else max(1, min(16, math.ceil(ROTATING_BYTES / w_bytes)))
    return w_bytes, [awq_set(k, n, seed) for seed in range(count)]


def check(kernel, x, weights, kernel_weights=None) -> float:
    """kernel's largest error relative to the largest output, against dequantize-then-matmul of
    AutoAWQ-layout weights; kernel_weights: the same weights as the kernel reads them (K slabs)."""
    qweight, qzeros, scales, _ = weights
    expected = x.float() @ awq_dequantize(qweight, qzeros, scales, GROUP, torch.float32)
    actual = kernel(x, *(kernel_weights or weights)[:3], GROUP).float()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def kernels() -> None:
    ceiling = copy_ceiling_gbs()
    for name, k, n in SHAPES:
        w_bytes, sets = weight_sets(k, n)
        for m in ROWS:
            x = torch.randn(m, k, device=DEVICE).to(BF16)
            kinds = [("gemv", w4a16_gemv)] if m <= GEMV_ROWS else []
            kinds.append(("gemm", w4a16_gemm))
            dense_ms, _ = time_ms(lambda: [F.linear(x, s[3]) for s in sets], len(sets), graph=True)
            for kind, kernel in kinds:
                err = check(kernel, x, sets[0])
                ms, how = time_ms(lambda: [kernel(x, *s[:3], GROUP) for s in sets], len(sets), graph=True)
                ref_ms, _ = time_ms(lambda: x @ awq_dequantize(*sets[0][:3], GROUP, x.dtype).to(BF16), 1, graph=False)
                moved = w_bytes + 2 * m * (k + n)
                gbs = moved / ms / 1e6
                rec = record(kind="w4a16", name=name, k=k, n=n, m=m, kernel=kind, timed=how, us=round(ms * 1e3, 2),
                             gbs=round(gbs, 1), roofline_share=round(gbs / ceiling, 3),
                             tflops=round(2 * m * k * n / ms / 1e9, 2), reference_us=round(ref_ms * 1e3, 1),
                             bf16_cublas_us=round(dense_ms * 1e3, 2), speedup_vs_bf16=round(dense_ms / ms, 2),
                             max_rel_err=float(f"{err:.2e}"), result="PASS" if err < TOL else "FAIL")
                print(f"{name:8s} M={m:5d} {kind}: {rec['us']:9.2f} us  {rec['gbs']:7.0f} GB/s "
                      f"({100 * rec['roofline_share']:5.1f}% of copy)  {rec['tflops']:7.1f} TFLOP/s  "
                      f"bf16 cuBLAS {rec['bf16_cublas_us']:9.2f} us (x{rec['speedup_vs_bf16']:.2f})  "
                      f"ref {rec['reference_us']:9.1f} us  err {err:.1e} {rec['result']}", flush=True)


def launches() -> None:
    """The default GEMVs at M = 1 once per shape to warm up (compile), then once per shape again: the
    second eight (AutoAWQ's layout, then K slabs) are the launches benchmarks/gpu_run.sh's gemvprof
    stage has ncu profile."""
    inputs = [(torch.randn(1, k, device=DEVICE).to(BF16), awq_set(k, n, seed=0)[:3]) for _, k, n in SHAPES]
    for rep in ("warm-up", "profiled"):
        for layout in ("awq", "slabs"):
            for (name, k, n), (x, (qweight, qzeros, scales)) in zip(SHAPES, inputs):
                if layout == "awq":
                    w4a16_gemv(x, qweight, qzeros, scales, GROUP)
                else:
                    w4a16_gemv_slabs(x, awq_to_slabs(qweight), qzeros, scales, GROUP)
                synchronize()
                print(f"{rep} {layout} {name} {k}->{n}", flush=True)


def dequantize_then_matmul(x, qweight, qzeros, scales, group, config=None):
    return x @ w4a16_dequantize(qweight, qzeros, scales, group, x.dtype)


def sweep() -> None:
    """Each candidate at each shape and M; then per M the candidates ranked by their summed time."""
    ceiling = copy_ceiling_gbs()
    totals = {}  # (m, candidate) -> [us summed over shapes, shapes timed, worst error]
    configs = {}  # candidate -> its GemvConfig / GemmConfig (None for the others)
    for name, k, n in SHAPES:
        w_bytes, sets = weight_sets(k, n)
        # (m, label, kernel, config, whether the kernel reads K slabs)
        candidates = [(m, f"gemv {c}", w4a16_gemv, c, False) for m in SWEEP_GEMV_ROWS for c in GEMV_SWEEP]
        candidates += [(m, f"gemv slabs {c}", w4a16_gemv_slabs, c, True) for m in SWEEP_GEMV_ROWS
                       for c in SLAB_GEMV_SWEEP]
        candidates += [(m, f"gemm{' slabs' if on_slabs else ''} {c}", w4a16_gemm, c, on_slabs)
                       for m in SWEEP_GEMM_ROWS for c in GEMM_SWEEP for on_slabs in (False, True)]
        candidates += [(m, f"dequantize{' slabs' if on_slabs else ''} + cuBLAS", dequantize_then_matmul, None, on_slabs)
                       for m in SWEEP_GEMM_ROWS if m >= 32 for on_slabs in (False, True)]
        candidates += [(m, "bf16 cuBLAS (dense)", None, None, False) for m in SWEEP_GEMV_ROWS + SWEEP_GEMM_ROWS]
        if SWEEP_LAYOUT != "both":  # bf16 cuBLAS stays: the reference
            candidates = [c for c in candidates if c[2] is None or c[4] == (SWEEP_LAYOUT == "slabs")]
        slab_sets = [(awq_to_slabs(s[0]), *s[1:]) for s in sets]
        for m, label, kernel, config, on_slabs in candidates:
            configs[label] = config
            x = torch.randn(m, k, device=DEVICE).to(BF16)
            layout_sets = slab_sets if on_slabs else sets
            if kernel is None:
                err, (ms, how) = 0.0, time_ms(lambda: [F.linear(x, s[3]) for s in sets], len(sets), graph=True)
            else:
                def run(x, qweight, qzeros, scales, group, kernel=kernel, config=config):
                    return kernel(x, qweight, qzeros, scales, group, config=config)
                err = check(run, x, sets[0], layout_sets[0])
                ms, how = time_ms(lambda: [run(x, *s[:3], GROUP) for s in layout_sets], len(sets), graph=True)
            gbs = (w_bytes + 2 * m * (k + n)) / ms / 1e6
            record(kind="w4a16-sweep", name=name, k=k, n=n, m=m, candidate=label, timed=how, us=round(ms * 1e3, 2),
                   gbs=round(gbs, 1), roofline_share=round(gbs / ceiling, 3), tflops=round(2 * m * k * n / ms / 1e9, 2),
                   max_rel_err=float(f"{err:.2e}"), result="PASS" if err < TOL else "FAIL")
            total = totals.setdefault((m, label), [0.0, 0, 0.0])
            total[0] += ms * 1e3
            total[1] += 1
            total[2] = max(total[2], err)
        print(f"{name}: {len(candidates)} candidates timed", flush=True)
    for m in SWEEP_GEMV_ROWS + SWEEP_GEMM_ROWS:
        ranked = sorted((us, label, err) for (mm, label), (us, _, err) in totals.items() if mm == m)
        dense = next(us for us, label, _ in ranked if label.startswith("bf16"))
        print(f"M={m}: one layer's four linears, best first (bf16 cuBLAS {dense:.1f} us)", flush=True)
        for us, label, err in ranked[:6]:
            print(f"  {us:9.1f} us  x{dense / us:5.2f} of bf16  err {err:.1e}  {label}", flush=True)
            config = configs[label]
            record(kind="w4a16-sweep-rank", m=m, candidate=label, layer_us=round(us, 2),
                   speedup_vs_bf16=round(dense / us, 3), max_rel_err=float(f"{err:.2e}"),
                   gemv_config=dataclasses.asdict(config) if isinstance(config, (GemvConfig, SlabGemvConfig))
                   else None, slabs="slabs" in label)


def use_this_calls_sweep() -> None:
    """Run the engine as a sweep earlier in this call (its records in OUT_FILE) found best, if there
    was one: the M = 1 GEMV configuration and layout, and on slabs the rows from which dequantize +
    cuBLAS takes over from the fused GEMM (above the most rows at which the GEMM won)."""
    if not os.path.exists(OUT_FILE):
        return
    with open(OUT_FILE) as f:
        ranks = [r for r in map(json.loads, f) if r.get("kind") == "w4a16-sweep-rank"]
    gemv = [r for r in ranks if r["m"] == 1 and r.get("gemv_config")]
    if gemv:
        best = min(gemv, key=lambda r: r["layer_us"])
        awq_module.USE_SLABS = best.get("slabs", False)
        if awq_module.USE_SLABS:
            slabs_module.DEFAULT_CONFIG = config = SlabGemvConfig(**best["gemv_config"])
        else:
            gemv_module.DEFAULT_CONFIG = config = GemvConfig(**best["gemv_config"])
        print(f"GEMV configuration from this call's sweep: {config}, on K slabs: {awq_module.USE_SLABS}", flush=True)
        record(kind="q1", name="gemv-config", config=str(config), slabs=awq_module.USE_SLABS)
    best_on_slabs = {}  # rows -> the fastest W4A16 candidate on slabs at that many rows
    for r in ranks:
        if r["m"] > gemv_module.MAX_ROWS and r.get("slabs") and r["layer_us"] < best_on_slabs.get(r["m"], {}).get(
                "layer_us", float("inf")):
            best_on_slabs[r["m"]] = r
    if best_on_slabs:
        fused_wins = [m for m, r in best_on_slabs.items() if not r["candidate"].startswith("dequantize")]
        awq_module.SLAB_DEQUANT_MIN_ROWS = max(fused_wins) + 1 if fused_wins else min(best_on_slabs)
        print(f"on slabs, dequantize + cuBLAS from {awq_module.SLAB_DEQUANT_MIN_ROWS} rows (this call's sweep)",
              flush=True)
        record(kind="q1", name="slab-dequant-min-rows", rows=awq_module.SLAB_DEQUANT_MIN_ROWS)


def q1(model: str, bf16_too: bool) -> None:
    import gpu_bench
    from gpu_bench import d1, t1

    from tidemind import EngineConfig, pipeline
    from tidemind.lite.awq import AWQSettings, awq_quantizer
    from tidemind.lite.pipeline import CalibrationSettings, LiteJob, run_lite
    from tidemind.loader.resolve import resolve_model

    use_this_calls_sweep()
    source = resolve_model(model).path
    group = 64 if SMOKE else GROUP  # SmolLM2's width 576 takes groups of 64, not 128
    settings = AWQSettings(group_size=group, rtn=True)
    target = os.path.join(os.environ.get("Q1_DIR", "/tmp"), os.path.basename(source.rstrip("/")) + f"-awq-rtn-g{group}")
    job = LiteJob(name="auto_awq (rtn)", quantization=settings.config(), quantizer=awq_quantizer(settings),
                  needs_calibration=False)
    result = run_lite(source, target, job, CalibrationSettings(), DEVICE)
    record(kind="q1", name="rtn-quantize", model=model, seconds=round(result.seconds["total"], 1),
           cmd=f"tidemind lite auto_awq {model} --rtn --w-group-size {group} --work-dir {target} --device {DEVICE}")
    print(f"RTN int4 g{group} copy of {source} in {target}: {result.seconds['total']:.1f} s", flush=True)
    config = EngineConfig(session_len=2048, max_batch_size=256, cache_max_entry_count=0.8,
                          device=DEVICE.type, eager_mode=SMOKE)
    for path, fmt in ([(source, "hf")] if bf16_too else []) + [(target, "awq")]:
        with pipeline(path, backend_config=dataclasses.replace(config, model_format=fmt), log_level="INFO") as pipe:
            print(f"{fmt}: {pipe.engine.executor.description}", flush=True)
            gpu_bench.CMD = f"{CMD} [{fmt}: {path}]"  # what d1 / t1 record as their command
            d1(pipe)
            if SMOKE:
                print("T1 skipped in the smoke run (its warm-up alone is 64 requests)", flush=True)
            else:
                t1(pipe)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args or args[0] not in ("kernels", "sweep", "q1", "launches") or (args[0] == "q1" and len(args) < 2):
        raise SystemExit(__doc__)
    if args[0] == "launches":
        launches()
    elif args[0] in ("sweep", "kernels"):
        (sweep if args[0] == "sweep" else kernels)()
        failed = [r for r in RESULTS if r.get("result") == "FAIL"]
        print(f"{len(failed)} of {sum(1 for r in RESULTS if 'result' in r)} {args[0]} checks failed", flush=True)
    else:
        q1(args[1], "--bf16-too" in sys.argv)


if __name__ == "__main__":
    main()
