"""Whether the host stays ahead of the GPU in batch-1 decode: the engine's host time a step split into
scheduling, launching (packing, the replay call), the wait for the step before's tokens and the rest
(stop checks, detokenizing, the caller). With the host ahead, the wait takes what the GPU's step has
left over; a wait near zero means the GPU waits for the host instead.

    python scripts/host_step_probe.py [--ckpt /tmp/gptoss-20b] [--tokens 128]
"""

import argparse
import statistics
import time

import torch

from gptoss import LLM, SamplingParams
from gptoss.engine import model_runner, scheduler


def timed(owner, name, log):
    f = getattr(owner, name)

    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return f(*args, **kw)
        finally:
            log.setdefault(name, []).append(time.perf_counter() - t0)
    setattr(owner, name, wrapper)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    llm = LLM(a.ckpt, moe_backend="triton", max_model_len=4096, max_num_seqs=1, progress=False,
              enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30)
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(100, 164))}
    llm.generate(prompt, sp, use_tqdm=False)
    log = {}
    timed(scheduler.Scheduler, "schedule", log)
    timed(model_runner.ModelRunner, "launch", log)
    timed(model_runner.PendingTokens, "tolist", log)
    torch.cuda.synchronize()
    stamps = []
    for _ in llm.generate_stream(prompt, sp):
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    per = statistics.median(steps) * 1e6
    print(f"GPU: {torch.cuda.get_device_name()}; batch 1, {a.tokens} tokens")
    print("| part | us a step (median) |\n|---|---|")
    print(f"| a token, as the stream yields them | {per:.1f} |")
    for name, v in log.items():
        print(f"| {name} | {statistics.median(v[-len(steps):]) * 1e6:.1f} |")
    rest = per - sum(statistics.median(v[-len(steps):]) * 1e6 for v in log.values())
    print(f"| the rest (stop checks, detokenizing, outputs) | {rest:.1f} |")


if __name__ == "__main__":
    main()
