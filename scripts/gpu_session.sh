#!/usr/bin/env bash
# One GPU session's measurements (run on the device with .device carried):
#   source .device/env.sh && bash scripts/gpu_session.sh check|speed|longkv
# check: GPU tests of the kernels (fused, attention, MoE) and the engine, then the MoE tile sweep;
# speed: the issue-8 table's latency and 1k/1k throughput (c=64, 256), and a step profile;
# longkv: fp8 vs bf16 KV decode at 64 x 32k, then the HF transformers baseline;
# batch: batch-1 latency, then where a decode step's time goes at batch 256 and 64 (1k context).
# Each part fits one device call (10 minutes).
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHAT=${1:?check, speed, longkv or batch}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ ! -f /tmp/gptoss-20b/config.json ]; then
  /usr/bin/time -f "make-checkpoint %e s" python -m gptoss make-checkpoint /tmp/gptoss-20b --preset gpt-oss-20b 2>&1 \
    | tail -2 | tee "$OUT/make.log"
fi
B="python -m gptoss bench /tmp/gptoss-20b --moe-backend triton"
if [ "$WHAT" = check ]; then
  timeout 300 python -m pytest -q -p no:cacheprovider -m gpu tests/test_rmsnorm.py tests/test_attention_kernels.py \
    tests/test_moe_backends.py tests/test_gpu_engine.py 2>&1 | grep -v "Loading" | tail -15 | tee "$OUT/gpu_tests.log"
  # the MoE tiles of the default "fragments" layout beside the row layout's, decode to prefill
  timeout 330 python benchmarks/bench_moe.py --sweep --tokens 1,8,64,256,2048 --upcasts asm,fragments --backends triton 2>&1 \
    | tail -40 | tee "$OUT/moe_sweep.log"
fi
if [ "$WHAT" = batch ]; then
  timeout 120 $B --mode latency --max-model-len 4096 --runs 3 --output-len 256 --ttft-prompt-len 2048 2>&1 \
    | grep -v "Loading" | tee "$OUT/latency.log"
  timeout 400 python scripts/profile_batch.py --batch 256 64 2>&1 | grep -v "Loading" > "$OUT/profile_batch.log"
  grep -A30 "^GPU:" "$OUT/profile_batch.log"
fi
if [ "$WHAT" = speed ]; then
  timeout 120 $B --mode latency --max-model-len 4096 --runs 3 --output-len 256 --ttft-prompt-len 2048 2>&1 \
    | grep -v "Loading" | tee "$OUT/latency.log"
  timeout 240 $B --mode throughput --max-model-len 4096 --runs 1 --concurrency 64 256 --input-len 1024 \
    --output-len 1024 2>&1 | grep -v "Loading" | tee "$OUT/throughput.log"
  timeout 150 python scripts/profile_step.py 2>&1 | grep -v "Loading" | tee "$OUT/profile.log" | head -60
fi
if [ "$WHAT" = longkv ]; then
  for kv in bfloat16 fp8; do
    timeout 150 $B --mode long_decode --kv-cache-dtype $kv --max-model-len 32900 --max-num-seqs 64 --runs 2 \
      --long-context 32768 --long-batch 64 --concurrency 64 --output-len 64 2>&1 | grep -v "Loading" | tee "$OUT/long_$kv.log"
  done
  timeout 200 python scripts/hf_baseline.py --ckpt /tmp/gptoss-20b 2>&1 | grep -v "Loading\|Warning\|warn" \
    | tail -5 | tee "$OUT/hf.log"
fi
