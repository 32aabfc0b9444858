"""One gpt-oss MoE layer per backend: time, weight bytes read, TB/s (and % of the copy bandwidth
measured here), TFLOP/s.

    python benchmarks/bench_moe.py                       # gpt-oss-20b layer: 32 experts, top-4, 2880
    python benchmarks/bench_moe.py --experts 128 --tokens 1,64
    python benchmarks/bench_moe.py --sweep               # tile candidates of the "triton" GEMMs

Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph, no host launch cost,
as the engine runs decode). Each timed call runs `--layers` layers with their own weights so no
layer finds its weights in L2 from the previous call (an H100's L2 is 50 MB; a decode step of one
layer reads 53 MB), as in a model. Weight bytes: the MXFP4 codes, scales and biases of the experts
the tokens actually hit. TFLOP/s counts the useful 2 * tokens * top_k * (2I*H + I*H).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gptoss.kernels.moe_gemm import GemmOptions, moe_down, moe_gate_up  # noqa: E402
from gptoss.kernels.moe_routing import RoutingOptions, moe_routing  # noqa: E402
from gptoss.moe import get_moe_backend  # noqa: E402
from gptoss.moe.base import MoESpec, MoEWeights  # noqa: E402
from gptoss.moe.triton_backends import MoEKernelConfig  # noqa: E402


def random_weights(spec: MoESpec, gen: torch.Generator, device="cuda") -> MoEWeights:
    E, I2, H = spec.local_experts, 2 * spec.intermediate_size, spec.hidden_size

    def mx(n, k):
        blocks = torch.randint(0, 256, (E, n, k // 32, 16), generator=gen, device=device, dtype=torch.uint8)
        scales = torch.randint(117, 121, (E, n, k // 32), generator=gen, device=device).to(torch.uint8)
        return blocks, scales

    b1, s1 = mx(I2, H)
    b2, s2 = mx(H, I2 // 2)
    return MoEWeights(b1, s1, (0.1 * torch.randn(E, I2, generator=gen, device=device)).bfloat16(),
                      b2, s2, (0.1 * torch.randn(E, H, generator=gen, device=device)).bfloat16())


def prepared_layers(spec: MoESpec, gen: torch.Generator, n: int, device="cuda", encoding="bf16x2",
                    fragments=True) -> list:
    """n layers of random experts as the GEMMs take them: (gate_up weight, down weight, gate_up bias,
    down bias), the weights prepared once (default: the "triton" backend's fragments layout)."""
    from gptoss.kernels.moe_weights import prepare_mxfp4_weight
    layers = []
    for _ in range(n):
        w = random_weights(spec, gen, device)
        layers.append((prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, encoding, fragments),
                       prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, encoding, fragments),
                       w.gate_up_bias.float(), w.down_bias.float()))
    return layers


def distinct_logits(T: int, E: int, gen: torch.Generator, device="cuda") -> torch.Tensor:
    ranks = torch.argsort(torch.rand(T, E, generator=gen, device=device), dim=1).float()
    return ((ranks - E / 2) * (4.0 / E) + 0.5 * torch.randn(T, 1, generator=gen, device=device)).bfloat16()


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy, bytes read + written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=200, return_mode="median")
    return 2 * n / ms / 1e9


def expert_bytes(spec: MoESpec) -> int:
    H, I = spec.hidden_size, spec.intermediate_size
    gate_up = 2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 4
    down = H * I // 2 + H * I // 32 + H * 4
    return gate_up + down


def bench(fn, layers: int) -> float:
    """Median microseconds per layer."""
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3 / layers


def row(gpu, T, name, us, nbytes, flops, copy_tbs, err):
    tbs = nbytes / us / 1e6
    return (f"| {gpu} | {T} | {name} | {us:.1f} | {nbytes / 1e6:.1f} MB | {tbs:.2f} | "
            f"{100 * tbs / copy_tbs:.0f}% | {flops / us / 1e6:.1f} | {err[0]:.1e} / {err[1]:.1e} |")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """max and RMS of out - ref, normalised by max|ref|."""
    d = out.float() - ref.float()
    m = ref.float().abs().max().clamp(min=1e-30)
    return (d.abs().max() / m).item(), (d.pow(2).mean().sqrt() / m).item()


