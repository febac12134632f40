#!/bin/bash
# The one driver for the GPU machine (device tool): every check and timing the GPU engine needs,
# run as stages in one call, each under a time limit so the call ends inside its 10 minutes.
#
#   STAGES="setup gputests kernels mk perf" bash benchmarks/gpu_run.sh      # carry .peers, .gpu_assets/wheels
#
# Stages (in this order; each appends its figures to $OUT/results.jsonl, logs to $OUT/<stage>.log):
#   setup     install the carried wheels (.gpu_assets/wheels: gguf, fastapi, starlette, uvicorn; .whl: the
#             LMDeploy peer's) into /tmp/site, print versions
#   stage     keep .gpu_assets/smollm2.part00 in /tmp/smollm2 (the SmolLM2 GGUF, 98 MB, travels in two
#             halves: one call carries part00 with STAGES=stage, the next call -- at once, while the machine
#             is warm -- carries part01 and runs `check`)
#   gputests  pytest -m gpu: every kernel against its torch reference, the engine's Triton backend against
#             the reference backend on tiny models (eager and CUDA graphs), the sampler on CUDA
#   kernels   benchmarks/gpu_kernels.py: kernels at model shapes, checked and timed against the roofline
#   check     greedy SmolLM2 float32 vs transformers; graphs / eager / batch-limit invariance
#   mk        the llama8b-shape bf16 model in /tmp/llama8b (the peers' mkmodel.py)
#   peers     LMDeploy's PyTorch engine: D1, T1 twice (warm figure), on /tmp/llama8b
#   perf      tidemind: start-up (empty Triton cache), KV tokens, D1, L1, T1 (twice) on /tmp/llama8b; then in the
#             plain loop (overlap_schedule off): start-up (warm cache), D1, T1 once
#   kvquant   tidemind with its KV cache bf16, int8 and int4 (quant_policy 0 / 8 / 4) on /tmp/llama8b: the
#             decode and KV-write kernels, then per policy the KV tokens and T1 (twice), and their ratios
#             to bf16 (benchmarks/gpu_kv_quant.py; needs mk; about 6 minutes: STAGES="setup mk kvquant")
#   serve     tidemind: S1 at rate inf through its own api_server, engine process then engine thread
#             (S1_ENGINE_MODES picks), each after a warm-up as T1's
#   t1        tidemind: T1 alone (warm-up, T1_REP reps), the figure S1 is judged against (needs mk)
#   sweep     benchmarks/gpu_quant.py sweep: the W4A16 GEMV / GEMM tile configurations at llama8b's shapes
#   gemvprof  ncu (Nsight Compute, clocks left alone) on the default W4A16 GEMVs (AutoAWQ's layout, then K slabs)
#             at llama8b's four shapes, M = 1, with DRAM bytes read and L2 hit rates:
#             speed of light, occupancy, scheduler and warp-stall statistics, memory workload, stalls per
#             source line; text in $OUT/gemvprof.log (benchmarks/gpu_quant.py launches; no model needed)
#   q1        benchmarks/gpu_quant.py q1: an RTN W4A16 copy of /tmp/llama8b, its D1 and T1 (Q1_ARGS=--bf16-too:
#             the bf16 model's too, for the ratio; needs mk)
#   profile   benchmarks/gpu_profile.py: decode steps at batch 1 and 256, device busy against wall time and the host's
#             phases, in the overlapped and the plain loop (needs mk)
#   allreduce benchmarks/gpu_allreduce.py: all-reduce latency between the GPUs (NCCL, torch's symmetric-memory
#             one-shot and two-shot), eager and in CUDA graphs, at 1 to 4,096 rows of 4096 bf16 (2 GPUs or more)
#   tp        tidemind at --tp 1 then --tp 2 on /tmp/llama8b: start-up, D1, T1 and their ratios (benchmarks/gpu_tp.py;
#             needs mk and 2 GPUs: the device tool's kind nvidia-h200-x2; about 3 minutes: STAGES="setup mk tp")
#   peerstp2  LMDeploy's PyTorch engine at tp 2 (LMD_TP=2, its process executor): D1, T1 twice, on /tmp/llama8b
#             (needs mk; carry .whl); T1 at tp 2 is compared with tp's figure for tidemind at tp 2
set -u
T0=$(date +%s); DEADLINE=${DEADLINE:-570}; STAGES=${STAGES:-"setup gputests kernels mk perf"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OUT=${OUT:-/tmp}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GGUF_DIR=/tmp/smollm2; GGUF=$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf; MD=/tmp/llama8b
left(){ echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage(){ local name=$1 lim=$2; shift 2; local l; l=$(left); [ "$l" -lt "$lim" ] && lim=$l
  if [ "$lim" -lt 20 ]; then echo "SKIP $name (no time left)"; return; fi
  echo "=== $name (limit ${lim}s) at $(( $(date +%s) - T0 ))s: $*"
  timeout -k 5 "$lim" "$@" >> "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc at $(( $(date +%s) - T0 ))s"; grep -v "Loading\|Converting\|Dequantiz" "$OUT/$name.log" | tail -n ${TAILN:-8}; }
has(){ [[ " $STAGES " == *" $1 "* ]]; }
if has setup || [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_assets/wheels/*.whl $( [ -d .whl ] && ls .whl/*.whl ) > $OUT/pipinstall.log 2>&1 || echo "pip install failed"
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c 'import torch,transformers,triton;print("torch",torch.__version__,"cuda",torch.version.cuda,"transformers",transformers.__version__,"triton",triton.__version__)'; } | tee $OUT/env.txt
fi
export PYTHONPATH=/tmp/site:$PWD
if has stage; then mkdir -p $GGUF_DIR && cp .gpu_assets/smollm2.part00 $GGUF_DIR/ && echo "kept part00 in $GGUF_DIR"; fi
has gputests && stage gputests ${GPUTESTS_LIM:-240} python3 -m pytest -q -m gpu -p no:cacheprovider ${GPUTESTS_ARGS:-tests/}
has kernels && stage kernels ${KERNELS_LIM:-150} python3 benchmarks/gpu_kernels.py
if has check; then
  if [ -f $GGUF_DIR/smollm2.part00 ] && [ -f .gpu_assets/smollm2.part01 ]; then
    cat $GGUF_DIR/smollm2.part00 .gpu_assets/smollm2.part01 > $GGUF
    if [ "$(sha256sum $GGUF | cut -d' ' -f1)" = "$(cat .gpu_assets/smollm2.sha256)" ]; then
      CHECK_REFERENCES=${CHECK_REFERENCES:-sdpa} stage check ${CHECK_LIM:-200} python3 benchmarks/gpu_bench.py check $GGUF
    else echo "SmolLM2 GGUF checksum mismatch: check skipped"; fi
  else echo "part00 (staged by an earlier call) or part01 (carried now) missing: check skipped"; fi
fi
if has mk; then [ -f $MD/config.json ] && echo "model exists at $MD" || stage mk 200 python3 .peers/mkmodel.py $MD .peers/tok; fi
has peers && LMD_T1_REP=2 stage peers ${PEERS_LIM:-300} python3 .peers/lmd_bench.py $MD 2
# perf starts with an empty Triton kernel cache: its first start-up is a first start on a bare machine
has perf && TRITON_CACHE_DIR=$(mktemp -d) stage perf ${PERF_LIM:-300} python3 benchmarks/gpu_bench.py perf $MD
has kvquant && TAILN=${TAILN:-14} stage kvquant ${KVQUANT_LIM:-420} python3 benchmarks/gpu_kv_quant.py $MD
has serve && stage serve ${SERVE_LIM:-240} python3 benchmarks/gpu_bench.py serve $MD
has t1 && stage t1 ${T1_LIM:-150} python3 benchmarks/gpu_bench.py t1 $MD
has sweep && TAILN=${TAILN:-60} stage sweep ${SWEEP_LIM:-300} python3 benchmarks/gpu_quant.py sweep
has gemvprof && TAILN=${TAILN:-40} stage gemvprof ${GEMVPROF_LIM:-240} ncu --clock-control none \
  -k regex:_w4a16_gemv --launch-skip 8 --launch-count 8 --section SpeedOfLight --section Occupancy \
  --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
  --metrics dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct \
  python3 benchmarks/gpu_quant.py launches
has q1 && stage q1 ${Q1_LIM:-360} python3 benchmarks/gpu_quant.py q1 $MD ${Q1_ARGS:-}
has profile && stage profile ${PROFILE_LIM:-150} python3 benchmarks/gpu_profile.py $MD
has allreduce && TAILN=${TAILN:-24} stage allreduce ${ALLREDUCE_LIM:-90} python3 benchmarks/gpu_allreduce.py
has tp && T1_REP=${T1_REP:-1} TAILN=${TAILN:-6} stage tp ${TP_LIM:-480} python3 benchmarks/gpu_tp.py $MD
# LMDeploy picks its Ray executor for tp > 1 when its backend supports Ray, and Ray is not installed here:
# its own one-machine process executor instead (LMDEPLOY_EXECUTOR_BACKEND=mp)
has peerstp2 && LMDEPLOY_EXECUTOR_BACKEND=mp LMD_TP=2 LMD_TAG=-tp2 stage peerstp2 ${PEERS_LIM:-360} python3 .peers/lmd_bench.py $MD 2
echo "=== total $(( $(date +%s) - T0 ))s"
# the peers' table reads D1 and T1-like records (and the model's, the ceilings'): it gets only those
python3 -c 'import json,sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("system") in ("model", "ceiling") or r.get("workload") == "D1" or "output_tok_s" in r: print(line, end="")' \
  $OUT/results.jsonl > $OUT/summary-input.jsonl 2>/dev/null
[ -f .peers/summarize.py ] && python3 .peers/summarize.py $OUT/summary-input.jsonl
