#!/bin/bash
# Driver for the GPU machine (device tool), in two calls on the same warm machine:
#   call 1, carry [.peers, .whl, .gpu_assets/smollm2.part00]:   bash benchmarks/gpu_run.sh peers
#   call 2, carry [.peers, .gpu_assets] minus part00:          bash benchmarks/gpu_run.sh tidemind
# or, for the greedy check alone (no peers, no D1/T1):
#   call 1, carry [.gpu_assets/smollm2.part00]:                 bash benchmarks/gpu_run.sh stage
#   call 2, carry [.gpu_assets] minus part00:                   SKIP_D1T1=1 bash benchmarks/gpu_run.sh tidemind
# and D1/T1 alone (on a machine whose peers ran already):       SKIP_CHECK=1 bash benchmarks/gpu_run.sh tidemind
# The bundled SmolLM2 GGUF (98 MB) is carried in two halves because one call carries at most
# 64 MiB. Peers: ../shared/bench/gpu (copied to .peers). Every figure lands in $OUT/results.jsonl.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GGUF_DIR=/tmp/smollm2; GGUF=$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf; MD=/tmp/llama8b
case "${1:-}" in
peers)
  mkdir -p $GGUF_DIR && cp .gpu_assets/smollm2.part00 $GGUF_DIR/ && echo "kept part00 in $GGUF_DIR"
  STAGES="env ceil mk lmd hf" DEADLINE=${DEADLINE:-540} bash .peers/run_all.sh 2>&1 | tee $OUT/driver.log
  cp /tmp/results.jsonl $OUT/ 2>/dev/null; true ;;
stage)
  mkdir -p $GGUF_DIR && cp .gpu_assets/smollm2.part00 $GGUF_DIR/ && echo "kept part00 in $GGUF_DIR" ;;
tidemind)
  T0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site_tm .gpu_assets/gguf-*.whl || exit 1
  export PYTHONPATH=/tmp/site_tm:$PWD
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch,transformers,triton;print("torch",torch.__version__,"transformers",transformers.__version__,"triton",triton.__version__)'; } | tee $OUT/env_tidemind.txt
  if [ -n "${SKIP_CHECK:-}" ]; then echo "greedy check skipped (SKIP_CHECK)"
  elif [ -f $GGUF_DIR/smollm2.part00 ]; then
    cat $GGUF_DIR/smollm2.part00 .gpu_assets/smollm2.part01 > $GGUF
    if [ "$(sha256sum $GGUF | cut -d' ' -f1)" = "$(cat .gpu_assets/smollm2.sha256)" ]; then
      timeout ${CHECK_TIMEOUT:-240} python3 benchmarks/gpu_bench.py check $GGUF 2>&1 | grep -v "Loading\|Converting" | tee $OUT/check.log
    else echo "SmolLM2 GGUF checksum mismatch: check skipped"; fi
  else echo "part00 missing (machine restarted?): greedy check skipped"; fi
  timeout 120 python3 -m pytest -q -m gpu tests/test_sampler.py 2>&1 | tail -3 | tee $OUT/pytest_gpu.log
  [ -n "${SKIP_D1T1:-}" ] && exit 0
  [ -f $MD/config.json ] || timeout 200 python3 .peers/mkmodel.py $MD .peers/tok > $OUT/mk.log 2>&1
  left=$(( ${DEADLINE:-560} - ($(date +%s) - T0) ))
  echo "d1t1 with ${left}s left"
  timeout $left python3 benchmarks/gpu_bench.py d1t1 $MD 2>&1 | grep -v "Loading" | tee $OUT/tidemind.log
  python3 .peers/summarize.py $OUT/results.jsonl ;;
*) echo "usage: $0 peers|stage|tidemind"; exit 2 ;;
esac
