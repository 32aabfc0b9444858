#!/usr/bin/env bash
# One GPU session's measurements (run on the device with .device carried):
#   source .device/env.sh && bash scripts/gpu_session.sh [check|bench|all]
# check: GPU tests of the fused kernels and the engine, then batch-1 latency and a decode profile;
# bench: the issue-8 table: latency, 1k/1k throughput, fp8 vs bf16 KV at 64 x 32k, HF baseline.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHAT=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ ! -f /tmp/gptoss-20b/config.json ]; then
  /usr/bin/time -f "make-checkpoint %e s" python -m gptoss make-checkpoint /tmp/gptoss-20b --preset gpt-oss-20b 2>&1 \
    | tail -2 | tee "$OUT/make.log"
fi
B="python -m gptoss bench /tmp/gptoss-20b --moe-backend triton"
if [ "$WHAT" != bench ]; then
  timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_rmsnorm.py tests/test_attention_kernels.py \
    tests/test_gpu_engine.py 2>&1 | grep -v "Loading" | tail -15 | tee "$OUT/gpu_tests.log"
  timeout 120 $B --mode latency --max-model-len 4096 --runs 3 --output-len 128 --ttft-prompt-len 2048 2>&1 \
    | grep -v "Loading" | tee "$OUT/latency.log"
  # the decode tiles, split-K gate_up among them (not measured on a GPU yet)
  timeout 240 python benchmarks/bench_moe.py --sweep --tokens 1,8,2048 --upcasts asm --backends triton 2>&1 \
    | tail -40 | tee "$OUT/moe_sweep.log"
  timeout 150 python scripts/profile_step.py 2>&1 | grep -v "Loading" | tee "$OUT/profile.log" | head -60
fi
if [ "$WHAT" != check ]; then
  timeout 120 $B --mode latency --max-model-len 4096 --runs 3 --output-len 256 --ttft-prompt-len 2048 2>&1 \
    | grep -v "Loading" | tee "$OUT/latency.log"
  timeout 240 $B --mode throughput --max-model-len 4096 --runs 1 --concurrency 64 256 --input-len 1024 \
    --output-len 1024 2>&1 | grep -v "Loading" | tee "$OUT/throughput.log"
  for kv in bfloat16 fp8; do
    timeout 150 $B --mode long_decode --kv-cache-dtype $kv --max-model-len 32900 --max-num-seqs 64 --runs 2 \
      --long-context 32768 --long-batch 64 --concurrency 64 --output-len 64 2>&1 | grep -v "Loading" | tee "$OUT/long_$kv.log"
  done
  timeout 200 python scripts/hf_baseline.py --ckpt /tmp/gptoss-20b 2>&1 | grep -v "Loading\|Warning\|warn" \
    | tail -5 | tee "$OUT/hf.log"
fi
