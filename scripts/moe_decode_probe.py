"""Is the one-token MoE bound by DRAM or by the SMs? Times the one-token gate_up and down GEMMs of
the 20b layer, moe_gemm's ("fragments" tiles of fragments_config) and moe_token's (its default
options), on an H100:

- cold: 4 layers with their own weights per timed graph, as in the model (no layer finds its
  weights in L2);
- hot: one layer's weights 4 times over, so they come from L2 (gate_up's 35 MB and down's 18 MB of
  four experts fit an H100's 50 MB);
- load-only: moe_gemm's grid streaming gate_up's bytes with no math; with --token-load-only,
  moe_token's kernels with the MMA asm swapped for XORs of the same loads (the swap has to happen
  before the kernels compile, so it is a run of its own);
- flat: the four experts' weight bytes (no scales) streamed in 512-byte runs a warp, 132 programs of
  8 warps an expert: what the bytes alone take (H100: gate_up 12.5-12.6 us, down 6.6-6.9 us,
  2.4-2.65 TB/s).

    python scripts/moe_decode_probe.py
    python scripts/moe_decode_probe.py --token-load-only
    python scripts/moe_decode_probe.py --sweep        # moe_token's options, cold
    ncu --set full -k regex:_gate_up_kernel --launch-skip 2 --launch-count 1 -o up \
        python scripts/moe_decode_probe.py --ncu      # Nsight Compute on one token kernel (or _down_kernel)

Medians of CUDA-graph replays with programmatic dependent launch, microseconds a layer.
"""
import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_moe import distinct_logits, prepared_layers  # noqa: E402

from gptoss.kernels import moe_token as TK  # noqa: E402
from gptoss.kernels import pdl  # noqa: E402
from gptoss.kernels.pdl import pdl_enter  # noqa: E402
from gptoss.kernels.moe_gemm import moe_down, moe_gate_up  # noqa: E402
from gptoss.kernels.moe_routing import RoutingOptions, inline_routing, moe_routing  # noqa: E402
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


