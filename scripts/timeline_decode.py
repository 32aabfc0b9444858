"""Where a graphed decode step's time goes with the kernels as they overlap under PDL: each kernel's
marginal time (how far it moves the latest end of the step's work, so a kernel that waits on the SM
while the one before runs counts only for what it adds) and the idle gaps before kernels, summed by
kernel per step. An eager profile (scripts/profile_batch.py) times kernels alone, without PDL.

    python scripts/timeline_decode.py [--ckpt /tmp/gptoss-20b] [--batch 1] [--context 1024] [--steps 8]
    python scripts/timeline_decode.py --list 60   # also the second step's first 60 kernels: start, end (us)

A kernel's name carries the one before it ("_gemv_kernel < _down_kernel" is a layer's qkv), which tells
apart the launches of one kernel at different places in a layer.
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss import LLM
from profile_batch import decoding_batch, sync


def short(name: str) -> str:
    name = name.split("(")[0].split("<")[0].strip()
    return name[:48]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--moe-backend", default="triton")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--list", type=int, default=0, help="print the second step's first LIST kernels, their start "
                    "and end from the step's first kernel (under PDL a kernel starts when it launches, before its wait)")
    a = ap.parse_args()
    llm = LLM(a.ckpt, moe_backend=a.moe_backend, max_model_len=a.max_model_len, max_num_seqs=a.batch,
              progress=False, enable_prefix_caching=False)
    eng = llm.engine
    decoding_batch(llm, a.batch, a.context, a.max_model_len)
    for _ in range(3):
        eng.step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            eng.step()
        sync()
    ev = sorted(((e.time_range.start, e.time_range.end, short(e.name)) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda t: t[0])
    if a.list:
        firsts = [i for i, e in enumerate(ev) if "decode_inputs" in e[2]]
        step = ev[firsts[min(1, len(firsts) - 1)]:] if firsts else ev
        print("| start us | end us | us | kernel |\n|---|---|---|---|")
        for s, e, name in step[:a.list]:
            print(f"| {s - step[0][0]:.2f} | {e - step[0][0]:.2f} | {e - s:.2f} | {name} |")
    marg, gaps, count = collections.Counter(), collections.Counter(), collections.Counter()
    latest, prev = ev[0][0], "start"
    for s, e, name in ev:
        key = f"{name} < {prev}"
        if s > latest:
            gaps[key] += s - latest
        marg[key] += max(0.0, e - max(latest, s))
        count[key] += 1
        latest, prev = max(latest, e), name
    span = (latest - ev[0][0]) / a.steps
    n = a.steps
    print(f"GPU: {torch.cuda.get_device_name()}; batch {a.batch}, context {a.context}+, {n} steps, "
          f"{len(ev) / n:.0f} kernels a step, span {span:.1f} us a step "
          f"(busy {sum(marg.values()) / n:.1f}, idle {sum(gaps.values()) / n:.1f})")
    print("| kernel < the one before | a step | marginal us a step | us each | idle before, us a step |")
    print("|---|---|---|---|---|")
    for key, m in sorted(marg.items(), key=lambda kv: -kv[1] - gaps[kv[0]])[:a.rows]:
        c = count[key] / n
        print(f"| {key} | {c:.0f} | {m / n:.1f} | {m / n / c:.2f} | {gaps[key] / n:.1f} |")


if __name__ == "__main__":
    main()
