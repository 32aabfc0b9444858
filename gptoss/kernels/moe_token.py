"""The MoE GEMMs of one token (batch-1 decode) on mma.sync: warps stream whole 16-row groups of an
expert's "fragments" weights (gptoss.kernels.moe_weights) over K, with no shared memory on the way, no
64 x 16 tiles of which one column is real, and no split-K workspace in gate_up.

    a = token_gate_up(x, routing, w1, b1, alpha, limit, zero=out)    # [k, I'] row j: the j-th expert
    token_down(a, routing, w2, b2, out)                              # out [1, H] float32 +=

`a` is in the chunk order (`chunk_order`, I' = I rounded up to 64; `natural_order(a, I)` undoes it):
down reads a lane's eight x words of a chunk as two 16-byte loads, where eight 4-byte loads let
ptxas reuse two registers and wait on two L2 trips a chunk in turn (Nsight Compute: 27% of down's
stall samples on the second). H100: down 8.3 against 8.7 us with its weights in L2, the same cold
(10.0); the batch-1 step 1.927 / 1.945 against 1.963 / 1.967 ms (two A/B calls). gate_up takes its
x so too (`x_chunk_order=True`; the model's norm + router kernel writes it): 1.853 vs 1.859 ms.

Under PDL, down ranks the router's logits (written two kernels back) itself and loads its first
weight chunk before its wait, while gate_up still runs (`DOWN_EARLY`): 1.919 vs 1.931 ms.

gate_up keeps four chunks of weights in registers and x's words of the same chunks with them
(`prefetch=4, x_ahead=True`): 17.0 against 20.1 us a layer (H100, moe_decode_probe), where either half
alone gains nothing; in the batch-1 step the change is within run-to-run variation (docs/moe.md).

`routing` is `inline_routing`'s (gate_up finds the token's top-k from the logits, as moe_gemm's does,
and writes topk_ids / topk_weights for down) or `partial_routing`'s: the router folded into the o
projection (gptoss.kernels.router_partials), whose partial sums gate_up and down finish into the
logits and the norm's rstd themselves, x then being u = norm weight * h, which gate_up's row sums
scale by the rstd; no router kernel runs (H100, batch-1 step: 1.676 against 1.725 ms). w1 / w2 are
"fragments" weights whose block scales all fit one multiply (`MXFP4Weight.upcast_mode == 2`: scales
<= 128, true of the random checkpoints and, by their magnitudes, of gpt-oss's). `supported(w)` says whether a backend may call these; the "triton"
backend does at one token (`moe.triton_backends.TOKEN_KERNELS`).

How: a lane's 16 bytes of a 64-deep K chunk are one vector load (the fragments layout puts them
together) holding four k16 steps of its rows g and g + 8; each 4-byte word becomes an A fragment by
moe_gemm's bf16x2 upcast and one mul.bf16x2 by 2^(s-1) a pair, then one m16n8k16 MMA. The B fragment
is x for all 8 columns, so every lane ends holding its two rows' sums (lane l = 4g + t: rows 16G + g
and 16G + g + 8; its B registers in chunk C are x's bf16 pairs 32C + 8q + t and 32C + 8q + 4 + t).
`k_warps` warps of a program share a row group, each taking every k_warps-th chunk, and meet in a
cross-warp sum: more warps an SM keep more loads in flight (the weights come from DRAM once).

Measured (H100, 20b layer, 4 layers a timed graph, `python scripts/moe_decode_probe.py`): gate_up
20.4 us against moe_gemm's 21.4, down 9.9 against 10.5; in the whole batch-1 step 1.963 vs 2.046 ms a
token (`python scripts/ab_decode.py --switch moe.triton_backends.TOKEN_KERNELS --batch 1`). Streaming
the same bytes without the math (`--token-load-only`) takes 16.5 us for gate_up (2.1 TB/s), and the
math with the weights in L2 19-23 us: both the loads in flight and the upcast's integer work bound it
(Nsight Compute, gate_up: 0.6 instructions issued a cycle a scheduler, half the stalls on loads).

Triton lays the asm's [lanes, 4] operands one row a thread (checked on sm_90: the GPU tests in
tests/test_moe_backends.py run the kernels against the twins). The interpreter has no inline asm:
`_mma_chunk_tl` does the same sums in plain Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .moe_gemm import (_UPCAST_PTX, INTERPRETED, _bf16_of, _bf16x2_pairs, _inline_rows, _inline_topk, _ranked_pick,
                       _store_cast, _store_token_topk)
from .moe_routing import Routing
from .moe_weights import MXFP4Weight
from .pdl import pdl_enter
from .router_partials import SLOTS, _finish_logits, width

_SLOTS = tl.constexpr(SLOTS)
# the router's partial sums pay only where one warp's keys rank the experts (_key_topk): ranked on a
# [E, E] tile before every program's first load, the 120b's 128 experts made a batch-1 token on an
# H200 4.431 ms against 2.181 with the router kernel (`scripts/ab_decode.py --ckpt /tmp/gptoss-120b
# --replay --batch 1 --set "kernels.moe_token.PARTIALS_MAX_EXPERTS=128"`; the kernels still take
# partials past it, the tests check them)
PARTIALS_MAX_EXPERTS = 32


@dataclass(frozen=True)
class TokenOptions:
    num_warps: int = 4      # warps a program
    row_groups: int = 1     # 16-row groups a warp streams side by side (they share the x loads)
    split_k: int = 1        # K chunks split over programs (down only: its output takes atomics)
    prefetch: int = 1       # K chunks of weights in registers (0-4): 1 loads the next chunk through a
                            # rotation, 2-4 keep that many buffers, each refilled in place
    k_warps: int = 1        # warps of a program that share a row group's K chunks (divides num_warps)
    x_ahead: bool = False   # prefetch >= 2: x's words ride in the buffers with the weights (else each
                            # chunk loads its x next to its use)


# the fastest of `python scripts/moe_decode_probe.py --sweep` on H100 (20b layer, x in the chunk order):
# gate_up 8 warps, pairs sharing a row group's K, four buffers with x in them (17.0 us; 20.1 with two
# buffers and x loaded at its use, 20.2 with four and x at its use, 19.6 with three and x in them; the
# weights in L2 take as long as cold ones, 20.3 for the two-buffer kernel: the SM's load latency
# bounds it, not DRAM); down 4 warps on one row group's K and 2 programs a row group, one buffer (9.1
# us; 10.1 with two buffers and x in them, 11.8 with three buffers and x at its use)
GATE_UP_OPTIONS = TokenOptions(num_warps=8, prefetch=4, k_warps=2, x_ahead=True)
DOWN_OPTIONS = TokenOptions(num_warps=4, split_k=2, prefetch=1, k_warps=4)
DOWN_EARLY = True  # under PDL, down finds its expert and loads its first weights before the wait


def _mma_asm(xc: bool = False) -> str:
    """Inline PTX of one K chunk of one row group: operands $0-3 the sums out (c0..c3), $4-7 the four
    bf16x2-encoded words (k16 steps q = 0..3), $8 the scale word ($9-11 copies), $12-15 / $16-19 the
    B registers of the four steps (xa's, then xb's; xc: the chunk order's (xa0, xb0, xa1, xb1), then
    (xa2, xb2, xa3, xb3), so that each step's pair sits in adjacent registers of one load), $20-23 the
    sums in. A scale word's bytes are (block 0, row g),
    (block 0, row g + 8), (block 1, row g), (block 1, row g + 8): 2^(s-1) as bf16 is (s + 126) << 7,
    spread to both halves by prmt."""
    lines = [".reg .b32 t0, t1, a0, a1, a2, a3, sg0, sh0, sg1, sh1;"]
    for name, sel in (("sg0", "0x4040"), ("sh0", "0x4141"), ("sg1", "0x4242"), ("sh1", "0x4343")):
        lines += [f"prmt.b32 {name}, $8, 0, {sel};", f"mad.lo.u32 {name}, {name}, 128, 0x3F003F00;"]
    for q in range(4):
        w, sg, sh = f"${4 + q}", f"sg{q // 2}", f"sh{q // 2}"
        acc_in = "{$20, $21, $22, $23}" if q == 0 else "{$0, $1, $2, $3}"
        b0, b1 = (12 + 2 * q, 13 + 2 * q) if xc else (12 + q, 16 + q)
        # moe_gemm's upcast: a0 = codes k0, k1 and a2 = k4, k5 (row g), a1 = k2, k3 and a3 = k6, k7 (row g + 8)
        lines += [_UPCAST_PTX.format(w=w, k01="a0", k45="a2", k23="a1", k67="a3"),
                  f"mul.bf16x2 a0, a0, {sg};", f"mul.bf16x2 a2, a2, {sg};",
                  f"mul.bf16x2 a1, a1, {sh};", f"mul.bf16x2 a3, a3, {sh};",
                  "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {a0, a1, a2, a3}, "
                  f"{{${b0}, ${b1}}}, {acc_in};"]
    return "{\n" + "\n".join(lines) + "\n}"


_MMA_ASM = tl.constexpr(_mma_asm())
_MMA_ASM_XC = tl.constexpr(_mma_asm(True))


@triton.jit
def _mma_chunk_tl(acc, w, sc, xa, xb, NW: tl.constexpr, RG: tl.constexpr):
    """The asm's sums in plain Triton: w [R, RG, 4] words, sc [R, RG] scale words, xa / xb [R, 4] B
    words, acc [R, RG, 4]. Lane (g, t) of step q multiplies row g's codes 2t, 2t+1 (a0) and 2t+8, 2t+9
    (a2) by its B pairs, row g + 8's (a1, a3) likewise; the warp's four lanes t of a g add up."""
    a0, a2, a1, a3 = _bf16x2_pairs(w.to(tl.uint32, bitcast=True))
    sc = sc.to(tl.uint32, bitcast=True)
    xa = xa.to(tl.uint32, bitcast=True)
    xb = xb.to(tl.uint32, bitcast=True)
    # 2^(s - 1): the raw bf16 is code x 2^-126, the weight code x 2^(s - 127) (exact in fp32, as in bf16)
    sg0 = (((sc & 255) + 126) << 23).to(tl.float32, bitcast=True)[:, :, None]
    sh0 = ((((sc >> 8) & 255) + 126) << 23).to(tl.float32, bitcast=True)[:, :, None]
    sg1 = ((((sc >> 16) & 255) + 126) << 23).to(tl.float32, bitcast=True)[:, :, None]
    sh1 = ((((sc >> 24) & 255) + 126) << 23).to(tl.float32, bitcast=True)[:, :, None]
    q = tl.arange(0, 4)[None, None, :]
    sg = tl.where(q < 2, sg0, sg1)
    sh = tl.where(q < 2, sh0, sh1)
    xa3 = xa[:, None, :]
    xb3 = xb[:, None, :]
    pg = ((_bf16_of(a0, False) * sg) * _bf16_of(xa3, False) + (_bf16_of(a0, True) * sg) * _bf16_of(xa3, True)
          + (_bf16_of(a2, False) * sg) * _bf16_of(xb3, False) + (_bf16_of(a2, True) * sg) * _bf16_of(xb3, True))
    ph = ((_bf16_of(a1, False) * sh) * _bf16_of(xa3, False) + (_bf16_of(a1, True) * sh) * _bf16_of(xa3, True)
          + (_bf16_of(a3, False) * sh) * _bf16_of(xb3, False) + (_bf16_of(a3, True) * sh) * _bf16_of(xb3, True))
    vg = tl.sum(tl.sum(tl.reshape(pg, (NW, 8, 4, RG, 4)), axis=4), axis=2)  # [NW, 8, RG]
    vh = tl.sum(tl.sum(tl.reshape(ph, (NW, 8, 4, RG, 4)), axis=4), axis=2)
    vg = tl.reshape(tl.broadcast_to(vg[:, :, None, :], (NW, 8, 4, RG)), (NW * 32, RG))
    vh = tl.reshape(tl.broadcast_to(vh[:, :, None, :], (NW, 8, 4, RG)), (NW * 32, RG))
    # c0, c1: row g; c2, c3: row g + 8
    return acc + tl.reshape(tl.join(tl.join(vg, vh), tl.join(vg, vh)), (NW * 32, RG, 4))


@triton.jit
def _mma_chunk(acc, w, sc, xa, xb, NW: tl.constexpr, RG: tl.constexpr, INTERPRET: tl.constexpr,
               XC: tl.constexpr = False):
    """XC: xa, xb hold the chunk order's two loads, (xa0, xb0, xa1, xb1) and (xa2, xb2, xa3, xb3)."""
    if INTERPRET:
        if XC:
            x8 = tl.reshape(tl.permute(tl.join(xa, xb), (0, 2, 1)), (NW * 32, 4, 2))
            xa, xb = tl.split(x8)
        return _mma_chunk_tl(acc, w, sc, xa, xb, NW, RG)
    R: tl.constexpr = NW * 32
    return tl.inline_asm_elementwise(
        asm=_MMA_ASM_XC if XC else _MMA_ASM, constraints="=f,=f,=f,=f," + "r," * 16 + "f,f,f,f",
        args=[w, tl.broadcast_to(sc[:, :, None], (R, RG, 4)), tl.broadcast_to(xa[:, None, :], (R, RG, 4)),
              tl.broadcast_to(xb[:, None, :], (R, RG, 4)), acc],
        dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _load_chunk(w32, s32, w_row, s_row, g_ok, c0, it, last, top, KS: tl.constexpr, MASK: tl.constexpr):
    """The weight words [R, RG, 4] and scale words [R, RG] of each warp's turn `it` (chunk c0 + KS it
    [R, 1]; a turn past `last`, loaded ahead, rereads the last turn, a chunk past `top` the chunk `top`:
    no load past the weights; MASK: zeros for the row groups g_ok leaves out)."""
    cr = tl.minimum(c0 + KS * tl.minimum(it, last), top)
    q = tl.arange(0, 4)
    w_off = w_row + 32 * cr
    s_off = s_row + 2 * cr
    if MASK:
        w = tl.load(w32 + w_off[:, :, None] + q[None, None, :], mask=g_ok[:, :, None], other=0)
        s = tl.load(s32 + s_off, mask=g_ok, other=0)
    else:
        w = tl.load(w32 + w_off[:, :, None] + q[None, None, :])
        s = tl.load(s32 + s_off)
    return w, s


@triton.jit
def _load_x(x32, c, top, c_hi, K, t, MASK: tl.constexpr, TAIL: tl.constexpr, XC: tl.constexpr):
    """A warp's B words of chunk c [R, 1]: (xa, xb) [R, 4]. XC: x in the chunk order (`chunk_order`),
    a lane's eight words side by side (two 16-byte loads); else eight 4-byte loads 16 bytes apart."""
    cr = tl.minimum(c, top)
    q = tl.arange(0, 4)[None, :]
    if XC:  # the chunk order: words 8t + (xa0, xb0, xa1, xb1) and 8t + (xa2, xb2, xa3, xb3), two 16-byte loads
        pos = 32 * cr + 8 * t[:, None] + q
        nat = 32 * cr + 8 * (q // 2) + 4 * (q % 2) + t[:, None]  # [R, 4] the first load's natural places
        hi = 16  # the second load's: two k16 steps on
    else:  # xa = pairs 8q + t, xb = pairs 8q + 4 + t of the four k16 steps q
        pos = 32 * cr + 8 * q + t[:, None]
        nat = pos
        hi = 4
    if MASK:  # x past K (the codes there are zero padding) or past c_hi (a reloaded chunk)
        xa = tl.load(x32 + pos, mask=(nat < K // 2) & (c < c_hi), other=0)
        xb = tl.load(x32 + pos + 4, mask=(nat + hi < K // 2) & (c < c_hi), other=0)
    elif TAIL:
        xa = tl.load(x32 + pos, mask=c < c_hi, other=0)
        xb = tl.load(x32 + pos + 4, mask=c < c_hi, other=0)
    else:
        xa = tl.load(x32 + pos)
        xb = tl.load(x32 + pos + 4)
    return xa, xb


@triton.jit
def _chunk(acc, x32, w, s, c, top, c_hi, K, t, NW: tl.constexpr, RG: tl.constexpr, MASK: tl.constexpr,
           TAIL: tl.constexpr, INTERPRET: tl.constexpr, XC: tl.constexpr):
    """acc + the products of a warp's chunk c [R, 1] (w, s: the words of chunk min(c, top)), x loaded
    here, next to its use."""
    xa, xb = _load_x(x32, c, top, c_hi, K, t, MASK, TAIL, XC)
    return _mma_chunk(acc, w, s, xa, xb, NW, RG, INTERPRET, XC)


@triton.jit
def _turn(acc, x32, w, s, xa, xb, c, top, c_hi, K, t, NW: tl.constexpr, RG: tl.constexpr, MASK: tl.constexpr,
          TAIL: tl.constexpr, INTERPRET: tl.constexpr, XC: tl.constexpr, XA: tl.constexpr):
    """One chunk's products: x given (XA: loaded ahead) or loaded here."""
    if XA:
        return _mma_chunk(acc, w, s, xa, xb, NW, RG, INTERPRET, XC)
    else:
        return _chunk(acc, x32, w, s, c, top, c_hi, K, t, NW, RG, MASK, TAIL, INTERPRET, XC)


@triton.jit
def _ahead(x32, c, top, c_hi, K, t, R: tl.constexpr, MASK: tl.constexpr, TAIL: tl.constexpr, XC: tl.constexpr,
           XA: tl.constexpr):
    """XA: chunk c's x words, loaded ahead; else placeholders."""
    if XA:
        return _load_x(x32, c, top, c_hi, K, t, MASK, TAIL, XC)
    else:
        return tl.zeros((R, 4), tl.int32), tl.zeros((R, 4), tl.int32)


@triton.jit
def _step(acc, x32, w32, s32, w_row, s_row, g_ok, c0, w, s, xa, xb, it, last, top, c_hi, K, t, PF: tl.constexpr,
          R: tl.constexpr, NW: tl.constexpr, RG: tl.constexpr, KS: tl.constexpr, MASK: tl.constexpr,
          TAIL: tl.constexpr, INTERPRET: tl.constexpr, XC: tl.constexpr, XA: tl.constexpr):
    """Turn `it` of a buffer: its chunk's products, then the buffer refilled with the chunk PF turns on."""
    c = c0 + KS * it
    acc = _turn(acc, x32, w, s, xa, xb, c, top, c_hi, K, t, NW, RG, MASK, TAIL, INTERPRET, XC, XA)
    w, s = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, it + PF, last, top, KS, MASK)
    xa, xb = _ahead(x32, c + KS * PF, top, c_hi, K, t, R, MASK, TAIL, XC, XA)
    return acc, w, s, xa, xb


@triton.jit
def _row_sums(x32, w_ptr, ws_ptr, K, G0, n_groups, c_lo, c_hi, stride_wn, stride_sn,
              NW: tl.constexpr, RG: tl.constexpr, KS: tl.constexpr, PF: tl.constexpr, MASK: tl.constexpr,
              TAIL: tl.constexpr, INTERPRET: tl.constexpr, XC: tl.constexpr, WAIT: tl.constexpr = False,
              XA: tl.constexpr = False):
    """The sums of rows 16G .. 16G + 15 of the program's NW / KS * RG row groups G = G0 + RG * (warp // KS)
    + i over K chunks c_lo .. c_hi: [NW / KS, RG, 16] fp32 (row 16G + n at [.., n]). The KS warps of a
    row group take every KS-th chunk and meet in a cross-warp sum at the end (more warps an SM keep
    more loads in flight). MASK: some row groups lie past n_groups, or K is not a multiple of 64; TAIL:
    the chunks do not divide by KS (a warp past c_hi reloads chunk c_hi - 1 and multiplies it by x = 0).
    WAIT: the PDL wait comes after the first weight loads (the caller knows the expert before it)."""
    R: tl.constexpr = NW * 32
    r = tl.arange(0, R)
    lane = r % 32
    t = lane % 4
    G = G0 + RG * (r // (32 * KS))[:, None] + tl.arange(0, RG)[None, :]  # [R, RG]
    g_ok = G < n_groups
    G = tl.where(g_ok, G, 0)
    # fragments layout: lane 4(2p + s) + t reads stored row 4G + p, bytes 64s + 16t of each 128-byte chunk
    srow = (4 * G + lane[:, None] // 8).to(tl.int64)
    s_bit = (lane[:, None] // 4) % 2
    w_row = (srow * stride_wn + 64 * s_bit + 16 * t[:, None]) // 4
    s_row = (srow * stride_sn + 4 * s_bit) // 4
    c0 = (c_lo + (r // 32) % KS)[:, None]  # [R, 1]: the warp's first chunk
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    s32 = ws_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((R, RG, 4), tl.float32)
    n_it = tl.cdiv(c_hi - c_lo, KS)
    last = tl.maximum(n_it - 1, 0)
    top = c_hi - 1
    if PF >= 2:
        # PF buffers, each refilled in place with the chunk PF turns on once its chunk is done: a rotation
        # (1 <- 2 <- new) would make the copy at the top of a turn wait for the load issued a turn before.
        # XA: x rides along, PF turns ahead of its use
        w1, s1 = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, 0, last, top, KS, MASK)
        w2, s2 = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, 1, last, top, KS, MASK)
        w3, s3 = w2, s2
        w4, s4 = w2, s2
        if PF >= 3:
            w3, s3 = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, 2, last, top, KS, MASK)
        if PF == 4:
            w4, s4 = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, 3, last, top, KS, MASK)
        pdl_enter(WAIT)
        xa1, xb1 = _ahead(x32, c0, top, c_hi, K, t, R, MASK, TAIL, XC, XA)
        xa2, xb2 = _ahead(x32, c0 + KS, top, c_hi, K, t, R, MASK, TAIL, XC, XA)
        xa3, xb3 = xa2, xb2
        xa4, xb4 = xa2, xb2
        if PF >= 3:
            xa3, xb3 = _ahead(x32, c0 + 2 * KS, top, c_hi, K, t, R, MASK, TAIL, XC, XA)
        if PF == 4:
            xa4, xb4 = _ahead(x32, c0 + 3 * KS, top, c_hi, K, t, R, MASK, TAIL, XC, XA)
        for it in range(0, n_it, PF):
            acc, w1, s1, xa1, xb1 = _step(acc, x32, w32, s32, w_row, s_row, g_ok, c0, w1, s1, xa1, xb1, it, last,
                                          top, c_hi, K, t, PF, R, NW, RG, KS, MASK, TAIL, INTERPRET, XC, XA)
            if it + 1 < n_it:
                acc, w2, s2, xa2, xb2 = _step(acc, x32, w32, s32, w_row, s_row, g_ok, c0, w2, s2, xa2, xb2, it + 1,
                                              last, top, c_hi, K, t, PF, R, NW, RG, KS, MASK, TAIL, INTERPRET, XC, XA)
            if PF >= 3:
                if it + 2 < n_it:
                    acc, w3, s3, xa3, xb3 = _step(acc, x32, w32, s32, w_row, s_row, g_ok, c0, w3, s3, xa3, xb3,
                                                  it + 2, last, top, c_hi, K, t, PF, R, NW, RG, KS, MASK, TAIL,
                                                  INTERPRET, XC, XA)
            if PF == 4:
                if it + 3 < n_it:
                    acc, w4, s4, xa4, xb4 = _step(acc, x32, w32, s32, w_row, s_row, g_ok, c0, w4, s4, xa4, xb4,
                                                  it + 3, last, top, c_hi, K, t, PF, R, NW, RG, KS, MASK, TAIL,
                                                  INTERPRET, XC, XA)
    elif PF == 1:  # the next chunk through a register rotation (its copy waits on the load a turn before)
        w1, s1 = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, 0, last, top, KS, MASK)
        pdl_enter(WAIT)
        for it in range(0, n_it):
            w, s = w1, s1
            w1, s1 = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, it + 1, last, top, KS, MASK)
            acc = _chunk(acc, x32, w, s, c0 + KS * it, top, c_hi, K, t, NW, RG, MASK, TAIL, INTERPRET, XC)
    else:
        pdl_enter(WAIT)
        for it in range(0, n_it):
            w, s = _load_chunk(w32, s32, w_row, s_row, g_ok, c0, it, last, top, KS, MASK)
            acc = _chunk(acc, x32, w, s, c0 + KS * it, top, c_hi, K, t, NW, RG, MASK, TAIL, INTERPRET, XC)
    # lanes t of a g hold the same sums: take t == 0's c0 (row g) and c2 (row g + 8)
    v = tl.reshape(acc, (NW, 8, 4, RG, 2, 2))  # warp, g, t, group, h, c % 2
    v = tl.sum(tl.where((tl.arange(0, 4) == 0)[None, None, :, None, None, None], v, 0.0), axis=2)
    v = tl.sum(tl.where((tl.arange(0, 2) == 0)[None, None, None, None, :], v, 0.0), axis=4)  # [NW, 8, RG, 2]
    v = tl.reshape(tl.permute(v, (0, 2, 3, 1)), (NW // KS, KS, RG, 16))
    return tl.sum(v, axis=1)


@triton.jit
def _chunk_pos(i):
    """Where element i of a row goes in the chunk order: its bf16 pair (word) 32c + 8q + 4h + t (q, t in
    0..3, h in 0..1) to word 32c + 8t + 2q + h, so that lane t's B words of chunk c, xa = pairs 8q + t and
    xb = pairs 8q + 4 + t (q = 0..3), are one run of eight with each k16 step's pair (xa, xb) adjacent:
    two 16-byte loads whose registers the MMAs take as they are (with xa's four words, then xb's, ptxas
    moved 12 registers a loop turn in gate_up)."""
    w = i // 2
    return 2 * (32 * (w // 32) + 8 * (w % 4) + 2 * ((w % 32) // 8) + (w // 4) % 2) + i % 2


def chunk_width(n: int) -> int:
    """The length of a row of n elements in the chunk order: n rounded up to whole 64-deep chunks."""
    return 64 * triton.cdiv(n, 64)


def chunk_order(a: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., chunk_width(n)]: the chunk order token_gate_up writes `a` in (zero padding
    past n). Its inverse is natural_order."""
    n, width = a.shape[-1], chunk_width(a.shape[-1])
    pad = torch.nn.functional.pad(a, (0, width - n))
    w = pad.reshape(*a.shape[:-1], width // 64, 4, 2, 4, 2)  # c, q, h, t, the pair's element
    return w.permute(*range(a.dim() - 1), -5, -2, -4, -3, -1).reshape(*a.shape[:-1], width)


def natural_order(a: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of chunk_order: [..., chunk_width(n)] -> [..., n]."""
    c = a.shape[-1] // 64
    w = a.reshape(*a.shape[:-1], c, 4, 4, 2, 2)  # c, t, q, h, the pair's element
    return w.permute(*range(a.dim() - 1), -5, -3, -2, -4, -1).reshape(*a.shape[:-1], 64 * c)[..., :n]


@triton.jit
def _order_key(lg, f):
    """int32 keys of bf16-valued fp32 logits lg that order as (logit, -index f): the bf16 bits made
    order-preserving as a signed int (negatives' magnitude bits flipped) above 65535 - f."""
    b = tl.where(lg == 0.0, 0.0, lg).to(tl.int32, bitcast=True) >> 16  # -0.0 ties +0.0, as a compare has it
    return ((b ^ ((b >> 15) & 32767)) << 16) | (65535 - f)


@triton.jit
def _key_value(key):
    """The logit of an _order_key key."""
    o = key >> 16
    return ((o ^ ((o >> 15) & 32767)) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _key_topk(lg, j, ids_ptr, topk_w_ptr, store, TOP_K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr):
    """The j-th of the top-k of one warp's logits lg [E_PAD <= 32] (each warp holds a copy); store: also
    write topk_ids / topk_weights. TOP_K rounds of one max over _order_key's keys, shuffles within the
    warp only: this runs before every program's first weight load, and a max plus an argmin a round,
    or a rank for every expert, took 2-4x the shuffles (H100, batch-1 step with o's router weights
    loaded after its wait: 1.831 ms with ranks of a [64, 64] tile, 1.715 with a max and an argmin a
    round, 1.706 with this, 1.676 with the experts fixed and nothing read)."""
    key = _order_key(lg, tl.arange(0, E_PAD))
    kk = tl.arange(0, K_PAD)
    ids = tl.zeros((K_PAD,), tl.int32)
    vals = tl.full((K_PAD,), float("-inf"), tl.float32)
    e = 0
    for r in tl.static_range(TOP_K):
        top = tl.max(key, axis=0)
        idx = 65535 - (top & 65535)
        e = tl.where(j == r, idx, e)
        ids = tl.where(kk == r, idx, ids)
        vals = tl.where(kk == r, _key_value(top), vals)
        key = tl.where(key == top, -2147483647 - 1, key)
    if store:
        _store_token_topk(ids, vals, ids_ptr, topk_w_ptr, TOP_K, K_PAD)
    return e


@triton.jit
def _token_expert(logits_ptr, rb_ptr, ids_ptr, topk_w_ptr, E, hidden, eps, j, store, TOP_K: tl.constexpr,
                  E_PAD: tl.constexpr, K_PAD: tl.constexpr, PARTIALS: tl.constexpr, P_W: tl.constexpr = 1):
    """(the token's j-th expert, the norm's rstd): from the logits (rstd 1), or PARTIALS from the
    router's partial sums at logits_ptr, finished here (P_W: their rows' width, router_partials.width)."""
    if PARTIALS:
        lg, rstd = _finish_logits(logits_ptr, rb_ptr, E, hidden, eps, _SLOTS, P_W, E_PAD)
        if E_PAD <= 32:
            return _key_topk(lg, j, ids_ptr, topk_w_ptr, store, TOP_K, E_PAD, K_PAD), rstd
        else:  # ranks over a [E_PAD, E_PAD] tile (crosses warps; the 120b's 128 experts)
            f = tl.arange(0, E_PAD)
            ahead = (lg[None, :] > lg[:, None]) | ((lg[None, :] == lg[:, None]) & (f[None, :] < f[:, None]))
            rank = tl.sum(ahead.to(tl.int32), axis=1)
            return _ranked_pick(lg, rank, ids_ptr, topk_w_ptr, j, store, TOP_K, E_PAD, K_PAD), rstd
    else:
        return _inline_topk(logits_ptr, ids_ptr, topk_w_ptr, E, j, store, TOP_K, E_PAD, K_PAD), 1.0


@triton.jit
def _gate_up_kernel(x_ptr, a_ptr, zero_ptr, n_zero, w_ptr, ws_ptr, b_ptr, logits_ptr, ids_ptr, topk_w_ptr,
                    E, expert_start, E_LOCAL, K, N, stride_a, n_chunks, stride_we, stride_wn, stride_se, stride_sn,
                    alpha, limit, rb_ptr, hidden, eps, TOP_K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                    NW: tl.constexpr, RG: tl.constexpr, KS: tl.constexpr, PF: tl.constexpr, MASK: tl.constexpr,
                    TAIL: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr, XC: tl.constexpr = False,
                    XA: tl.constexpr = False, PARTIALS: tl.constexpr = False, P_W: tl.constexpr = 1):
    # PARTIALS: logits_ptr holds the router's partial sums (router_partials), finished here into the
    # logits and the norm's rstd; x is u = g * h, so the rows' sums take the rstd before the bias
    pdl_enter(PDL)
    j = tl.program_id(0)
    pid = tl.program_id(1)
    if n_zero > 0:  # the down GEMM's float32 output, which its atomics add into
        if (j == 0) & (pid == 0):
            for z in range(0, n_zero, 1024):
                offs = z + tl.arange(0, 1024)
                tl.store(zero_ptr + offs, tl.zeros((1024,), tl.float32), mask=offs < n_zero)
    e, rstd = _token_expert(logits_ptr, rb_ptr, ids_ptr, topk_w_ptr, E, hidden, eps, j, (j == 0) & (pid == 0),
                            TOP_K, E_PAD, K_PAD, PARTIALS, P_W)
    e, _, _ = _inline_rows(e, j, expert_start, E_LOCAL, 1)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    G0 = pid * (NW // KS) * RG
    n_groups = N // 16
    h = _row_sums(x_ptr.to(tl.pointer_type(tl.int32)), w_ptr + e64 * stride_we, ws_ptr + e64 * stride_se, K, G0,
                  n_groups, 0, n_chunks, stride_wn, stride_sn, NW, RG, KS, PF, MASK, TAIL, INTERPRET, XC, False, XA)
    G = G0 + RG * tl.arange(0, NW // KS)[:, None, None] + tl.arange(0, RG)[None, :, None]
    n = 16 * G + tl.arange(0, 16)[None, None, :]
    ok = n < N
    if PARTIALS:
        h = h * rstd
    h += tl.load(b_ptr + e64 * N + n, mask=ok, other=0.0)
    gate, up = tl.split(tl.reshape(h, (NW // KS, RG, 8, 2)))  # weight rows alternate gate, up
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    i = 8 * G + tl.arange(0, 8)[None, None, :]
    tl.store(a_ptr + j * stride_a + _chunk_pos(i), _store_cast(act, a_ptr, INTERPRET), mask=i < N // 2)


@triton.jit
def _down_kernel(a_ptr, out_ptr, w_ptr, ws_ptr, b_ptr, ids_ptr, topk_w_ptr, logits_ptr, E, expert_start, E_LOCAL,
                 K, N, stride_a, chunks_per_split, n_chunks, stride_we, stride_wn, stride_se, stride_sn,
                 rb_ptr, hidden, eps,
                 HAS_BIAS: tl.constexpr, NW: tl.constexpr, RG: tl.constexpr, KS: tl.constexpr, PF: tl.constexpr,
                 MASK: tl.constexpr, TAIL: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
                 EARLY: tl.constexpr = False, TOP_K: tl.constexpr = 1, E_PAD: tl.constexpr = 1,
                 K_PAD: tl.constexpr = 1, XA: tl.constexpr = False, PARTIALS: tl.constexpr = False,
                 P_W: tl.constexpr = 1):
    # EARLY (under PDL): the expert comes from the router's logits (or partial sums), which the kernel
    # before gate_up wrote, so the first weight loads go out before the wait, while gate_up still runs
    j = tl.program_id(0)
    pid = tl.program_id(1)
    pid_k = tl.program_id(2)
    if EARLY:
        e, _ = _token_expert(logits_ptr, rb_ptr, ids_ptr, topk_w_ptr, E, hidden, eps, j, False, TOP_K, E_PAD, K_PAD,
                             PARTIALS, P_W)
    else:
        pdl_enter(PDL)
        e = tl.load(ids_ptr + j)
    e, _, _ = _inline_rows(e, j, expert_start, E_LOCAL, 1)
    if e < 0:
        if EARLY:
            pdl_enter(PDL)  # every program waits: the grid ends after gate_up, which zeroes `out`
        return
    e64 = e.to(tl.int64)
    G0 = pid * (NW // KS) * RG
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, n_chunks)
    y = _row_sums((a_ptr + j * stride_a).to(tl.pointer_type(tl.int32)), w_ptr + e64 * stride_we,
                  ws_ptr + e64 * stride_se, K, G0, N // 16, c_lo, c_hi, stride_wn, stride_sn, NW, RG, KS, PF, MASK,
                  TAIL, INTERPRET, True, EARLY, XA)
    G = G0 + RG * tl.arange(0, NW // KS)[:, None, None] + tl.arange(0, RG)[None, :, None]
    n = 16 * G + tl.arange(0, 16)[None, None, :]
    ok = n < N
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(b_ptr + e64 * N + n, mask=ok, other=0.0)
    y = y * tl.load(topk_w_ptr + j)
    tl.atomic_add(out_ptr + n, y, mask=ok, sem="relaxed")


def supported(w: MXFP4Weight) -> bool:
    """Whether these kernels take w: the fragments layout, scales that fit one multiply, K even in
    chunks of 32 codes (x's bf16 pairs are read as 32-bit words)."""
    return w.fragments and w.upcast_mode == 2 and w.k % 32 == 0


def _check(w: MXFP4Weight, routing: Routing, who: str) -> None:
    if not supported(w):
        raise ValueError(f"{who}: needs a 'fragments' weight with every block scale <= 128 "
                         f"(fragments={w.fragments}, upcast_mode={w.upcast_mode}, k={w.k})")
    one = routing.logits is not None or routing.partials is not None
    if not one or routing.num_tokens != 1:
        raise ValueError(f"{who}: takes inline_routing's or partial_routing's one token, got {routing.num_tokens} "
                         f"tokens ({'inline' if one else 'grouped'} routing)")


def _router_args(routing: Routing) -> tuple[tuple, dict]:
    """The kernels' (logits_ptr, rb_ptr, hidden, eps) and constexprs (E_PAD, PARTIALS, P_W): the logits,
    or the router's partial sums with what finishes them."""
    p = routing.partials
    if p is None:
        lg = routing.logits
        return (lg, lg, 1, 0.0), dict(E_PAD=triton.next_power_of_2(lg.shape[1]), PARTIALS=False)
    return (p.sums, p.bias, p.hidden, float(p.eps)), dict(E_PAD=triton.next_power_of_2(p.num_experts),
                                                          P_W=width(p.num_experts), PARTIALS=True)


def _groups(opts: TokenOptions) -> int:
    """Row groups a program covers."""
    return opts.num_warps // opts.k_warps * opts.row_groups


def _consts(n: int, k: int, chunks: tuple[int, ...], opts: TokenOptions) -> dict:
    """The kernels' constexprs; chunks: the K chunk counts programs take."""
    if opts.num_warps % opts.k_warps or opts.prefetch not in (0, 1, 2, 3, 4):
        raise ValueError(f"{opts}: k_warps must divide num_warps and prefetch be 0 to 4")
    if opts.x_ahead and opts.prefetch < 2:
        raise ValueError(f"{opts}: x_ahead rides in the prefetch buffers: it needs prefetch 2 to 4")
    return dict(NW=opts.num_warps, RG=opts.row_groups, KS=opts.k_warps, PF=opts.prefetch,
                MASK=(n // 16) % _groups(opts) != 0 or k % 64 != 0, TAIL=any(c % opts.k_warps for c in chunks),
                INTERPRET=INTERPRETED, XA=opts.x_ahead)


def token_gate_up(x: torch.Tensor, routing: Routing, w: MXFP4Weight, bias: torch.Tensor, alpha: float,
                  limit: float, opts: TokenOptions | None = None, zero: torch.Tensor | None = None,
                  x_chunk_order: bool = False) -> torch.Tensor:
    """x [1, H] -> a [k, I'] in x.dtype and the chunk order (row j: the token's j-th expert; rows of
    other ranks' experts are not written), routing.topk_ids / topk_weights filled in (routing:
    inline_routing's, or partial_routing's with x = u, whose row sums take the norm's rstd). bias [E, 2I]
    float32; zero: a contiguous float32 tensor zeroed on the way (token_down's output).
    x_chunk_order: x [1, chunk_width(H)] in the chunk order (`chunk_order(x)`; what lies past H is
    not read), loaded as down loads `a`: two 16-byte vectors a chunk instead of eight words."""
    _check(w, routing, "token_gate_up")
    opts = opts or GATE_UP_OPTIONS
    width, align = (chunk_width(w.k), 16) if x_chunk_order else (w.k, 4)
    if x.shape != (1, width) or not x.is_contiguous() or x.dtype != torch.bfloat16 or x.data_ptr() % align:
        raise ValueError(f"token_gate_up: x must be a contiguous, {align}-byte aligned bfloat16 [1, {width}] "
                         f"({'in the chunk order, ' if x_chunk_order else ''}the kernel reads bf16 pairs as words), "
                         f"got {tuple(x.shape)} {x.dtype} at offset {x.data_ptr() % align}")
    N, K, k = w.n, w.k, routing.top_k
    a = torch.empty(k, chunk_width(N // 2), dtype=x.dtype, device=x.device)
    n_zero = zero.numel() if zero is not None else 0
    (lg, rb, hidden, eps), router_consts = _router_args(routing)
    _gate_up_kernel[(k, triton.cdiv(N // 16, _groups(opts)))](
        x, a, zero if zero is not None else a, n_zero, w.data, w.scales, bias, lg, routing.topk_ids,
        routing.topk_weights, routing.num_experts, routing.expert_start, routing.num_local_experts, K, N, a.stride(0),
        triton.cdiv(K, 64), w.data.stride(0), w.data.stride(1), w.scales.stride(0), w.scales.stride(1),
        float(alpha), float(limit), rb, hidden, eps, TOP_K=k, K_PAD=triton.next_power_of_2(k), **router_consts,
        **_consts(N, K, (triton.cdiv(K, 64),), opts), num_warps=opts.num_warps, num_stages=1, XC=x_chunk_order,
        **pdl.args())
    return a


def token_down(a: torch.Tensor, routing: Routing, w: MXFP4Weight, bias: torch.Tensor | None,
               out: torch.Tensor, opts: TokenOptions | None = None) -> torch.Tensor:
    """out [1, H] float32 (zeroed, e.g. by token_gate_up) += sum over the token's local experts j of
    topk_weights[j] * (a[j] @ W2[e]^T + b2[e]), a token_gate_up's (chunk order). bias None: no down bias
    (a TP rank other than the first)."""
    _check(w, routing, "token_down")
    opts = opts or DOWN_OPTIONS
    N, K, k = w.n, w.k, routing.top_k
    K_a = chunk_width(K)
    if a.shape != (k, K_a) or not a.is_contiguous() or a.dtype != torch.bfloat16 or a.data_ptr() % 16:
        raise ValueError(f"token_down: a must be token_gate_up's: a contiguous, 16-byte aligned bfloat16 [{k}, {K_a}] "
                         f"in the chunk order (chunk_order), got "
                         f"{tuple(a.shape)} {a.dtype} at offset {a.data_ptr() % 16}")
    if out.shape != (1, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"token_down: out must be a contiguous float32 [1, {N}], got {tuple(out.shape)} {out.dtype}")
    n_chunks = triton.cdiv(K, 64)
    split = max(1, min(opts.split_k, n_chunks))
    per = triton.cdiv(n_chunks, split)
    split = triton.cdiv(n_chunks, per)  # no empty split (its prefetch would read past the weights)
    early = DOWN_EARLY and pdl.args()["PDL"]
    (lg, rb, hidden, eps), router_consts = _router_args(routing)
    _down_kernel[(k, triton.cdiv(N // 16, _groups(opts)), split)](
        a, out, w.data, w.scales, bias if bias is not None else out, routing.topk_ids, routing.topk_weights,
        lg, routing.num_experts, routing.expert_start, routing.num_local_experts, K, N, a.stride(0), per, n_chunks,
        w.data.stride(0), w.data.stride(1), w.scales.stride(0), w.scales.stride(1), rb, hidden, eps,
        HAS_BIAS=bias is not None, **_consts(N, K, (per, n_chunks - per * (split - 1)), opts),
        num_warps=opts.num_warps, num_stages=1, EARLY=early, TOP_K=k, K_PAD=triton.next_power_of_2(k),
        **router_consts, **pdl.args())
    return out
