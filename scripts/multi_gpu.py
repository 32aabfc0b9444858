"""Tensor / expert parallelism on several GPUs: greedy-token agreement with one GPU, and throughput.

    python scripts/multi_gpu.py run --ckpt /tmp/gptoss-20b --tp 2 [--ep] --out tp2.json [--tokens] \
        [--concurrency 64 256] [--latency]
    python scripts/multi_gpu.py compare tp1.json tp2.json ep2.json

`run` loads one engine (in its own process, so each configuration starts from a clean GPU), and with
--tokens generates 32 greedy tokens for 64 random prompts of 33..600 tokens, all in one batch and,
with --batch1-too, one prompt at a time: two different batch compositions of the same engine are the
noise floor that TP / EP results are compared against. Then 1k in / 1k out throughput at each
--concurrency. `compare` prints how many prompts give the reference's 32 tokens exactly and where
the others first differ.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

NEW_TOKENS = 32


def prompts(n: int = 64, seed: int = 1, longest: int = 600) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(199998) for _ in range(rng.randint(33, longest))] for _ in range(n)]


def run(a) -> None:
    from gptoss import LLM, SamplingParams
    from gptoss.bench import measure_decode, measure_throughput
    llm = LLM(a.ckpt, moe_backend=a.moe_backend, tensor_parallel_size=a.tp, enable_expert_parallel=a.ep, dtype=a.dtype,
              max_model_len=4096, max_num_seqs=max(a.concurrency + [64]), enable_prefix_caching=False,
              async_scheduling=not a.sync, progress=False)
    label = f"TP={a.tp}" + (" EP" if a.ep else "") + f" {a.dtype} {llm.engine.moe_backend}" + (" sync" if a.sync else "")
    res: dict = {"label": label, "gpu": torch.cuda.get_device_name(), "cuda_graphs": llm.engine.cuda_graphs}

    def save():  # after every figure, so a run cut short by a timeout keeps what it measured
        with open(a.out, "w") as f:
            json.dump(res, f)
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    if a.tokens:
        ps = [{"prompt_token_ids": p} for p in prompts(a.num_prompts, longest=a.longest)]
        res["batch"] = [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]
        if a.batch1_too:
            res["batch1"] = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p in ps]
        save()
    rng = random.Random(0)
    if a.latency:
        rate, ms = measure_decode(llm, rng, 256, 3)
        res["decode_batch1_tok_s"] = rate
        save()
        print(f"{label}: decode batch 1 {rate:.1f} tok/s ({ms:.2f} ms/token)", flush=True)
    for c in a.concurrency:
        t0 = time.perf_counter()
        tps, host, pack = measure_throughput(llm, rng, c, 1024, 1024, 1)
        res[f"throughput_c{c}"] = tps
        save()
        print(f"{label}: throughput c={c} 1k/1k {tps:.0f} out tok/s (host {host:.1f}% + packing {pack:.1f}%, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    llm.engine.shutdown()


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def compare(files: list[str]) -> None:
    runs = [json.load(open(f)) for f in files]
    ref = runs[0]
    print(f"greedy agreement with {ref['label']} ({len(ref['batch'])} prompts of 33+ tokens in one batch, "
          f"{NEW_TOKENS} new tokens each), {ref['gpu']}:")
    print("| run | prompts with identical tokens | first difference at (median of the others) |")
    print("|---|---|---|")
    others = [(f"{ref['label']}, one prompt at a time", ref.get("batch1"))] + \
             [(r["label"], r.get("batch")) for r in runs[1:]]
    for label, toks in others:
        if not toks:
            continue
        diffs = [first_diff(x, y) for x, y in zip(ref["batch"], toks)]
        same = sum(d is None for d in diffs)
        where = [d for d in diffs if d is not None]
        med = f"token {statistics.median(where):.0f}" if where else "-"
        print(f"| {label} | {same}/{len(diffs)} ({100 * same / len(diffs):.0f}%) | {med} |")
    keys = sorted({k for r in runs for k in r if k.startswith(("throughput", "decode"))})
    print("\n| run | cuda graphs | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in runs:
        vals = " | ".join(f"{r[k]:.0f}" if k in r else "-" for k in keys)
        print(f"| {r['label']} | {r['cuda_graphs']} | {vals} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ckpt", default="/tmp/gptoss-20b")
    r.add_argument("--moe-backend", default="triton")
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--ep", action="store_true")
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    r.add_argument("--num-prompts", type=int, default=64)
    r.add_argument("--longest", type=int, default=600, help="longest prompt (tokens)")
    r.add_argument("--out", required=True)
    r.add_argument("--sync", action="store_true", help="async_scheduling=False")
    r.add_argument("--tokens", action="store_true", help="greedy tokens for the agreement check")
    r.add_argument("--batch1-too", action="store_true", help="and the same prompts one at a time")
    r.add_argument("--latency", action="store_true", help="batch-1 decode tokens/s")
    r.add_argument("--concurrency", type=int, nargs="*", default=[64, 256])
    c = sub.add_parser("compare")
    c.add_argument("files", nargs="+")
    a = ap.parse_args()
    if a.cmd == "run":
        run(a)
    else:
        compare(a.files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
