#!/usr/bin/env bash
# One GPU session's measurements (run on the device with .device carried):
#   source .device/env.sh && bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
[ -f /tmp/gptoss-20b/config.json ] || python -m gptoss make-checkpoint /tmp/gptoss-20b --preset gpt-oss-20b 2>&1 | tail -1 | tee "$OUT/make.log"
timeout 300 python -m gptoss bench /tmp/gptoss-20b --moe-backend triton --max-model-len 4096 --runs 2 \
  --concurrency 1 8 64 256 --input-len 1024 --output-len 1024 --ttft-prompt-len 2048 2>&1 \
  | grep -v "Loading" | tee "$OUT/bench_graphs.log"
timeout 100 python -m gptoss bench /tmp/gptoss-20b --moe-backend triton --max-model-len 4096 --runs 2 \
  --mode latency --output-len 128 --ttft-prompt-len 2048 --enforce-eager 2>&1 | grep -v "Loading" | tee "$OUT/bench_eager.log"
timeout 130 python -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_engine.py 2>&1 | grep -v "Loading" | tail -15 | tee "$OUT/gpu_tests.log"
