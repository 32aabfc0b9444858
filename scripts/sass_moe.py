"""Compile the MoE GEMM kernels for sm_90 on this machine (no GPU needed) and count the SASS
instructions of their K loop: how many instructions a thread spends per weight, by opcode.

    python scripts/sass_moe.py                     # gate_up and down, the one-token fragments tiles
    python scripts/sass_moe.py --block-k 64 --split 1 --upcast-mode 1

Uses Triton's ASTSource compiled for GPUTarget("cuda", 90, 32), then the ptxas / cuobjdump that ship
with Triton (the PTX version lowered to what that ptxas reads, where it is newer)."""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gptoss.kernels import moe_gemm as G

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {"x_ptr": "*bf16", "a_ptr": "*bf16", "a_amax_ptr": "*fp32", "x_amax_ptr": "*fp32", "h_ptr": "*fp32",
       "count_ptr": "*i32", "zero_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*u8", "wsh_ptr": "*u8",
       "wrs_ptr": "*fp32", "b_ptr": "*fp32", "sorted_ptr": "*i32", "offsets_ptr": "*i32",
       "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", "out_ptr": "*fp32", "topk_w_ptr": "*fp32",
       "logits_ptr": "*bf16", "ids_ptr": "*i32"}
DIV16 = {"stride_xt", "K", "N", "k_per_split", "stride_we", "stride_wn", "stride_wkb", "stride_se", "stride_sn",
         "stride_skb", "n_tiles_n"}


def compile_sm90(fn, consts: dict, num_warps: int, num_stages: int, maxnreg: int = 0):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name], attrs[(i,)] = PTR[name], [["tt.divisibility", 16]]
        elif name in ("alpha", "limit"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)


def sass(kernel) -> tuple[str, str]:
    """(ptxas -v report, SASS text)."""
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        text = kernel.asm["ptx"]
        for _ in range(2):  # a newer Triton writes a PTX version this ptxas may not read: pin its own
            with open(ptx, "w") as f:
                f.write(text)
            run = subprocess.run([f"{BIN}/ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True,
                                 text=True)
            newest = re.search(r"current version is '(\d+\.\d+)'", run.stderr)
            if run.returncode == 0 or not newest:
                break
            text = re.sub(r"\.version \d+\.\d+", f".version {newest.group(1)}", text)
        if run.returncode:
            raise RuntimeError(f"ptxas failed: {run.stderr}")
        rep = run.stderr
        return rep, subprocess.run([f"{BIN}/cuobjdump", "-sass", cubin], check=True, capture_output=True,
                                   text=True).stdout


def loop_histogram(text: str) -> collections.Counter:
    """Opcodes of the longest backward-branch loop (the K loop)."""
    lines = [l for l in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", l).group(1), 16) for l in lines]
    body = []
    for i, l in enumerate(lines):
        m = re.search(r"BRA 0x([0-9a-f]+)", l)
        if m and int(m.group(1), 16) < addr[i] and int(m.group(1), 16) in addr:
            j = addr.index(int(m.group(1), 16))
            body = lines[j:i + 1] if i + 1 - j > len(body) else body
    ops = (re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", l) for l in body)
    return collections.Counter(m.group(1) for m in ops if m)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--split", type=int, default=4)
    ap.add_argument("--upcast-mode", type=int, default=2, help="1: two multiplies a pair, 2: one")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    a = ap.parse_args()
    common = dict(TOP_K=4, BLOCK_M=a.block_m, BLOCK_N=a.block_n, BLOCK_K=a.block_k, ACT=0, SWAP=True, EVEN_K=False,
                  MASK_W=False, DEQ_ASM=a.upcast_mode, PREFETCH=0, INTERPRET=False, FRAG=True, PDL=True,
                  INLINE=False)
    kernels = {"gate_up": (G._gate_up_kernel, dict(common, SPLIT_K=a.split, ZERO=True, E_PAD=32, K_PAD=4)),
               "down": (G._down_kernel, dict(common, HAS_BIAS=True, FUSED_COMBINE=True, NA_PAD=2))}
    per_thread = a.block_n * a.block_k // (32 * a.warps)  # weights a thread upcasts each K step
    for name, (fn, consts) in kernels.items():
        rep, text = sass(compile_sm90(fn, consts, a.warps, a.stages))
        regs = re.search(r"Used (\d+) registers", rep).group(1)
        h = loop_histogram(text)
        total = sum(h.values())
        top = ", ".join(f"{k} {v}" for k, v in h.most_common(12))
        serial = "; wgmma SERIALIZED (C7515)" if "C7515" in rep else ""
        print(f"{name}: {regs} registers{serial}; K loop {total} instructions a thread for {per_thread} weights "
              f"({total / per_thread:.2f} a weight): {top}")


if __name__ == "__main__":
    main()