def run_backends(args, spec, copy_tbs, gpu, best=None):
    """The table. best (from sweep): {tokens: {upcast: (config, us)}} runs "triton" with those configs,
    one row per upcast; else each backend's default_config."""
    gen = torch.Generator(device=args.device).manual_seed(0)
    weights = [random_weights(spec, gen, args.device) for _ in range(args.layers)]
    print("| GPU | tokens | backend | time us | weight bytes | TB/s | % copy BW | TFLOP/s | "
          "err vs torch (max / RMS) |")
    print("|---|---|---|---|---|---|---|---|---|")
    flop_per_token = 2 * spec.top_k * 3 * spec.intermediate_size * spec.hidden_size
    for T in args.tokens:
        x = torch.randn(T, spec.hidden_size, generator=gen, device=args.device).bfloat16()
        lg = distinct_logits(T, spec.num_experts, gen, args.device)
        active = torch.unique(torch.topk(lg.float(), spec.top_k, dim=-1).indices).numel()
        nbytes = active * expert_bytes(spec)
        ref = get_moe_backend("torch", args.device, None)(weights[0], spec, torch.bfloat16).forward(x, lg)
        runs = []
        for name in args.backends:
            if name == "triton" and best and T in best:
                runs += [(f"triton ({u})", name, dict(config=cfg, upcast=u)) for u, (cfg, _) in best[T].items()]
            else:
                runs.append((name, name, {}))
        for label, name, kw in runs:
            cls = get_moe_backend(name, args.device, None)
            layers = [cls(w, spec, torch.bfloat16, layout_block_k=args.layout_block_k, **kw) for w in weights]
            us = _time(args, lambda: [m.forward(x, lg) for m in layers], len(layers))
            err = rel_err(layers[0].forward(x, lg), ref)
            del layers
            if us is not None:
                print(row(gpu, T, label, us, nbytes, flop_per_token * T, copy_tbs, err), flush=True)
        torch.cuda.empty_cache() if args.device == "cuda" else None


# tile candidates per regime (rows per expert): block_m, gate_up options, down options.
# GemmOptions(block_n, block_k, num_warps, num_stages, swap_ab, split_k, prefetch)
_G = GemmOptions
_ASM = {"dec": ([16],
                [_G(64, 128, 4, 3), _G(64, 128, 4, 4), _G(32, 128, 4, 3), _G(64, 128, 8, 3), _G(64, 64, 4, 3),
                 _G(128, 128, 4, 3), _G(128, 64, 4, 4),
                 # split-K gate_up (then a bias + SwiGLU kernel): more programs for 1-16 rows per expert
                 _G(64, 128, 4, 3, split_k=2), _G(64, 128, 4, 3, split_k=4), _G(32, 128, 4, 3, split_k=4)],
                [_G(64, 128, 4, 1, split_k=2, prefetch=2), _G(64, 128, 4, 3, split_k=2),
                 _G(32, 128, 4, 3, split_k=2), _G(64, 128, 4, 3, split_k=4), _G(64, 64, 4, 3, split_k=2),
                 _G(128, 128, 4, 3), _G(128, 64, 4, 4, split_k=2)]),
        # batch 64-768 decode (8-96 rows per expert); the first pair is default_config's
        "mid": ([64, 32], [_G(256, 64, 8, 3), _G(128, 64, 4, 4), _G(128, 128, 4, 3), _G(64, 128, 4, 3),
                           _G(128, 64, 8, 4), _G(128, 64, 4, 4, split_k=2)],
                [_G(128, 64, 8, 3), _G(128, 64, 4, 4), _G(64, 128, 4, 3), _G(128, 128, 4, 3),
                 _G(128, 64, 4, 4, split_k=2)]),
        # prefill (TTFT at 2k tokens: 256 rows per expert); the first pair is default_config's
        "pre": ([128, 64], [_G(128, 64, 8, 3), _G(128, 64, 8, 4), _G(128, 128, 8, 3), _G(256, 64, 8, 3)],
                [_G(128, 64, 8, 3), _G(128, 64, 4, 4), _G(128, 128, 8, 3), _G(64, 64, 4, 4)])}
