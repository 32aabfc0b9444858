"""How much of a batch-1 decode token is the GPU's: the engine's ms a token (generate, 129 tokens less
1) against the captured decode graph replayed back to back (the same step with no host in between).

    python scripts/step_gap_probe.py [--ckpt /tmp/gptoss-20b] [--rounds 5]
"""

import argparse
import statistics

import torch

import ab_decode
from gptoss import LLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-model-len", type=int, default=4096)
    a = ap.parse_args()
    llm = LLM(a.ckpt, moe_backend="triton", max_model_len=a.max_model_len, max_num_seqs=1, progress=False,
              enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30)
    eng, rep = [], []
    for _ in range(a.rounds):
        eng.append(ab_decode.decode_ms(llm, 1))
        rep.append(ab_decode.replay_ms(llm, 1))
    print(f"GPU: {torch.cuda.get_device_name()}")
    print("| what | ms/token (median) | runs |")
    print("|---|---|---|")
    for name, v in (("engine (generate)", eng), ("graph replays back to back", rep)):
        print(f"| {name} | {statistics.median(v):.3f} | {' '.join(f'{x:.3f}' for x in v)} |")


if __name__ == "__main__":
    main()
