"""Is the one-token MoE bound by DRAM or by the SMs? Times the "fragments" gate_up and down GEMMs of
the 20b layer at one token (the fragments_config tiles) three ways, on an H100:

- cold: 4 layers with their own weights per timed graph, as in the model (no layer finds its
  weights in L2);
- hot: one layer's weights 4 times over, so they come from L2 (gate_up's 35 MB and down's 18 MB of
  four experts fit an H100's 50 MB);
- load-only: a kernel that streams gate_up's bytes over the same grid (expert tiles x 64-row
  strips x 4 K splits) and does no math: what the memory system gives this grid.

    python scripts/moe_decode_probe.py

Medians of CUDA-graph replays with programmatic dependent launch, microseconds a layer.
"""
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_moe import distinct_logits, prepared_layers  # noqa: E402

from gptoss.kernels import pdl  # noqa: E402
from gptoss.kernels.moe_gemm import moe_down, moe_gate_up  # noqa: E402
from gptoss.kernels.moe_routing import RoutingOptions, moe_routing  # noqa: E402
from gptoss.moe.base import MoESpec  # noqa: E402
from gptoss.moe.triton_backends import fragments_config  # noqa: E402


@triton.jit
def _load_only(w_ptr, tile_expert_ptr, out_ptr, stride_we, stride_wn, row_bytes, per_split,
               R: tl.constexpr, C: tl.constexpr):
    e = tl.load(tile_expert_ptr + tl.program_id(0))
    if e < 0:
        return
    rows = tl.program_id(1) * R + tl.arange(0, R)
    c = tl.arange(0, C)
    base = w_ptr + e.to(tl.int64) * stride_we + rows[:, None].to(tl.int64) * stride_wn
    lo = tl.program_id(2) * per_split
    hi = tl.minimum(lo + per_split, row_bytes)
    acc = tl.zeros((R, C), tl.int32)
    for k in tl.range(lo, hi, C, num_stages=3):
        acc ^= tl.load(base + k + c[None, :], mask=(k + c < hi)[None, :], other=0).to(tl.int32)
    tl.store(out_ptr + tl.program_id(1), tl.sum(tl.sum(acc, 1), 0))  # keeps the loads alive


def main():
    spec = MoESpec(32, 4, 2880, 2880)
    cfg = fragments_config(1, spec)
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = prepared_layers(spec, g, 4)
    x = torch.randn(1, 2880, generator=g, device="cuda").bfloat16()
    r = moe_routing(distinct_logits(1, 32, g, "cuda"), 4, 0, 32, RoutingOptions(block_m=cfg.block_m))
    out = torch.zeros(1, 2880, device="cuda")
    ws = torch.zeros(1 << 22, device="cuda")
    a, _ = moe_gate_up(x, r, layers[0][0], layers[0][2], "bf16", 1.702, 7.0, cfg.gate_up, None, ws, out)

    def up(ls):
        return lambda: [moe_gate_up(x, r, l[0], l[2], "bf16", 1.702, 7.0, cfg.gate_up, None, ws, out) for l in ls]

    def down(ls):
        return lambda: [moe_down(a, None, r, l[1], l[3], "bf16", cfg.down, 0, 32, True, torch.float32, out)
                        for l in ls]

    sink = torch.zeros(4096, dtype=torch.int32, device="cuda")

    def load_only(ls):
        def f():
            for l in ls:
                d = l[0].data  # [E, N/4, 2Kp] bytes: 16 stored rows = 64 weight rows
                split = cfg.gate_up.split_k
                per = triton.cdiv(triton.cdiv(d.shape[2], 256), split) * 256
                _load_only[(r.max_tiles, d.shape[1] // 16, split)](
                    d, r.tile_expert, sink, d.stride(0), d.stride(1), d.shape[2], per, R=16, C=256, num_warps=4)
        return f

    def t(fn):
        with pdl.enabled(True):
            return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3 / 4

    mb_up = 4 * (5760 * 2880 // 2 + 5760 * 2880 // 32) / 1e6
    mb_dn = 4 * (2880 * 2880 // 2 + 2880 * 2880 // 32) / 1e6
    rows = [("gate_up", "cold", t(up(layers)), mb_up), ("gate_up", "hot (L2)", t(up([layers[0]] * 4)), mb_up),
            ("gate_up bytes", "load-only, same grid", t(load_only(layers)), mb_up),
            ("down", "cold", t(down(layers)), mb_dn), ("down", "hot (L2)", t(down([layers[0]] * 4)), mb_dn)]
    print(f"{torch.cuda.get_device_name()}, one token, gate_up {cfg.gate_up}, down {cfg.down}")
    print("| GEMM | weights | us | TB/s |")
    print("|---|---|---|---|")
    for name, how, us, mb in rows:
        print(f"| {name} | {how} | {us:.2f} | {mb / us:.2f} |")


if __name__ == "__main__":
    main()