# the "fragments" weight layout (weights as the MMA's A operand from registers, so always swap_ab;
# block_m is the MMA's N)
_FRAG = {"dec": ([16], [_G(64, 128, 4, 3, True), _G(64, 128, 4, 4, True), _G(128, 128, 4, 3, True),
                        _G(64, 64, 4, 4, True), _G(64, 128, 4, 3, True, 2), _G(64, 128, 4, 3, True, 4),
                        _G(128, 128, 8, 3, True), _G(64, 256, 4, 2, True),
                        # more, smaller programs for one token (none won; 32-row tiles, which Triton runs
                        # on mma.sync, were 2-4x slower and are left out)
                        _G(64, 128, 4, 3, True, 8), _G(64, 64, 4, 4, True, 4), _G(64, 128, 4, 4, True, 4)],
                 [_G(64, 128, 4, 3, True, 2), _G(64, 128, 4, 3, True, 4), _G(128, 128, 4, 3, True, 2),
                  _G(64, 64, 4, 4, True, 2), _G(64, 128, 4, 3, True), _G(64, 256, 4, 2, True, 2),
                  _G(64, 128, 4, 3, True, 8), _G(64, 64, 4, 4, True, 4)]),
         "mid": ([64, 32], [_G(128, 64, 4, 4, True), _G(128, 128, 4, 3, True), _G(256, 64, 8, 3, True),
                            _G(64, 128, 4, 3, True), _G(128, 128, 8, 3, True), _G(128, 128, 4, 1, True, 1, 2)],
                 [_G(128, 64, 4, 4, True), _G(128, 128, 4, 3, True), _G(64, 128, 4, 3, True),
                  _G(128, 128, 4, 3, True, 2)]),
         "pre": ([128, 64], [_G(128, 64, 8, 3, True), _G(128, 128, 8, 3, True), _G(256, 64, 8, 3, True),
                             _G(128, 64, 4, 4, True), _G(256, 128, 8, 2, True)],
                 [_G(128, 64, 8, 3, True), _G(128, 64, 4, 4, True), _G(128, 128, 8, 3, True),
                  _G(256, 64, 8, 3, True)])}
# the checkpoint-code path (tl.dot_scaled), its best tiles of earlier sweeps
_DOT_SCALED = {"dec": ([16], [_G(128, 128, 4, 4, True)], [_G(128, 128, 4, 4, True, 2)]),
               "mid": ([64], [_G(128, 64, 4, 4)], [_G(128, 64, 4, 4)]),
               "pre": ([128], [_G(128, 64, 8, 3)], [_G(128, 64, 4, 4)])}


def _regime(rows: float) -> str:
    return "dec" if rows <= 16 else "mid" if rows <= 96 else "pre"


