"""Where a decode step's time goes at a large batch (the 1k/1k throughput regime): wall time per
engine step split into host parts, the bare CUDA-graph replay (GPU time alone), and the kernels of a
graphed and of an eager step by CUDA time.

    python scripts/profile_batch.py [--ckpt /tmp/gptoss-20b] [--batch 256 64] [--context 1024]
    python scripts/profile_batch.py --batch 64 --context 32768 --long --kv-cache-dtype fp8 --max-model-len 32900

--long gives each sequence its context as allocated KV (bench.start_long_decode, as `gptoss bench
--mode long_decode` does) instead of prefilling it.
"""

import argparse
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss import LLM, SamplingParams
from gptoss.bench import start_long_decode


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decoding_batch(llm, batch: int, context: int, max_len: int):
    """batch requests with `context`-token prompts, stepped until every one decodes."""
    eng = llm.engine
    rng = random.Random(batch)
    sp = SamplingParams(temperature=0, max_tokens=max_len - context - 8, ignore_eos=True)
    for _ in range(batch):
        eng.add_request([rng.randrange(199998) for _ in range(context)], sp)
    while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in eng.scheduler.running):
        eng.step()
    eng.step()
    sync()


def table(prof, n=22):
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=n, max_name_column_width=70)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--moe-backend", default="triton")
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=22, help="kernels listed per table")
    ap.add_argument("--long", action="store_true", help="allocate the context instead of prefilling it")
    ap.add_argument("--kv-cache-dtype", default="auto")
    a = ap.parse_args()
    summary = []
    for B in a.batch:
        llm = LLM(a.ckpt, moe_backend=a.moe_backend, max_model_len=a.max_model_len, max_num_seqs=B, progress=False,
                  enable_prefix_caching=False, kv_cache_dtype=a.kv_cache_dtype)
        eng, runner = llm.engine, llm.engine.runner
        if a.long:
            start_long_decode(llm, random.Random(B), B, a.context, a.max_model_len - a.context - 8)
            eng.step()
            eng.step()
            sync()
        else:
            decoding_batch(llm, B, a.context, a.max_model_len)
        st, pack0 = dict(eng.step_times), runner.pack_seconds
        walls = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - t0)
        d = {k: (eng.step_times[k] - st[k]) / a.steps * 1e3 for k in ("schedule", "execute", "update")}
        pack = (runner.pack_seconds - pack0) / a.steps * 1e3
        # the graph alone, replayed back to back: the GPU's share of a step
        reps = [float("nan")]
        if runner.graphs is not None:
            g, _ = runner.graphs.graphs[next(s for s in runner.graphs.sizes if s >= B)][0]
            g.replay()
            sync()
            reps = []
            for _ in range(10):
                t0 = time.perf_counter()
                g.replay()
                sync()
                reps.append(time.perf_counter() - t0)
        wall, gpu = statistics.median(walls) * 1e3, statistics.median(reps) * 1e3
        summary.append(f"| {B} | {a.context}+ | {wall:.2f} | {gpu:.2f} | {d['schedule']:.2f} | {pack:.2f} | "
                       f"{d['execute'] - pack:.2f} | {d['update']:.2f} | {B / wall * 1e3:,.0f} |")
        print(summary[-1], flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                eng.step()
            sync()
        print(f"--- batch {B}, 3 graphed steps: by self CUDA time")
        print(table(prof, a.rows))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 3 / 1e3
        print(f"graphed step: {len(kernels) / 3:.0f} kernels / memsets, {busy:.3f} ms of them busy")
        graphs, runner.graphs = runner.graphs, None
        eng.step()
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                eng.step()
            sync()
        runner.graphs = graphs
        print(f"--- batch {B}, 2 eager steps: by self CUDA time")
        print(table(prof, a.rows + 8))
        for r in list(eng.scheduler.running):
            eng.scheduler.finish(r, "abort")
        del llm, eng, runner, graphs
        torch.cuda.empty_cache()
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print("| batch | context | wall ms/step | graph replay ms | schedule | pack | model+sample | update | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
