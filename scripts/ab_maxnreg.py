"""The "fragments" MoE GEMMs at decode shapes (20b layer, H100 tiles of fragments_config) under register
caps (`GemmOptions(maxnreg=...)`): microseconds per layer, 4 layers with their own weights per timed
graph, and each down result against the uncapped one.

    python scripts/ab_maxnreg.py
"""
import sys, dataclasses, torch
sys.path.insert(0, "benchmarks")
from bench_moe import prepared_layers, distinct_logits, bench  # noqa
from gptoss.moe.base import MoESpec
from gptoss.moe.triton_backends import fragments_config
from gptoss.kernels.moe_gemm import moe_gate_up, moe_down
from gptoss.kernels.moe_routing import moe_routing, RoutingOptions
spec = MoESpec(num_experts=32, top_k=4, hidden_size=2880, intermediate_size=2880)
g = torch.Generator(device="cuda").manual_seed(0)
ws = prepared_layers(spec, g, 4)
print("| T | gemm | maxnreg | us | vs twin max err |")
for T in (1, 2, 4, 8):
    cfg = fragments_config(T, spec)
    x = torch.randn(T, 2880, device="cuda", generator=g).bfloat16()
    r = moe_routing(distinct_logits(T, 32, g, "cuda"), 4, 0, 32, RoutingOptions(block_m=cfg.block_m))
    a, _ = moe_gate_up(x, r, ws[0][0], ws[0][2], "bf16", 1.702, 7.0, cfg.gate_up)
    ref = moe_down(a, None, r, ws[0][1], ws[0][3], "bf16", cfg.down, 0, 32, True, torch.float32)
    for mr in (0, 64, 72, 80):
        o = dataclasses.replace(cfg.down, maxnreg=mr)
        y = moe_down(a, None, r, ws[0][1], ws[0][3], "bf16", o, 0, 32, True, torch.float32)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        us = bench(lambda: [moe_down(a, None, r, w2, b2, "bf16", o, 0, 32, True, torch.float32) for _, w2, _, b2 in ws], 4)
        print(f"| {T} | down {o.block_n}x{o.block_k} split{o.split_k} | {mr} | {us:.1f} | {err:.1e} |", flush=True)
    for mr in (0, 48):
        o = dataclasses.replace(cfg.gate_up, maxnreg=mr)
        us = bench(lambda: [moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o) for w1, _, b1, _ in ws], 4)
        print(f"| {T} | gate_up split{o.split_k} | {mr} | {us:.1f} | - |", flush=True)