def sweep(args, spec, copy_tbs, gpu) -> dict:
    """Times the gate_up and down GEMMs of "triton" alone over tile candidates, per token count and
    weight encoding; returns {tokens: {upcast: (MoEKernelConfig, us)}} with the fastest pair."""
    from gptoss.kernels.moe_weights import prepare_mxfp4_weight
    gen = torch.Generator(device=args.device).manual_seed(0)
    weights = [random_weights(spec, gen, args.device) for _ in range(args.layers)]
    H, I, k, E = spec.hidden_size, spec.intermediate_size, spec.top_k, spec.local_experts
    encs = {"asm": ("bf16x2", False), "dot_scaled": ("e2m1", False), "fragments": ("bf16x2", True)}
    best: dict = {}
    print("| GPU | tokens | upcast | gemm | block_m | options | time us | TB/s | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for upcast in args.upcasts:
        ws = [(prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, *encs[upcast]),
               prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, *encs[upcast]),
               w.gate_up_bias.float(), w.down_bias.float()) for w in weights]
        for T in args.tokens:
            x = torch.randn(T, H, generator=gen, device=args.device).bfloat16()
            lg = distinct_logits(T, spec.num_experts, gen, args.device)
            active = torch.unique(torch.topk(lg.float(), k, dim=-1).indices).numel()
            bytes_up = active * (2 * I * H // 2 + 2 * I * H // 32)
            bytes_dn = active * (H * I // 2 + H * I // 32)
            fl_up, fl_dn = 2 * T * k * 2 * I * H, 2 * T * k * I * H
            reg = _regime(T * k / E)
            cands = [{"asm": _ASM, "dot_scaled": _DOT_SCALED, "fragments": _FRAG}[upcast][reg]]
            for bm, ups, dns in [(bm, ups, dns) for bms, ups, dns in cands for bm in bms]:
                r = moe_routing(lg, k, 0, E, RoutingOptions(block_m=bm))
                up_best = dn_best = None
                for o in ups:
                    us = _time(args, lambda: [moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o)
                                              for w1, _, b1, _ in ws], len(ws))
                    _line(gpu, T, upcast, "gate_up", bm, o, us, bytes_up, fl_up)
                    if us is not None and (up_best is None or us < up_best[0]):
                        up_best = (us, o)
                a, _ = moe_gate_up(x, r, ws[0][0], ws[0][2], "bf16", 1.702, 7.0, up_best[1] if up_best else ups[0])
                for o in dns:
                    for fused in ((True,) if o.split_k > 1 else (False, True)):
                        us = _time(args, lambda: [moe_down(a, None, r, w2, b2, "bf16", o, 0, E, fused,
                                                           torch.bfloat16) for _, w2, _, b2 in ws], len(ws))
                        _line(gpu, T, upcast, "down+combine" + (" (atomics)" if fused else ""), bm, o, us,
                              bytes_dn, fl_dn)
                        if us is not None and (dn_best is None or us < dn_best[0]):
                            dn_best = (us, o, fused)
                if up_best and dn_best:
                    cfg = MoEKernelConfig(block_m=bm, gate_up=up_best[1], down=dn_best[1],
                                          fused_combine=dn_best[2])
                    tot = up_best[0] + dn_best[0]
                    if T not in best or upcast not in best[T] or tot < best[T][upcast][1]:
                        best.setdefault(T, {})[upcast] = (cfg, tot)
            us = _time(args, lambda: moe_routing(lg, k, 0, E, RoutingOptions(block_m=16)), 1)
            print(f"| {gpu} | {T} | - | routing | 16 | - | {us:.1f} | - | - |" if us else "", flush=True)
        del ws
        torch.cuda.empty_cache() if args.device == "cuda" else None
    print("\nfastest per token count (gate_up + down, kernels alone):")
    for T, d in best.items():
        for upcast, (cfg, tot) in d.items():
            print(f"  tokens {T} upcast {upcast}: {tot:.1f} us  {cfg}")
    return best


def _time(args, fn, layers):
    try:
        if args.dry:
            fn()
            return 1.0
        return bench(fn, layers)
    except Exception as e:  # a candidate that does not compile is reported, not fatal
        print(f"| failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
        return None


def _line(gpu, T, upcast, gemm, bm, o, us, nbytes, flops):
    if us is None:
        return
    opt = f"n{o.block_n} k{o.block_k} w{o.num_warps} s{o.num_stages}" + (" swap" if o.swap_ab else "") + \
        (f" split{o.split_k}" if o.split_k > 1 else "") + (f" pf{o.prefetch}" if o.prefetch else "")
    print(f"| {gpu} | {T} | {upcast} | {gemm} | {bm} | {opt} | {us:.1f} | {nbytes / us / 1e6:.2f} | "
          f"{flops / us / 1e6:.1f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,64,512,4096")
    p.add_argument("--backends", default="triton,triton_fp8,triton_mxfp8")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--intermediate", type=int, default=2880)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=4, help="layers per timed call (distinct weights)")
    p.add_argument("--layout-block-k", type=int, default=0, help="re-lay weights k-blocked (0: checkpoint rows)")
    p.add_argument("--sweep", action="store_true",
                   help="time tile candidates of the bf16 GEMMs, then the table with the fastest")
    p.add_argument("--upcasts", default="asm,dot_scaled",
                   help="the sweep's weight paths for \"triton\": asm, dot_scaled, fragments (asm + the fragments layout)")
    p.add_argument("--dry", action="store_true", help="run each call once untimed (checks the script; CPU "
                   "with TRITON_INTERPRET=1 and tiny shapes)")
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.backends = [b for b in args.backends.split(",") if b]
    args.upcasts = [u for u in args.upcasts.split(",") if u]
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = MoESpec(args.experts, args.top_k, args.hidden, args.intermediate)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    copy_tbs = copy_bandwidth() if not args.dry else 1.0
    print(f"{gpu}: copy bandwidth {copy_tbs:.2f} TB/s (1 GiB device copy, read + write); torch "
          f"{torch.__version__}, triton {triton.__version__}; {args.experts} experts, top-{args.top_k}, "
          f"hidden {args.hidden}, intermediate {args.intermediate}; {args.layers} layers per timed call")
    best = sweep(args, spec, copy_tbs, gpu) if args.sweep else None
    print()
    run_backends(args, spec, copy_tbs, gpu, best)


if __name__ == "__main__":
    main()
