"""The attention projections and the router at batch-1 decode: cuBLAS (F.linear) against gptoss.kernels.gemv's
linear_rows over its tile options, per gpt-oss-20b shape: time, weight TB/s, % of the copy bandwidth.

    python benchmarks/bench_gemv.py [--rows 1] [--paths one_row,3d]

Medians of CUDA-graph replays with programmatic dependent launch, as the decode graphs run; each timed
call runs `--layers` projections with their own weights, so none finds its weights in L2 (a 20b qkv
weight is 29.5 MB, an H100's L2 50 MB). `--paths` also times one row through the two-row (3-D) form
of the kernel (gemv.ONE_ROW_PATH off).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gptoss.bench import copy_bandwidth_tbs  # noqa: E402
from gptoss.kernels import gemv, pdl  # noqa: E402
from gptoss.kernels.gemv import GemvOptions, linear_rows, linear_rows_torch  # noqa: E402

# (N, K) of gpt-oss-20b; the unembedding (1.16 GB, past any L2) only when asked for: --shapes unembed
SHAPES = {"qkv": (5120, 2880), "o": (2880, 4096), "router": (32, 2880), "unembed": (201088, 2880)}
OPTIONS = [GemvOptions(2, 1024, 4, 2),
           GemvOptions(16, 512, 4, 2), GemvOptions(8, 1024, 4, 2), GemvOptions(4, 1024, 4, 2),
           GemvOptions(4, 2048, 8, 2), GemvOptions(2, 2048, 4, 2),
           GemvOptions(4, 1024, 2, 2), GemvOptions(8, 2048, 8, 2), GemvOptions(1, 2048, 4, 2),
           GemvOptions(2, 512, 2, 2), GemvOptions(1, 1024, 4, 2), GemvOptions(1, 512, 4, 2),
           GemvOptions(1, 512, 2, 3), GemvOptions(1, 256, 1, 3),
           # persistent grids: strips streamed back to back
           GemvOptions(4, 1024, 4, 2, 4), GemvOptions(4, 1024, 4, 2, 6), GemvOptions(4, 512, 4, 2, 8),
           GemvOptions(2, 1024, 4, 2, 8), GemvOptions(8, 512, 4, 2, 4), GemvOptions(2, 512, 2, 2, 12),
           GemvOptions(4, 512, 4, 2, 6)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--paths", default="one_row", help="one_row and/or 3d (the two-row form at one row)")
    ap.add_argument("--shapes", default="qkv,o,router", help="of " + ",".join(SHAPES))
    a = ap.parse_args()
    paths = a.paths.split(",")
    copy = copy_bandwidth_tbs()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy bandwidth {copy:.2f} TB/s; rows {a.rows}; {a.layers} weights per timed call")
    print("| shape | method | us | TB/s | % copy | max err vs fp32 twin |")
    print("|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        N, K = SHAPES[name]
        ws = [(torch.randn(N, K, device="cuda") * 0.02).bfloat16() for _ in range(a.layers)]
        bs = [torch.randn(N, device="cuda").bfloat16() for _ in range(a.layers)]
        x = torch.randn(a.rows, K, device="cuda").bfloat16()
        ref = linear_rows_torch(x, ws[0], bs[0]).float()
        runs = [("cuBLAS (F.linear)", lambda w, b: F.linear(x, w, b))]
        if a.rows == 1:
            runs.append(("cuBLAS gemv (torch.addmv)", lambda w, b: torch.addmv(b, w, x[0])[None]))
        runs += [(f"linear_rows n{o.block_n} k{o.block_k} w{o.num_warps} s{o.num_stages}"
                  + (f" p{o.programs_per_sm}" if o.programs_per_sm else "") + (f" ({p})" if len(paths) > 1 else ""),
                  lambda w, b, o=o: linear_rows(x, w, b, o), p) for o in OPTIONS for p in paths]
        for label, fn, *path in runs:
            gemv.ONE_ROW_PATH = not path or path[0] != "3d"
            try:
                err = (fn(ws[0], bs[0]).float() - ref).abs().max().item() / ref.abs().max().item()
                with pdl.enabled(True):
                    us = do_bench_cudagraph(lambda: [fn(w, b) for w, b in zip(ws, bs)], rep=50) * 1e3 / a.layers
            except Exception as e:  # a tile that does not compile is reported, not fatal
                print(f"| {name} | {label} | failed: {type(e).__name__} | | | |")
                continue
            gemv.ONE_ROW_PATH = True
            tbs = N * K * 2 / us / 1e6
            print(f"| {name} [{N}, {K}] | {label} | {us:.1f} | {tbs:.2f} | {100 * tbs / copy:.0f}% | {err:.1e} |",
                  flush=True)
        del ws, bs


if __name__ == "__main__":
    main()