@triton.jit
def _flat(w_ptr, ids_ptr, sink, stride_we, words_per_prog, n_words, PPE: tl.constexpr, NW: tl.constexpr,
          PDL: tl.constexpr):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    e = tl.load(ids_ptr + pid // PPE).to(tl.int64)
    base = w_ptr.to(tl.pointer_type(tl.int32)) + e * stride_we
    lo = (pid % PPE) * words_per_prog
    hi = tl.minimum(lo + words_per_prog, n_words)
    r = tl.arange(0, NW * 32)
    q = tl.arange(0, 4)
    acc = tl.zeros((NW * 32, 4), tl.int32)
    for k in range(lo, hi, NW * 128):
        offs = k + 4 * r[:, None] + q[None, :]
        acc ^= tl.load(base + offs, mask=offs < hi, other=0)
    tl.store(sink + pid, tl.sum(tl.sum(acc, 1), 0))  # keeps the loads alive


# --token-load-only: the loads, XORed together into one sum register, and nothing else
_LOAD_ONLY_ASM = """{
.reg .b32 t0;
xor.b32 t0, $4, $5; xor.b32 t0, t0, $6; xor.b32 t0, t0, $7; xor.b32 t0, t0, $8; xor.b32 t0, t0, $12;
xor.b32 t0, t0, $16; and.b32 t0, t0, 1;
add.f32 $0, $20, t0; mov.b32 $1, $21; mov.b32 $2, $22; mov.b32 $3, $23;
}"""

# --sweep: TokenOptions(num_warps, row_groups, split_k, prefetch, k_warps[, x_ahead])
SWEEP_UP = [(8, 1, 1, 4, 2, True), (8, 1, 1, 3, 2, True), (8, 1, 1, 2, 2, True), (8, 1, 1, 4, 2), (8, 1, 1, 2, 2),
            (8, 1, 1, 1, 2), (4, 1, 1, 4, 2, True), (8, 2, 1, 4, 2, True), (8, 1, 1, 4, 4, True), (4, 1, 1, 2, 1),
            (4, 2, 1, 1, 2)]
SWEEP_DOWN = [(4, 1, 2, 1, 4), (4, 1, 2, 2, 4, True), (4, 1, 2, 3, 4, True), (4, 1, 2, 2, 4),
              (4, 1, 1, 2, 4), (4, 1, 3, 1, 4), (4, 1, 2, 1, 2), (4, 1, 2, 2, 2), (4, 1, 1, 1, 4), (4, 2, 2, 2, 4, True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--token-load-only", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--down-only", action="store_true", help="--sweep: the down options alone")
    ap.add_argument("--ncu", action="store_true", help="only run the token kernels 3 times, eagerly, for a "
                    "profiler to pick one launch (ncu flushes the caches before each: cold weights)")
    args = ap.parse_args()
    if args.token_load_only:
        TK._MMA_ASM = TK._MMA_ASM_XC = tl.constexpr(_LOAD_ONLY_ASM)  # XC: down's `a` in the chunk order
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
            return statistics.median(do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3 / 4
                                     for _ in range(5))

    ri = inline_routing(distinct_logits(1, 32, g, "cuda"), 4, 0, 32)
    xc = TK.chunk_order(x).contiguous()  # as the model's norm + router kernel writes it
    a_tok = TK.token_gate_up(xc, ri, layers[0][0], layers[0][2], 1.702, 7.0, zero=out, x_chunk_order=True)
    if args.ncu:  # --launch-skip 2: past moe_gemm's gate_up (also "_gate_up_kernel") and a_tok's; down's third
        for _ in range(3):
            TK.token_down(TK.token_gate_up(xc, ri, layers[0][0], layers[0][2], 1.702, 7.0, zero=out,
                                           x_chunk_order=True), ri, layers[0][1], layers[0][3], out)
        torch.cuda.synchronize()
        return

    def tup(ls, o=None):
        return lambda: [TK.token_gate_up(xc, ri, l[0], l[2], 1.702, 7.0, o, zero=out, x_chunk_order=True) for l in ls]

    def tdown(ls, o=None):
        return lambda: [TK.token_down(a_tok, ri, l[1], l[3], out, o) for l in ls]

    mb_up = 4 * (5760 * 2880 // 2 + 5760 * 2880 // 32) / 1e6
    mb_dn = 4 * (2880 * 2880 // 2 + 2880 * 2880 // 32) / 1e6
    hot = [layers[0]] * 4

    def flat(i):  # the weight bytes alone, streamed
        def f():
            for l in layers:
                d = l[i].data
                n = d[0].numel() // 4
                per = triton.cdiv(triton.cdiv(n, 132), 1024) * 1024
                _flat[(4 * 132,)](d, ri.topk_ids, sink, d.stride(0) // 4, per, n, PPE=132, NW=8, num_warps=8,
                                  **pdl.args())
        return f

    if args.sweep:
        rows = [(f"moe_token gate_up {TK.TokenOptions(*o)}", "cold", t(tup(layers, TK.TokenOptions(*o))), mb_up)
                for o in SWEEP_UP] if not args.down_only else []
        rows += [(f"moe_token down {TK.TokenOptions(*o)}", "cold", t(tdown(layers, TK.TokenOptions(*o))), mb_dn)
                 for o in SWEEP_DOWN]
    elif args.token_load_only:
        rows = [("moe_token gate_up", "load-only, cold", t(tup(layers)), mb_up),
                ("moe_token gate_up", "load-only, hot (L2)", t(tup(hot)), mb_up),
                ("moe_token down", "load-only, cold", t(tdown(layers)), mb_dn),
                ("moe_token down", "load-only, hot (L2)", t(tdown(hot)), mb_dn)]
    else:
        rows = [("moe_gemm gate_up", "cold", t(up(layers)), mb_up), ("moe_gemm gate_up", "hot (L2)", t(up(hot)), mb_up),
                ("moe_gemm gate_up bytes", "load-only, same grid", t(load_only(layers)), mb_up),
                ("moe_gemm down", "cold", t(down(layers)), mb_dn), ("moe_gemm down", "hot (L2)", t(down(hot)), mb_dn),
                ("moe_token gate_up", "cold", t(tup(layers)), mb_up),
                ("moe_token gate_up", "hot (L2)", t(tup(hot)), mb_up),
                ("moe_token down", "cold", t(tdown(layers)), mb_dn), ("moe_token down", "hot (L2)", t(tdown(hot)), mb_dn),
                ("gate_up weight bytes (no scales)", "flat stream, cold", t(flat(0)), mb_up * 16 / 17),
                ("down weight bytes (no scales)", "flat stream, cold", t(flat(1)), mb_dn * 16 / 17)]
    print(f"{torch.cuda.get_device_name()}, one token; moe_gemm gate_up {cfg.gate_up}, down {cfg.down}; "
          f"moe_token gate_up {TK.GATE_UP_OPTIONS}, down {TK.DOWN_OPTIONS}")
    print("| GEMM | weights | us | TB/s |")
    print("|---|---|---|---|")
    for name, how, us, mb in rows:
        print(f"| {name} | {how} | {us:.2f} | {mb / us:.2f} |")


if __name__ == "__main__":
    main()
