"""TTFT of a 2,048-token prompt over many requests in one process, each printed, with the model
forward's GPU time (CUDA events around it): `gptoss bench` reports the median of 5 wall-clock
requests, which moves with the host from call to call. Also the host time the forward takes to
launch its kernels: where it nears the GPU time, the GPU waits on the host.

    python scripts/ttft_runs.py [--ckpt /tmp/gptoss-20b] [--runs 12] [--prompt-len 2048]
"""

import argparse
import random
import statistics
import time

import torch

from gptoss import LLM, SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=2048)
    a = ap.parse_args()
    llm = LLM(a.ckpt, moe_backend="triton", max_model_len=4096, progress=False)
    model = llm.engine.model
    forward, gpu_ms, host_ms = model.forward, [], []

    def timed(*args, **kw):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        t0 = time.perf_counter()
        out = forward(*args, **kw)
        host_ms.append((time.perf_counter() - t0) * 1e3)  # launching alone: the GPU waits if this is longer
        e.record()
        torch.cuda.synchronize()
        gpu_ms.append(s.elapsed_time(e))
        return out

    model.forward = timed
    rng = random.Random(0)
    wall = []
    for _ in range(a.runs + 1):  # the first request compiles and is not counted
        prompt = {"prompt_token_ids": [rng.randrange(199998) for _ in range(a.prompt_len)]}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1000)
    print("TTFT ms:", " ".join(f"{x:.1f}" for x in wall[1:]), f"median {statistics.median(wall[1:]):.1f}")
    print("forward GPU ms:", " ".join(f"{x:.1f}" for x in gpu_ms[1:]), f"median {statistics.median(gpu_ms[1:]):.1f}")
    print("forward host ms (launches):", " ".join(f"{x:.1f}" for x in host_ms[1:]),
          f"median {statistics.median(host_ms[1:]):.1f}")


if __name__ == "__main__":
    main()
