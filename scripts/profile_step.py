"""Where a step's time goes on the GPU: decode (eager and graphed) and a 2,048-token prefill.

    python scripts/profile_step.py [--ckpt /tmp/gptoss-20b] [--moe-backend triton]
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss import LLM, SamplingParams


def timed(llm, prompt, n):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--moe-backend", default="triton")
    a = ap.parse_args()
    for eager in (True, False):
        llm = LLM(a.ckpt, moe_backend=a.moe_backend, max_model_len=4096, max_num_seqs=8,
                  kv_cache_memory_bytes=4 << 30, enforce_eager=eager, progress=False,
                  enable_prefix_caching=False)
        g = torch.Generator().manual_seed(0)
        p = torch.randint(0, 199998, (2048,), generator=g).tolist()
        timed(llm, p[:16], 8)
        t_pre = timed(llm, p, 1)
        t_dec = (timed(llm, p[:16], 65) - timed(llm, p[:16], 1)) / 64
        print(f"eager={eager} graphs={llm.engine.cuda_graphs}: prefill 2048 {t_pre * 1000:.1f} ms, "
              f"decode {t_dec * 1000:.2f} ms/token", flush=True)
        if eager:
            for name, prompt, n in (("decode x8", p[:16], 9), ("prefill 2048", p, 1)):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    timed(llm, prompt, n)
                print(f"--- {name}: by self CUDA time")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
                print(f"--- {name}: by CPU total")
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
