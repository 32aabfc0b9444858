#!/usr/bin/env bash
# Issue 12 on a 2-GPU machine (run on the device with .device carried), in parts that fit one call:
#   source .device/env.sh && bash scripts/multi_gpu.sh agreement   # 20b: TP=1 / TP=2 / EP=2 greedy tokens
#   source .device/env.sh && bash scripts/multi_gpu.sh throughput  # 20b: 1k/1k at c=64, 256 for each
#   source .device/env.sh && bash scripts/multi_gpu.sh 120b        # 120b shape at TP=2 (and one GPU if it fits)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu_$1.txt"
M=scripts/multi_gpu.py
make20b() { [ -f /tmp/gptoss-20b/config.json ] || python -m gptoss make-checkpoint /tmp/gptoss-20b --preset gpt-oss-20b | tail -1; }
case "$1" in
agreement)
  make20b
  timeout 170 python $M run --tp 1 --tokens --batch1-too --concurrency --out "$OUT/tp1_tokens.json" 2>&1 | grep -v Loading
  timeout 170 python $M run --tp 2 --tokens --concurrency --out "$OUT/tp2_tokens.json" 2>&1 | grep -v Loading
  timeout 170 python $M run --tp 2 --ep --tokens --concurrency --out "$OUT/ep2_tokens.json" 2>&1 | grep -v Loading
  python $M compare "$OUT/tp1_tokens.json" "$OUT/tp2_tokens.json" "$OUT/ep2_tokens.json" | tee "$OUT/agreement.md" ;;
agreement32)  # the same in float32 with the torch MoE backend: rounding noise far below the logit gaps
  make20b
  F="--tokens --dtype float32 --moe-backend torch --num-prompts 32 --longest 200 --concurrency"
  timeout 150 python $M run --tp 1 $F --out "$OUT/tp1_fp32.json" 2>&1 | grep -v Loading
  timeout 150 python $M run --tp 2 $F --out "$OUT/tp2_fp32.json" 2>&1 | grep -v Loading
  timeout 150 python $M run --tp 2 --ep $F --out "$OUT/ep2_fp32.json" 2>&1 | grep -v Loading
  python $M compare "$OUT/tp1_fp32.json" "$OUT/tp2_fp32.json" "$OUT/ep2_fp32.json" | tee "$OUT/agreement_fp32.md" ;;
throughput)
  make20b
  for cfg in "--tp 1" "--tp 2" "--tp 2 --ep"; do
    timeout 280 python $M run $cfg --out "$OUT/tput_${cfg// /}.json" 2>&1 | grep -v Loading
  done
  python $M compare "$OUT"/tput_*.json | tee "$OUT/throughput.md" ;;
120b)
  [ -f /tmp/gptoss-120b/config.json ] || /usr/bin/time -f "make-checkpoint 120b %e s" \
    python -m gptoss make-checkpoint /tmp/gptoss-120b --preset gpt-oss-120b | tail -1
  timeout 240 python $M run --ckpt /tmp/gptoss-120b --tp 2 --latency --concurrency 64 --out "$OUT/120b_tp2.json" 2>&1 \
    | grep -v Loading
  # one GPU holds the 120b shape (about 65 GB of weights) with room for KV only on an H200
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  if [ "$MEM" -gt 100000 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout 240 python $M run --ckpt /tmp/gptoss-120b --tp 1 --latency --concurrency 64 \
      --out "$OUT/120b_tp1.json" 2>&1 | grep -v Loading
  fi ;;
esac
