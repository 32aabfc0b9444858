"""Grouped MoE GEMMs on MXFP4 expert weights: token rows gathered by index, weights dequantized in
registers, bias + clamped SwiGLU fused into the first GEMM, the routing weight and the top-k combine
into the second.

    w1 = prepare_mxfp4_weight(gate_up_blocks, gate_up_scales, encoding="bf16x2")  # once, at load
    a, a_amax = moe_gate_up(x, routing, w1, b1, act, alpha, limit, opts)  # [R, I] in grouped order
    out = moe_down(a, a_amax, routing, w2, b2, act, opts, ...)           # [T, H]

Activations (`act`) and how the MXFP4 tile reaches the tensor cores:
  "bf16":  weights "bf16x2"-encoded at load (the codes re-packed, see _BF16X2_BITS): each 4 bytes
           become 8 bf16 in 9 integer ops and 4 mul.bf16x2 of inline asm (8 where a block scale
           exceeds 128), then a bf16 tl.dot.
           Weights "e2m1" (checkpoint codes): tl.dot_scaled, where Triton upcasts on Hopper
           (fast_math: an e8m0 NaN scale, 255, never in a checkpoint, is not turned into NaNs).
  "fp8":   e4m3 x e4m3 on the fp8 tensor cores. Activations are quantized as they are loaded with
           a per-token dynamic scale amax/448 (x: `row_absmax`; the SwiGLU output: per-tile maxima
           that moe_gate_up writes beside it), times its reciprocal. MXFP4 tiles become e4m3 in
           registers: code * 2^(6-d), d = (row's largest scale exponent) - (block's), exact for
           d <= 14 (blocks with d > 14, below 2^-15 of the row's largest block, count as zero);
           2^(s_max - 133) per row and the token scale multiply the accumulator.
  "mxfp8": e4m3 with one e8m0 scale per 32 (gptoss.quant.mxfp8's rule), quantized as loaded, x MXFP4
           through tl.dot_scaled (native on Blackwell; Triton emulates it elsewhere).
Each op has a plain-torch twin (`*_torch`) with the same signature.

Weights: `MXFP4Weight` (gptoss.kernels.moe_weights) holds one projection of the local experts in
the checkpoint's row layout, k-blocked, or in the "fragments" layout ("triton"'s default: the
weights become the MMA's A operand in registers, swap_ab, with no shared-memory round trip for the
upcast tile).

Interpreter traps handled here (TRITON_INTERPRET=1, Triton 3.9): tl.dot on bf16/fp8 is wrong (we
feed it fp32 of the exact values), fp32 -> bf16 truncates and fp32 -> e4m3 drops the rounding carry
(we round in fp32 first), and inline asm does not exist (the same bit ops in plain Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quant.mxfp4 import dequantize_mxfp4
from ..quant.mxfp8 import dequantize_mxfp8, quantize_mxfp8
from . import pdl
from .moe_routing import Routing, _store_topk, _topk_softmax, _topk_weights
from .pdl import pdl_enter
# the weight layouts live in moe_weights; re-exported here, where callers have always found them
from .moe_weights import (_BF16X2_BITS, ENCODINGS, FP8_MAX_SHIFT, MXFP4Weight, _fp8_weight_torch,  # noqa: F401
                          decode_bf16x2, encode_bf16x2, prepare_mxfp4_weight, swizzle_fragments,
                          unswizzle_fragments)

ACTS = {"bf16": 0, "fp8": 1, "mxfp8": 2}
@dataclass(frozen=True)
class GemmOptions:
    """Tiles of one grouped GEMM. block_n counts weight rows (gate_up: block_n/2 SwiGLU outputs)."""
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False   # weights on the MMA's M side (few token rows per expert); "bf16x2" weights
                            # take it only in the fragments layout, which requires it
    split_k: int = 1        # K split over programs, partial sums meeting in fp32 atomics (moe_down: with
                            # fused_combine; moe_gate_up: the last split of a tile applies bias + SwiGLU)
    prefetch: int = 0       # 0, 1, 2: K steps loaded ahead in registers (besides num_stages)
    maxnreg: int = 0        # registers per thread ptxas may use (0: its choice); fewer fit more programs an SM

    def launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg and not INTERPRETED:  # the interpreter takes no compiler options
            opts["maxnreg"] = self.maxnreg
        return opts


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_e4m3(x):
    # x (|x| <= 448) rounded to the e4m3 grid, ties to even, in fp32; only for the interpreter, whose
    # fp32 -> fp8 cast drops the carry into the exponent (7.8 -> 4). The GPU's cvt.rn does this itself.
    bits = x.to(tl.int32, bitcast=True)
    mbits = bits & 0x7FFFFFFF
    normal = (mbits + 0x7FFFF + ((mbits >> 20) & 1)) & -1048576
    mag = tl.abs(x)
    sub = (((mag * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)).to(tl.int32, bitcast=True)
    r = tl.where(mag < 0.015625, sub, normal) | (bits & -2147483648)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _store_cast(x, ptr, INTERPRET: tl.constexpr):
    """x (fp32) in ptr's element type. The interpreter's fp32 -> bf16 cast truncates; round it to
    nearest-even first so that the cast is exact (the GPU's cvt.rn rounds the same way)."""
    if INTERPRET:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _to_e4m3(y, INTERPRET: tl.constexpr):
    if INTERPRET:
        y = _round_e4m3(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _quant_mxfp8(a, BM: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):
    """a [BM, BK] fp32 -> (e4m3 [BM, BK], e8m0 uint8 [BM, BK/32]): the smallest 2^k with amax <= 448 * 2^k."""
    a3 = tl.reshape(a, (BM, BK // 32, 32))
    amax = tl.max(tl.abs(a3), axis=2)
    bits = amax.to(tl.int32, bitcast=True)
    k = ((bits >> 23) & 0xFF) - 135 + tl.where((bits & 0x7FFFFF) > 0x600000, 1, 0)
    k = tl.minimum(tl.maximum(k, -127), 126)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2^-k, exact
    q = _to_e4m3(tl.reshape(a3 * inv[:, :, None], (BM, BK)), INTERPRET)
    return q, (k + 127).to(tl.uint8)


@triton.jit
def _quant_fp8_rows(a, scale, INTERPRET: tl.constexpr):
    """a [BM, BK] fp32, scale [BM] (amax/448) -> e4m3: a * (1/scale), one IEEE division per row (an
    IEEE division per element costs more than the MMA); quantize_fp8 divides, which can differ in
    the last bit of the quotient and so flip a code whose quotient sits on a rounding midpoint."""
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    y = a * inv[:, None]
    return _to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), INTERPRET)


@triton.jit
def _mxfp4_to_e4m3(wb, mult, BN: tl.constexpr, BK: tl.constexpr):
    """wb [BN, BK/2] packed codes, mult [BN, BK/32] fp32 2^(20-d) (0: drop) -> e4m3 [BN, BK]."""
    c = tl.reshape(tl.join(wb & 15, wb >> 4), (BN, BK)).to(tl.int32)
    v = (((c & 8) << 12) | ((c & 7) << 9)).to(tl.int16).to(tl.float16, bitcast=True)  # code * 2^-14
    m = tl.reshape(tl.broadcast_to(mult[:, :, None], (BN, BK // 32, 32)), (BN, BK))
    return (v.to(tl.float32) * m).to(tl.float8e4nv)  # exact: code * 2^(6-d) is on the e4m3 grid


@triton.jit
def _bf16_of(o, HIGH: tl.constexpr):
    """float32 value of the low (or high) bf16 half of uint32 words."""
    if HIGH:
        return (o & 0xFFFF0000).to(tl.float32, bitcast=True)
    return (o << 16).to(tl.float32, bitcast=True)


@triton.jit
def _pair_scales(sc, BN: tl.constexpr, BK: tl.constexpr):
    """sc [BN, BK/2] -> the scale each element gets in the asm, in r0's / r1's element order: a word's
    elements 0, 1 (2, 3) multiply both pairs of r0 (r1)."""
    sA, sB = tl.split(tl.permute(tl.reshape(sc, (BN, BK // 8, 2, 2)), (0, 1, 3, 2)))
    sA = tl.reshape(tl.broadcast_to(tl.expand_dims(sA, 2), (BN, BK // 8, 2, 2)), (BN, BK // 2))
    sB = tl.reshape(tl.broadcast_to(tl.expand_dims(sB, 2), (BN, BK // 8, 2, 2)), (BN, BK // 2))
    return sA, sB


# the asm upcast of one "bf16x2" word w (see _BF16X2_BITS) into its four bf16x2 words; temporaries t0, t1
_UPCAST_PTX = """
            and.b32 {k01}, {w}, 0x81C081C0;
            shf.l.wrap.b32 t0, {w}, {w}, 28;
            and.b32 {k45}, t0, 0x81C081C0;
            shl.b32 t0, {w}, 6;
            and.b32 {k23}, t0, 0x81C081C0;
            shf.l.wrap.b32 t0, {w}, {w}, 2;
            and.b32 t0, t0, 0x00400040;
            shf.l.wrap.b32 t1, {w}, {w}, 10;
            and.b32 t1, t1, 0x81808180;
            or.b32 {k67}, t0, t1;"""
_UPCAST_ASM = tl.constexpr(_UPCAST_PTX.format(w="$4", k01="$0", k45="$1", k23="$2", k67="$3"))


@triton.jit
def _bf16x2_pairs(w):
    """The asm upcast's shift / mask steps on "bf16x2"-encoded uint32 words (see _BF16X2_BITS): four
    bf16x2 words holding codes (k0, k1), (k4, k5), (k2, k3), (k6, k7) as code x 2^-126."""
    m = 0x81C081C0
    return (w & m, ((w << 28) | (w >> 4)) & m, (w << 6) & m,
            (((w << 2) | (w >> 30)) & 0x00400040) | (((w << 10) | (w >> 22)) & 0x81808180))


@triton.jit
def _upcast_bf16x2_tl(wb, sc, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr):
    """The asm upcast in plain Triton ops (the interpreter has no inline asm): same outputs."""
    q = tl.reshape(wb.to(tl.uint32), (BN, BK // 8, 2, 2))  # [.., word, p, q]: byte 2p + q
    b02, b13 = tl.split(q)
    b0, b2 = tl.split(b02)
    b1, b3 = tl.split(b13)
    o0, o1, o2, o3 = _bf16x2_pairs(b0 | (b1 << 8) | (b2 << 16) | (b3 << 24))
    # join(join(a, b), join(c, d)) flattens to a, c, b, d: r0 = o0.lo, o0.hi, o1.lo, o1.hi
    r0 = tl.reshape(tl.join(tl.join(_bf16_of(o0, False), _bf16_of(o1, False)),
                            tl.join(_bf16_of(o0, True), _bf16_of(o1, True))), (BN, BK // 2))
    r1 = tl.reshape(tl.join(tl.join(_bf16_of(o2, False), _bf16_of(o3, False)),
                            tl.join(_bf16_of(o2, True), _bf16_of(o3, True))), (BN, BK // 2))
    sA, sB = _pair_scales(sc.to(tl.float32), BN, BK)
    if MODE == 1:  # * 2^126 first, exact
        r0 = r0 * 8.507059173023462e+37
        r1 = r1 * 8.507059173023462e+37
    return (r0 * sA).to(tl.bfloat16), (r1 * sB).to(tl.bfloat16)


@triton.jit
def _upcast_bf16x2(wb, sc, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr, MODE: tl.constexpr):
    """wb uint8 [BN, BK/2] ("bf16x2" encoding), sc bf16 [BN, BK/2] -> bf16 [BN, BK]. Of each word's four
    scale elements, 0 and 1 scale the codes of bytes 0 and 2, elements 2 and 3 those of bytes 1 and 3
    (see _scales_bf16: 2^(s-1) for MODE 2, 2^(s-127) for MODE 1).

    Each 4 bytes (8 codes) give 4 bf16x2 words in 9 integer ops and 4 mul.bf16x2 (MODE 2; MODE 1
    multiplies by 2^126 first); r0 holds codes k0, k1, k4, k5 of each word, r1 k2, k3, k6, k7, each
    pair (one byte's two codes) in one register as the MMA's A fragment wants them."""
    if INTERPRET:
        r0, r1 = _upcast_bf16x2_tl(wb, sc, BN, BK, MODE)
    else:
        if MODE == 2:
            scale_asm: tl.constexpr = """
            mul.bf16x2 $0, $0, $5;
            mul.bf16x2 $1, $1, $5;
            mul.bf16x2 $2, $2, $6;
            mul.bf16x2 $3, $3, $6;"""
        else:
            scale_asm: tl.constexpr = """
            mov.b32 t0, 0x7e807e80;
            mul.bf16x2 $0, $0, t0;
            mul.bf16x2 $1, $1, t0;
            mul.bf16x2 $2, $2, t0;
            mul.bf16x2 $3, $3, t0;
            mul.bf16x2 $0, $0, $5;
            mul.bf16x2 $1, $1, $5;
            mul.bf16x2 $2, $2, $6;
            mul.bf16x2 $3, $3, $6;"""
        r0, r1 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1;""" + _UPCAST_ASM + scale_asm + """
            }""",
            constraints="=r,=r,=r,=r,r,r,r",
            args=[wb, sc], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    # k = 4j + 2r + e: r0 / r1 hold (j, e) of each word
    r0 = tl.reshape(r0, (BN, BK // 8, 2, 2))
    r1 = tl.reshape(r1, (BN, BK // 8, 2, 2))
    return tl.reshape(tl.permute(tl.join(r0, r1), (0, 1, 2, 4, 3)), (BN, BK))


@triton.jit
def _scales_bf16(ws, MODE: tl.constexpr):
    """e8m0 scales -> bf16 multipliers: 2^(s-1) (MODE 2: the upcast's 2^126 folded in, s <= 128) or
    2^(s-127)."""
    if MODE == 2:
        return ((ws.to(tl.int16) + 126) << 7).to(tl.bfloat16, bitcast=True)
    return (ws.to(tl.int16) << 7).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequant_bf16x2(w, ws, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr, MODE: tl.constexpr):
    """A "bf16x2"-encoded tile w [BN, BK/2] with its e8m0 scales ws [BN, BK/32] -> bf16 [BN, BK]: the
    row-layout MMA path takes its weights from here."""
    sc = _scales_bf16(ws, MODE)
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, BK // 32, 16)), (BN, BK // 2))
    return _upcast_bf16x2(w, sc, BN, BK, INTERPRET, MODE)


@triton.jit
def _dequant_fragments(w, ws, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr, MODE: tl.constexpr):
    """A "fragments" tile (swizzle_fragments) w [BN/4, 2BK] bytes, ws [BN/4, BK/8] -> bf16 [BN, BK].

    Upcast as stored (each 4-byte word one lane's k16 step, both of its rows), then the reshape /
    permute back to [BN, BK], which Triton can lay out as the MMA's A fragments without moving data."""
    R: tl.constexpr = BN // 4
    sc = _scales_bf16(ws, MODE)  # columns (C, s, q // 2, h)
    # a word's elements (w, h) take row h = w's scale: elements 0, 1 scale bytes 0, 2 (row g), 2, 3
    # bytes 1, 3 (row g + 8), as _upcast_bf16x2 reads them
    sc = tl.broadcast_to(tl.reshape(sc, (R, BK // 64, 2, 1, 2, 1, 2, 1)), (R, BK // 64, 2, 4, 2, 2, 2, 2))
    sc = tl.reshape(sc, (R, 2 * BK))  # columns (C, s, t, q, w, h)
    v = _upcast_bf16x2(w, sc, R, 4 * BK, INTERPRET, MODE)  # each byte's two codes, low nibble first
    v = tl.reshape(v, (BN // 16, 4, BK // 64, 2, 4, 4, 2, 2, 2))  # G, p, C, s, t, q, w, h, nibble
    v = tl.permute(v, (0, 7, 1, 3, 2, 5, 6, 4, 8))                 # G, h, p, s, C, q, w, t, nibble
    return tl.reshape(v, (BN, BK))


@triton.jit
def _load_aw(a_ptr, a_row_off, m_mask, w_ptr, n, n_mask, K, k0, k_hi, stride_wn, stride_wkb,
             BLOCK_K: tl.constexpr, W_ROWS: tl.constexpr, EVEN_K: tl.constexpr, MASK_W: tl.constexpr,
             FRAG: tl.constexpr):
    """The activation tile a [BM, BK] and the packed weight tile of one K step: [BN, BK/2] if W_ROWS
    else [BK/2, BN]; FRAG: n holds stored rows and w is [BN/4, 2BK] (swizzle_fragments). All masked
    off past k_hi (a prefetch beyond the loop's end): vectors, not a scalar, so that every mask has
    its tile's shape."""
    offs_k = tl.arange(0, BLOCK_K)
    kb = k0 // BLOCK_K
    if EVEN_K:
        k_ok = (k0 + offs_k * 0) < k_hi
    else:
        k_ok = ((k0 + offs_k) < K) & ((k0 + offs_k * 0) < k_hi)
    a = tl.load(a_ptr + a_row_off[:, None] + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_ok[None, :],
                other=0.0)
    if FRAG:  # a stored row holds 2 * Kp bytes, Kp = K padded to 64
        offs_c = tl.arange(0, 2 * BLOCK_K)
        c_ok = ((2 * k0 + offs_c) < 2 * ((K + 63) // 64 * 64)) & ((k0 + offs_c * 0) < k_hi)
        w = tl.load(w_ptr + n[:, None] * stride_wn + kb * stride_wkb + offs_c[None, :],
                    mask=n_mask[:, None] & c_ok[None, :], other=0)
    else:
        offs_kh = tl.arange(0, BLOCK_K // 2)
        if MASK_W:  # row layout and K not a multiple of BLOCK_K (k-blocked weights are padded)
            h_ok = ((k0 // 2 + offs_kh) < K // 2) & ((k0 + offs_kh * 0) < k_hi)
        else:
            h_ok = (k0 + offs_kh * 0) < k_hi
        if W_ROWS:
            w_off = n[:, None] * stride_wn + kb * stride_wkb + offs_kh[None, :]  # [BN, BK/2]
            w_mask = n_mask[:, None] & h_ok[None, :]
        else:
            w_off = n[None, :] * stride_wn + kb * stride_wkb + offs_kh[:, None]  # [BK/2, BN]
            w_mask = n_mask[None, :] & h_ok[:, None]
        w = tl.load(w_ptr + w_off, mask=w_mask, other=0)
    return a, w


@triton.jit
def _load_s(ws_ptr, wsh_ptr, n, n_mask, K, k0, k_hi, stride_sn, stride_skb, BLOCK_K: tl.constexpr,
            ACT: tl.constexpr, MASK_W: tl.constexpr, FRAG: tl.constexpr):
    """The weight scales of one K step, [BN, BK/32] (FRAG: [BN/4, BK/8]), and the fp8 shifts (else
    the scales again); masked off past k_hi."""
    kb = k0 // BLOCK_K
    if FRAG:
        offs_f = tl.arange(0, BLOCK_K // 8)
        f_ok = ((k0 // 8 + offs_f) < (K + 63) // 64 * 8) & ((k0 + offs_f * 0) < k_hi)
        ws = tl.load(ws_ptr + n[:, None] * stride_sn + kb * stride_skb + offs_f[None, :],
                     mask=n_mask[:, None] & f_ok[None, :], other=0)
        sh = ws
    else:
        offs_ks = tl.arange(0, BLOCK_K // 32)
        s_off = n[:, None] * stride_sn + kb * stride_skb + offs_ks[None, :]  # [BN, BK/32]
        if MASK_W:
            s_ok = ((k0 // 32 + offs_ks) < K // 32) & ((k0 + offs_ks * 0) < k_hi)
        else:
            s_ok = (k0 + offs_ks * 0) < k_hi
        s_mask = n_mask[:, None] & s_ok[None, :]
        ws = tl.load(ws_ptr + s_off, mask=s_mask, other=0)
        if ACT == 1:
            sh = tl.load(wsh_ptr + s_off, mask=s_mask, other=255)
        else:
            sh = ws
    return ws, sh


@triton.jit
def _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K, k0, k_hi,
            stride_wn, stride_wkb, stride_sn, stride_skb,
            BLOCK_K: tl.constexpr, ACT: tl.constexpr, W_ROWS: tl.constexpr, EVEN_K: tl.constexpr,
            MASK_W: tl.constexpr, FRAG: tl.constexpr):
    """All tiles of one K step: _load_aw's and _load_s's."""
    a, w = _load_aw(a_ptr, a_row_off, m_mask, w_ptr, n, n_mask, K, k0, k_hi, stride_wn, stride_wkb, BLOCK_K,
                    W_ROWS, EVEN_K, MASK_W, FRAG)
    ws, sh = _load_s(ws_ptr, wsh_ptr, n, n_mask, K, k0, k_hi, stride_sn, stride_skb, BLOCK_K, ACT, MASK_W, FRAG)
    return a, w, ws, sh


@triton.jit
def _kstep(acc, a, w, ws, sh, a_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           ACT: tl.constexpr, SWAP: tl.constexpr, DEQ_ASM: tl.constexpr, INTERPRET: tl.constexpr,
           FRAG: tl.constexpr):
    """acc += one K step of A @ W^T (acc is [BN, BM] when SWAP)."""
    if FRAG:  # "fragments" weights (always SWAP): the upcast tile is the MMA's A operand, in registers
        ab = a.to(tl.bfloat16)
        wt = _dequant_fragments(w, ws, BLOCK_N, BLOCK_K, INTERPRET, DEQ_ASM)
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 of bf16 values is exact
            acc += tl.dot(wt.to(tl.float32), tl.trans(ab.to(tl.float32)))
        else:
            acc = tl.dot(wt, tl.trans(ab), acc)
    elif DEQ_ASM:  # "bf16x2"-encoded weights: our upcast in registers, then a bf16 tl.dot
        ab = a.to(tl.bfloat16)
        wt = _dequant_bf16x2(w, ws, BLOCK_N, BLOCK_K, INTERPRET, DEQ_ASM)
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 of bf16 values is exact
            if SWAP:
                acc += tl.dot(wt.to(tl.float32), tl.trans(ab.to(tl.float32)))
            else:
                acc += tl.dot(ab.to(tl.float32), tl.trans(wt.to(tl.float32)))
        else:
            if SWAP:
                acc = tl.dot(wt, tl.trans(ab), acc)
            else:
                acc = tl.dot(ab, tl.trans(wt), acc)
    elif ACT == 0:
        ab = a.to(tl.bfloat16)
        if SWAP:
            acc = tl.dot_scaled(w, ws, "e2m1", tl.trans(ab), None, "bf16", acc, fast_math=True)
        else:
            acc = tl.dot_scaled(ab, None, "bf16", w, ws, "e2m1", acc, fast_math=True)
    elif ACT == 2:
        q, qs = _quant_mxfp8(a.to(tl.float32), BLOCK_M, BLOCK_K, INTERPRET)
        if SWAP:
            acc = tl.dot_scaled(w, ws, "e2m1", tl.trans(q), qs, "e4m3", acc, fast_math=True)
        else:
            acc = tl.dot_scaled(q, qs, "e4m3", w, ws, "e2m1", acc, fast_math=True)
    else:
        q = _quant_fp8_rows(a.to(tl.float32), a_scale, INTERPRET)
        # the shift rides in the scales' slot; 2^(20-d), or 0 for blocks past the e4m3 range
        shi = sh.to(tl.int32)
        mult = tl.where(shi <= 14, ((147 - tl.minimum(shi, 14)) << 23).to(tl.float32, bitcast=True), 0.0)
        wq = _mxfp4_to_e4m3(w, mult, BLOCK_N, BLOCK_K)
        if INTERPRET:  # the interpreter's fp8 tl.dot is wrong; fp32 of e4m3 values is exact
            if SWAP:
                acc += tl.dot(wq.to(tl.float32), tl.trans(q.to(tl.float32)))
            else:
                acc += tl.dot(q.to(tl.float32), tl.trans(wq.to(tl.float32)))
        else:
            if SWAP:
                acc = tl.dot(wq, tl.trans(q), acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(q, tl.trans(wq), acc, max_num_imprecise_acc=BLOCK_K)
    return acc


@triton.jit
def _mainloop(a_ptr, a_row_off, m_mask, a_scale, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K, k_lo, k_hi,
              stride_wn, stride_wkb, stride_sn, stride_skb,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACT: tl.constexpr,
              SWAP: tl.constexpr, EVEN_K: tl.constexpr, MASK_W: tl.constexpr, DEQ_ASM: tl.constexpr,
              PREFETCH: tl.constexpr, INTERPRET: tl.constexpr, FRAG: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 = A[rows, k_lo:k_hi] @ W[n, k_lo:k_hi]^T (fp8: without the scales).

    PREFETCH 1 / 2: the loads of the next one / two K steps are issued before this step's math, in
    registers (decode: few programs per SM, each waiting on DRAM otherwise)."""
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    W_ROWS: tl.constexpr = ACT == 1 or SWAP or DEQ_ASM
    if PREFETCH == 0 and FRAG:
        # Triton pipelines the a / w tiles through shared memory (num_stages) but leaves the scale
        # loads in the loop, waiting on DRAM each step: they are loaded one step ahead instead
        # (H100, 20b layer: 7-19% off both GEMMs at 1-2048 tokens; the row layout's kernels got
        # slower with the same change at 8-64 tokens, so they keep the plain loop)
        ws_n, sh_n = _load_s(ws_ptr, wsh_ptr, n, n_mask, K, k_lo, k_hi, stride_sn, stride_skb, BLOCK_K, ACT,
                             MASK_W, FRAG)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ws = ws_n
            sh = sh_n
            ws_n, sh_n = _load_s(ws_ptr, wsh_ptr, n, n_mask, K, k0 + BLOCK_K, k_hi, stride_sn, stride_skb,
                                 BLOCK_K, ACT, MASK_W, FRAG)
            a, w = _load_aw(a_ptr, a_row_off, m_mask, w_ptr, n, n_mask, K, k0, k_hi, stride_wn, stride_wkb,
                            BLOCK_K, W_ROWS, EVEN_K, MASK_W, FRAG)
            acc = _kstep(acc, a, w, ws, sh, a_scale, BLOCK_M, BLOCK_N, BLOCK_K, ACT, SWAP, DEQ_ASM, INTERPRET, FRAG)
    elif PREFETCH == 0:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a, w, ws, sh = _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K, k0, k_hi,
                                   stride_wn, stride_wkb, stride_sn, stride_skb, BLOCK_K, ACT, W_ROWS,
                                   EVEN_K, MASK_W, FRAG)
            acc = _kstep(acc, a, w, ws, sh, a_scale, BLOCK_M, BLOCK_N, BLOCK_K, ACT, SWAP, DEQ_ASM, INTERPRET, FRAG)
    elif PREFETCH == 1:
        a, w, ws, sh = _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K, k_lo, k_hi,
                               stride_wn, stride_wkb, stride_sn, stride_skb, BLOCK_K, ACT, W_ROWS, EVEN_K, MASK_W, FRAG)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a1, w1, ws1, sh1 = _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K,
                                       k0 + BLOCK_K, k_hi, stride_wn, stride_wkb, stride_sn, stride_skb,
                                       BLOCK_K, ACT, W_ROWS, EVEN_K, MASK_W, FRAG)
            acc = _kstep(acc, a, w, ws, sh, a_scale, BLOCK_M, BLOCK_N, BLOCK_K, ACT, SWAP, DEQ_ASM, INTERPRET, FRAG)
            a, w, ws, sh = a1, w1, ws1, sh1
    else:
        a, w, ws, sh = _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K, k_lo, k_hi,
                               stride_wn, stride_wkb, stride_sn, stride_skb, BLOCK_K, ACT, W_ROWS, EVEN_K, MASK_W, FRAG)
        a1, w1, ws1, sh1 = _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K,
                                   k_lo + BLOCK_K, k_hi, stride_wn, stride_wkb, stride_sn, stride_skb,
                                   BLOCK_K, ACT, W_ROWS, EVEN_K, MASK_W, FRAG)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a2, w2, ws2, sh2 = _load_k(a_ptr, a_row_off, m_mask, w_ptr, ws_ptr, wsh_ptr, n, n_mask, K,
                                       k0 + 2 * BLOCK_K, k_hi, stride_wn, stride_wkb, stride_sn, stride_skb,
                                       BLOCK_K, ACT, W_ROWS, EVEN_K, MASK_W, FRAG)
            acc = _kstep(acc, a, w, ws, sh, a_scale, BLOCK_M, BLOCK_N, BLOCK_K, ACT, SWAP, DEQ_ASM, INTERPRET, FRAG)
            a, w, ws, sh = a1, w1, ws1, sh1
            a1, w1, ws1, sh1 = a2, w2, ws2, sh2
    if SWAP:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _row_scale(amax_ptr, amax_row, m_mask, n_amax, NA_PAD: tl.constexpr):
    """Per-row fp8 scale amax/448 (floored like quantize_fp8) from n_amax partial maxima per row."""
    c = tl.arange(0, NA_PAD)
    am = tl.load(amax_ptr + amax_row[:, None] * n_amax + c[None, :],
                 mask=m_mask[:, None] & (c[None, :] < n_amax), other=0.0)
    return tl.maximum(tl.math.div_rn(tl.max(am, axis=1), 448.0), 1.1754943508222875e-38)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _swiglu_store(acc, rows, m_mask, n, n_mask, e64, pid_n, b_ptr, a_ptr, a_amax_ptr, N, n_tiles_n, alpha, limit,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr):
    """acc [BM, BN] fp32 gate_up rows (without bias) -> bias, clamped SwiGLU, a [rows, I] (and, for
    "fp8", this tile's row maxima of |a|)."""
    acc += tl.load(b_ptr + e64 * N + n, mask=n_mask, other=0.0)[None, :]
    # weight rows alternate gate, up: split the interleaved columns
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = _store_cast(gate * tl.sigmoid(alpha * gate) * (up + 1.0), a_ptr, INTERPRET)
    I = N // 2
    j = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask = m_mask[:, None] & (j < I)[None, :]
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * I + j[None, :], act, mask=mask)
    if ACT == 1:
        am = tl.max(tl.where(mask, tl.abs(act.to(tl.float32)), 0.0), axis=1)
        tl.store(a_amax_ptr + rows * n_tiles_n + pid_n, am, mask=m_mask)


@triton.jit
def _weight_rows(n, n_mask, pid_n, N, BLOCK_N: tl.constexpr, FRAG: tl.constexpr):
    """The weight rows an N tile loads: n itself, or ("fragments") its BLOCK_N / 4 stored rows, each
    holding 4 rows of one 16-row group (N is a multiple of 16)."""
    # one return statement: Triton's code generator wants every return of a function to agree
    if FRAG:
        rows = pid_n * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
        rows_mask = 4 * rows < N
    else:
        rows = n
        rows_mask = n_mask
    return rows, rows_mask


@triton.jit
def _tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m, BLOCK_M: tl.constexpr):
    """(local expert, its rows in grouped order, their mask) of an M tile; expert -1: an unused tile."""
    e = tl.load(tile_expert_ptr + pid_m)
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + tl.maximum(e, 0) + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end


@triton.jit
def _inline_rows(e, pid_m, expert_start, E_LOCAL, BLOCK_M: tl.constexpr):
    """inline_routing: M tile j = pid_m is the token's j-th expert e (global id; -1 if not local) with
    the one row j."""
    e = e - expert_start
    e = tl.where((e >= 0) & (e < E_LOCAL), e, -1)
    return e, pid_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_M) == 0


@triton.jit
def _ranked_pick(lg, rank, ids_ptr, w_ptr, pid_m, store, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
                 K_PAD: tl.constexpr):
    """The expert of rank pid_m, given every expert's logit lg [E_PAD] and rank (the experts ahead of
    it); store: also write the token's topk_ids / topk_weights (its softmax)."""
    offs = tl.arange(0, E_PAD)
    if store:
        sel = rank[:, None] == tl.arange(0, K_PAD)[None, :]  # [E_PAD, K_PAD]
        _store_token_topk(tl.sum(tl.where(sel, offs[:, None], 0), axis=0),
                          tl.sum(tl.where(sel, lg[:, None], 0.0), axis=0), ids_ptr, w_ptr, TOP_K, K_PAD)
    return tl.sum(tl.where(rank == pid_m, offs, 0), axis=0)


@triton.jit
def _store_token_topk(ids, vals, ids_ptr, w_ptr, TOP_K: tl.constexpr, K_PAD: tl.constexpr):
    """One token's topk_ids / topk_weights (the softmax of vals) from its k experts and logits [K_PAD]:
    through the routing kernel's [2, K_PAD] tiles (row 1 padding), its weights and its store."""
    row0 = tl.arange(0, 2)[:, None] == 0
    _store_topk(tl.where(row0, ids[None, :], 0),
                _topk_weights(tl.where(row0, vals[None, :], float("-inf")), TOP_K, K_PAD),
                ids_ptr, w_ptr, 1, 0, 2, TOP_K, K_PAD)


@triton.jit
def _inline_topk(logits_ptr, ids_ptr, w_ptr, E, pid_m, store, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
                 K_PAD: tl.constexpr):
    """The one token's j-th expert (j = pid_m) in the routing kernel's order (the larger logit first,
    the lower index on ties); store: also write the token's topk_ids / topk_weights (its softmax).

    Up to 32 experts by ranks: expert e's rank counts the experts ahead of it, so the j-th expert is
    the one of rank j. The logits come in one at a time as scalars (one L1 line), so the ranks take
    no reduction and the pick one, where the routing kernel's top-k takes two a pick. On an H100 a
    one-token gate_up (20b) took 0.3 us more than with its routing given, against 0.7; with 128
    experts the unrolled scalar loop took 7.9 us more against 2.3, so more experts keep the
    reductions."""
    if E_PAD <= 32:
        offs = tl.arange(0, E_PAD)
        lg = tl.load(logits_ptr + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
        rank = tl.zeros((E_PAD,), tl.int32)  # a padding expert's (-inf, behind all E) comes out >= E
        for f in tl.static_range(E_PAD):
            lf = tl.load(logits_ptr + f, mask=f < E, other=float("-inf")).to(tl.float32)
            rank += ((lf > lg) | ((lf == lg) & (f < offs))).to(tl.int32)
        e = _ranked_pick(lg, rank, ids_ptr, w_ptr, pid_m, store, TOP_K, E_PAD, K_PAD)
    else:
        ids, w = _topk_softmax(logits_ptr, 0, 1, E, 0, 2, E_PAD, TOP_K, K_PAD)  # [2, K_PAD], row 1 padding
        if store:
            _store_topk(ids, w, ids_ptr, w_ptr, 1, 0, 2, TOP_K, K_PAD)
        sel = (tl.arange(0, 2)[:, None] == 0) & (tl.arange(0, K_PAD)[None, :] == pid_m)
        e = tl.sum(tl.sum(tl.where(sel, ids, 0), axis=1), axis=0)
    return e


@triton.jit
def _gate_up_kernel(x_ptr, stride_xt, a_ptr, a_amax_ptr, x_amax_ptr, h_ptr, count_ptr, zero_ptr, n_zero, zero_chunk,
                    w_ptr, ws_ptr, wsh_ptr, wrs_ptr, b_ptr,
                    sorted_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                    logits_ptr, ids_ptr, topk_w_ptr, E, expert_start, E_LOCAL,
                    K, N, n_tiles_n, k_per_split,
                    stride_we, stride_wn, stride_wkb, stride_se, stride_sn, stride_skb,
                    alpha, limit,
                    INLINE: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACT: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr, MASK_W: tl.constexpr,
                    DEQ_ASM: tl.constexpr, PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr,
                    INTERPRET: tl.constexpr, FRAG: tl.constexpr, PDL: tl.constexpr,
                    ZERO: tl.constexpr):
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if ZERO:  # the down GEMM's float32 output, which its atomics add into: each program zeroes a slice
        z0 = ((pid_m * n_tiles_n + pid_n) * SPLIT_K + pid_k) * zero_chunk
        for z in range(z0, z0 + zero_chunk, 1024):
            offs = z + tl.arange(0, 1024)
            tl.store(zero_ptr + offs, tl.zeros((1024,), tl.float32), mask=(offs < n_zero) & (offs < z0 + zero_chunk))
    if INLINE:  # one token, no routing kernel before: each program finds its expert; one stores them all
        first = (pid_m == 0) & (pid_n == 0) & (pid_k == 0)
        e = _inline_topk(logits_ptr, ids_ptr, topk_w_ptr, E, pid_m, first, TOP_K, E_PAD, K_PAD)
        e, rows, m_mask = _inline_rows(e, pid_m, expert_start, E_LOCAL, BLOCK_M)
    else:
        e, rows, m_mask = _tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m, BLOCK_M)
    if e < 0:
        return
    tok = tl.load(sorted_ptr + rows, mask=m_mask, other=0) // TOP_K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n_w, n_w_mask = _weight_rows(n, n_mask, pid_n, N, BLOCK_N, FRAG)
    e64 = e.to(tl.int64)
    a_scale = tl.zeros((BLOCK_M,), tl.float32)
    if ACT == 1:
        a_scale = _row_scale(x_amax_ptr, tok, m_mask, 1, 2)
    k_lo = pid_k * k_per_split
    acc = _mainloop(x_ptr, tok.to(tl.int64) * stride_xt, m_mask, a_scale,
                    w_ptr + e64 * stride_we, ws_ptr + e64 * stride_se, wsh_ptr + e64 * stride_se,
                    n_w, n_w_mask, K, k_lo, tl.minimum(k_lo + k_per_split, K), stride_wn, stride_wkb, stride_sn,
                    stride_skb, BLOCK_M, BLOCK_N, BLOCK_K, ACT, SWAP, EVEN_K, MASK_W, DEQ_ASM, PREFETCH, INTERPRET,
                    FRAG)
    if ACT == 1:
        acc = acc * a_scale[:, None] * tl.load(wrs_ptr + e64 * N + n, mask=n_mask, other=0.0)[None, :]
    if SPLIT_K > 1:
        # partial sums over K meet in h [rows, N] (fp32, zeroed); the tile's last split to arrive
        # applies bias + SwiGLU (no second kernel): every thread's adds are issued before the barrier,
        # the counter's acq_rel add publishes them (CTA barrier + gpu-scope release) and lets the
        # last arriver read the finished sums from L2. It then clears what it read (sums and
        # counter), so the workspace is zero again for the next call without a memset.
        mask = m_mask[:, None] & n_mask[None, :]
        h_tile = h_ptr + rows.to(tl.int64)[:, None] * N + n[None, :]
        tl.atomic_add(h_tile, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        count = count_ptr + pid_m * n_tiles_n + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.load(h_tile, mask=mask, other=0.0, cache_modifier=".cg")
            # a layout may give one element to two threads: all reads land before any clearing
            tl.debug_barrier()
            tl.store(h_tile, tl.zeros_like(acc), mask=mask)
            tl.store(count, 0)
            _swiglu_store(acc, rows, m_mask, n, n_mask, e64, pid_n, b_ptr, a_ptr, a_amax_ptr, N, n_tiles_n,
                          alpha, limit, BLOCK_M, BLOCK_N, ACT, INTERPRET)
    else:
        _swiglu_store(acc, rows, m_mask, n, n_mask, e64, pid_n, b_ptr, a_ptr, a_amax_ptr, N, n_tiles_n, alpha,
                      limit, BLOCK_M, BLOCK_N, ACT, INTERPRET)


@triton.jit
def _down_kernel(a_ptr, a_amax_ptr, n_amax, out_ptr,
                 w_ptr, ws_ptr, wsh_ptr, wrs_ptr, b_ptr, topk_w_ptr,
                 sorted_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, ids_ptr, expert_start, E_LOCAL,
                 K, N, k_per_split,
                 stride_we, stride_wn, stride_wkb, stride_se, stride_sn, stride_skb,
                 INLINE: tl.constexpr,
                 TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACT: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr, MASK_W: tl.constexpr,
                 DEQ_ASM: tl.constexpr, PREFETCH: tl.constexpr, HAS_BIAS: tl.constexpr,
                 FUSED_COMBINE: tl.constexpr, NA_PAD: tl.constexpr, INTERPRET: tl.constexpr,
                 FRAG: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if INLINE:  # the expert moe_gate_up found for tile j
        e, rows, m_mask = _inline_rows(tl.load(ids_ptr + pid_m), pid_m, expert_start, E_LOCAL, BLOCK_M)
    else:
        e, rows, m_mask = _tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m, BLOCK_M)
    if e < 0:
        return
    assign = tl.load(sorted_ptr + rows, mask=m_mask, other=0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n_w, n_w_mask = _weight_rows(n, n_mask, pid_n, N, BLOCK_N, FRAG)
    e64 = e.to(tl.int64)
    a_scale = tl.zeros((BLOCK_M,), tl.float32)
    if ACT == 1:
        a_scale = _row_scale(a_amax_ptr, rows, m_mask, n_amax, NA_PAD)
    k_lo = pid_k * k_per_split
    acc = _mainloop(a_ptr, rows.to(tl.int64) * K, m_mask, a_scale,
                    w_ptr + e64 * stride_we, ws_ptr + e64 * stride_se, wsh_ptr + e64 * stride_se,
                    n_w, n_w_mask, K, k_lo, tl.minimum(k_lo + k_per_split, K), stride_wn, stride_wkb,
                    stride_sn, stride_skb, BLOCK_M, BLOCK_N, BLOCK_K, ACT, SWAP, EVEN_K, MASK_W, DEQ_ASM,
                    PREFETCH, INTERPRET, FRAG)
    if ACT == 1:
        acc = acc * a_scale[:, None] * tl.load(wrs_ptr + e64 * N + n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + e64 * N + n, mask=n_mask, other=0.0)[None, :]
    acc = acc * tl.load(topk_w_ptr + assign, mask=m_mask, other=0.0)[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    if FUSED_COMBINE:
        tok = assign // TOP_K
        tl.atomic_add(out_ptr + tok.to(tl.int64)[:, None] * N + n[None, :], acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + assign.to(tl.int64)[:, None] * N + n[None, :],
                 _store_cast(acc, out_ptr, INTERPRET), mask=mask)


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, N, expert_start, E_LOCAL,
                    TOP_K: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_mask = n < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOP_K):
        loc = tl.load(ids_ptr + t * TOP_K + j) - expert_start + tl.zeros((BLOCK,), tl.int32)
        ok = n_mask & (loc >= 0) & (loc < E_LOCAL)  # another rank's expert wrote no row
        acc += tl.load(y_ptr + (t * TOP_K + j).to(tl.int64) * N + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * N + n, _store_cast(acc, out_ptr, INTERPRET), mask=n_mask)


@triton.jit
def _row_absmax_kernel(x_ptr, stride_xt, out_ptr, N, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    am = tl.zeros((BLOCK,), tl.float32)
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + t.to(tl.int64) * stride_xt + n, mask=n < N, other=0.0).to(tl.float32)
        am = tl.maximum(am, tl.abs(x))
    tl.store(out_ptr + t, tl.max(am, axis=0))


# the interpreter (TRITON_INTERPRET=1 before this module was imported) runs the kernels on CPU tensors
INTERPRETED = type(_gate_up_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------- wrappers


def _check_gemm(x: torch.Tensor, w: MXFP4Weight, opts: GemmOptions, act: str, who: str) -> None:
    if act not in ACTS:
        raise ValueError(f"{who}: act={act!r}; choose one of {sorted(ACTS)}")
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] != w.k:
        raise ValueError(f"{who}: activations {tuple(x.shape)} (strides {x.stride()}) do not match a "
                         f"weight with K={w.k}; rows must be contiguous")
    bk = opts.block_k
    if bk < 32 or bk & (bk - 1) or opts.block_n < 16 or opts.block_n & (opts.block_n - 1):
        raise ValueError(f"{who}: block_k={bk} / block_n={opts.block_n} must be powers of two (>= 32 / >= 16)")
    if w.block_k and w.block_k != bk:
        raise ValueError(f"{who}: the weight is laid out for block_k={w.block_k}, the options ask for {bk}")
    if act == "fp8" and w.fp8_shift is None:
        raise ValueError(f"{who}: act='fp8' needs a weight prepared with fp8=True")
    if w.encoding == "bf16x2" and act != "bf16":
        raise ValueError(f"{who}: a 'bf16x2'-encoded weight serves act='bf16' only, got {act!r}")
    if w.fragments:
        if not opts.swap_ab or bk % 64:  # (block_n >= 16 is checked above for every weight)
            raise ValueError(f"{who}: a 'fragments' weight needs swap_ab=True and block_k a "
                             f"multiple of 64 (got {opts})")
    elif w.encoding == "bf16x2" and opts.swap_ab:
        # measured wrong on H100 / Triton 3.6: with the weights as the MMA's A operand, Triton moves
        # the dot-operand layout above the inline asm, whose 4-byte packs then mix unrelated bytes
        # (the "fragments" layout stores each lane's bytes together instead)
        raise ValueError(f"{who}: swap_ab with 'bf16x2'-encoded weights needs the fragments layout")
    if opts.prefetch not in (0, 1, 2):
        raise ValueError(f"{who}: prefetch={opts.prefetch} must be 0, 1 or 2")


def _check_rows(routing: Routing, who: str) -> None:
    # tl.dot takes at least 16 rows
    if routing.block_m < 16:
        raise ValueError(f"{who}: routing block_m={routing.block_m}; the MMA path needs >= 16")


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> float32 [T]: max |x| per row."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        block = min(4096, triton.next_power_of_2(x.shape[1]))
        _row_absmax_kernel[(x.shape[0],)](x, x.stride(0), out, x.shape[1], BLOCK=block, num_warps=4)
    return out


def row_absmax_torch(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(-1) if x.shape[0] else torch.empty(0, device=x.device)


def _k_splits(K: int, opts: GemmOptions) -> tuple[int, int]:
    """(programs along K, K per program): opts.split_k, at most one per block_k step."""
    n_k_blocks = triton.cdiv(K, opts.block_k)
    split = max(1, min(opts.split_k, n_k_blocks))
    return split, triton.cdiv(n_k_blocks, split) * opts.block_k


def gate_up_workspace_size(routing: Routing, w: MXFP4Weight, opts: GemmOptions) -> int:
    """float32 elements of workspace moe_gate_up needs (0 without split-K): the partial sums [T*k, N]
    and one arrival counter per output tile. Zero on entry, and moe_gate_up leaves it zero."""
    if _k_splits(w.k, opts)[0] == 1:
        return 0
    return routing.num_tokens * routing.top_k * w.n + routing.max_tiles * triton.cdiv(w.n, opts.block_n)


def moe_gate_up(x: torch.Tensor, routing: Routing, w: MXFP4Weight, bias: torch.Tensor, act: str,
                alpha: float, limit: float, opts: GemmOptions, x_amax: torch.Tensor | None = None,
                workspace: torch.Tensor | None = None, zero: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, H] -> (a [T*k, I] in x.dtype, rows in routing's grouped order (inline_routing: row j the
    token's j-th expert, and topk_ids / topk_weights filled in); for "fp8" also per-tile
    maxima of |a| [T*k, n_tiles] float32, else None). bias [E, 2I] float32; x_amax [T] for "fp8".
    workspace: float32 of at least gate_up_workspace_size elements, zero on entry and left zero (None:
    allocated here), so that a caller can keep one instead of zeroing memory every call. zero: a
    contiguous float32 tensor the kernel zeroes on the way (moe_down's fused-combine output)."""
    _check_gemm(x, w, opts, act, "moe_gate_up")
    _check_rows(routing, "moe_gate_up")
    if opts.block_n < 32 or opts.split_k < 1:
        raise ValueError(f"moe_gate_up: block_n={opts.block_n} must be >= 32 (gate/up pairs) and "
                         f"split_k={opts.split_k} >= 1")
    if act == "fp8" and x_amax is None:
        raise ValueError("moe_gate_up: act='fp8' needs x_amax (row_absmax(x))")
    N, K, R = w.n, w.k, routing.num_tokens * routing.top_k
    a = torch.empty(R, N // 2, dtype=x.dtype, device=x.device)
    n_tiles_n = triton.cdiv(N, opts.block_n)
    a_amax = torch.empty(R, n_tiles_n, dtype=torch.float32, device=x.device) if act == "fp8" else None
    if R == 0:
        return a, a_amax
    strides = w.strides(opts.block_k)
    dummy = w.scales
    split, k_per_split = _k_splits(K, opts)
    h = count = a  # placeholders without split-K
    if split > 1:
        need = gate_up_workspace_size(routing, w, opts)
        if workspace is None:
            workspace = torch.zeros(need, dtype=torch.float32, device=x.device)
        elif workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous():
            raise ValueError(f"moe_gate_up: workspace needs {need} contiguous float32 elements, got "
                             f"{workspace.numel()} {workspace.dtype}")
        h = workspace[:R * N]
        count = workspace[R * N:need].view(torch.int32)
    amax_or_a = a_amax if a_amax is not None else a
    lg = routing.logits  # inline_routing: this kernel routes the token itself
    n_experts = lg.shape[1] if lg is not None else 1
    grid = (routing.max_tiles, n_tiles_n, split)
    if zero is not None and (zero.dtype != torch.float32 or not zero.is_contiguous()):
        raise ValueError(f"moe_gate_up: zero must be a contiguous float32 tensor, got {zero.dtype}")
    n_zero = zero.numel() if zero is not None else 0
    zero_chunk = triton.cdiv(triton.cdiv(n_zero, grid[0] * grid[1] * grid[2]), 4) * 4
    _gate_up_kernel[grid](
        x, x.stride(0), a, amax_or_a, x_amax if x_amax is not None else a, h, count,
        zero if zero is not None else h, n_zero, zero_chunk,
        w.data, w.scales, w.fp8_shift if act == "fp8" else dummy,
        w.fp8_row_scale if act == "fp8" else bias, bias,
        routing.sorted_assign, routing.expert_offsets, routing.tile_expert, routing.tile_row,
        lg if lg is not None else routing.topk_weights, routing.topk_ids, routing.topk_weights,
        n_experts, routing.expert_start, routing.num_local_experts,
        K, N, n_tiles_n, k_per_split, *strides, float(alpha), float(limit),
        INLINE=lg is not None, E_PAD=triton.next_power_of_2(n_experts),
        K_PAD=triton.next_power_of_2(routing.top_k),
        TOP_K=routing.top_k, BLOCK_M=routing.block_m, BLOCK_N=opts.block_n, BLOCK_K=opts.block_k,
        ACT=ACTS[act], SWAP=opts.swap_ab, EVEN_K=K % opts.block_k == 0,
        MASK_W=not w.block_k and K % opts.block_k != 0, DEQ_ASM=w.upcast_mode,
        PREFETCH=opts.prefetch, SPLIT_K=split, FRAG=w.fragments, ZERO=n_zero > 0,
        INTERPRET=INTERPRETED, **opts.launch_options(), **pdl.args())
    return a, a_amax


def moe_down(a: torch.Tensor, a_amax: torch.Tensor | None, routing: Routing, w: MXFP4Weight,
             bias: torch.Tensor | None, act: str, opts: GemmOptions, expert_start: int,
             num_local_experts: int, fused_combine: bool, out_dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """a [T*k, I] (grouped order) -> out [T, H] in out_dtype: sum over each token's local experts of
    routing weight * (a @ W2^T + b2). bias None: no down bias (a TP rank other than the first).
    fused_combine: the GEMM adds into a float32 output with atomics (split_k allowed); else it writes
    weighted rows [T*k, H] and a combine kernel sums each token's k rows (deterministic). out (with
    fused_combine): a zeroed float32 [T, H] to add into (None: allocated here); out_dtype float32
    then returns it as it is, without a cast."""
    _check_gemm(a, w, opts, act, "moe_down")
    _check_rows(routing, "moe_down")
    if opts.split_k > 1 and not fused_combine:
        raise ValueError("moe_down: split_k > 1 needs fused_combine")
    if act == "fp8" and a_amax is None:
        raise ValueError("moe_down: act='fp8' needs a_amax from moe_gate_up")
    T, k = routing.num_tokens, routing.top_k
    N, K = w.n, w.k
    dev = a.device
    if fused_combine:
        if out is None:
            out = torch.zeros(T, N, dtype=torch.float32, device=dev)
        elif out.shape != (T, N) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"moe_down: out must be a contiguous float32 {(T, N)}, got "
                             f"{tuple(out.shape)} {out.dtype}")
    elif out is not None:
        raise ValueError("moe_down: out is for fused_combine")
    else:
        out = torch.empty(T * k, N, dtype=out_dtype, device=dev)
    if T:
        split, k_per_split = _k_splits(K, opts)
        n_amax = a_amax.shape[1] if a_amax is not None else 1
        strides = w.strides(opts.block_k)
        _down_kernel[(routing.max_tiles, triton.cdiv(N, opts.block_n), split)](
            a, a_amax if a_amax is not None else a, n_amax, out,
            w.data, w.scales, w.fp8_shift if act == "fp8" else w.scales,
            w.fp8_row_scale if act == "fp8" else a, bias if bias is not None else a, routing.topk_weights,
            routing.sorted_assign, routing.expert_offsets, routing.tile_expert, routing.tile_row,
            routing.topk_ids, routing.expert_start, routing.num_local_experts,
            K, N, k_per_split, *strides,
            INLINE=routing.logits is not None,
            TOP_K=k, BLOCK_M=routing.block_m, BLOCK_N=opts.block_n, BLOCK_K=opts.block_k,
            ACT=ACTS[act], SWAP=opts.swap_ab, EVEN_K=K % opts.block_k == 0,
            MASK_W=not w.block_k and K % opts.block_k != 0, DEQ_ASM=w.upcast_mode, PREFETCH=opts.prefetch,
            HAS_BIAS=bias is not None, FUSED_COMBINE=fused_combine,
            NA_PAD=max(2, triton.next_power_of_2(n_amax)), INTERPRET=INTERPRETED, FRAG=w.fragments,
            **opts.launch_options(), **pdl.args())
    if fused_combine:
        return out.to(out_dtype)
    return moe_combine(out, routing, expert_start, num_local_experts, out_dtype)


def moe_combine(y: torch.Tensor, routing: Routing, expert_start: int, num_local_experts: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """y [T*k, H] weighted expert outputs by assignment -> [T, H]: each token's local rows summed."""
    T, k = routing.num_tokens, routing.top_k
    N = y.shape[1]
    out = torch.empty(T, N, dtype=out_dtype, device=y.device)
    if T:
        block = min(1024, triton.next_power_of_2(N))
        _combine_kernel[(T, triton.cdiv(N, block))](y, routing.topk_ids, out, N, expert_start,
                                                     num_local_experts, TOP_K=k, BLOCK=block,
                                                     INTERPRET=INTERPRETED, num_warps=4)
    return out


# ----------------------------------------------------------------------------- torch twins


def _grouped_rows(routing: Routing):
    """(rows per local expert as (expert, first row, end row)) from the offsets (host sync)."""
    if routing.logits is not None:
        raise ValueError("the torch twins take moe_routing's grouped rows, not inline_routing")
    off = routing.expert_offsets.tolist()
    return [(e, off[e], off[e + 1]) for e in range(len(off) - 1) if off[e + 1] > off[e]]


def _quant_act_torch(x: torch.Tensor, act: str, amax: torch.Tensor | None) -> torch.Tensor:
    """The activations as the kernels feed them to the MMA, in float32 (fp8: quantize_fp8's per-token
    scale, the quotient taken as x * (1/scale) like the kernels)."""
    if act == "bf16":
        return x.to(torch.bfloat16).float()
    if act == "mxfp8":
        return dequantize_mxfp8(*quantize_mxfp8(x.float()), torch.float32)
    scale = (amax.float().unsqueeze(-1) / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = (x.float() * (1.0 / scale)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)  # as the kernels do
    return q.float() * scale


def _weight_torch(w: MXFP4Weight, act: str) -> torch.Tensor:
    if act == "fp8":
        return _fp8_weight_torch(w)
    return dequantize_mxfp4(*w.checkpoint_layout(), torch.float32)


def moe_gate_up_torch(x: torch.Tensor, routing: Routing, w: MXFP4Weight, bias: torch.Tensor, act: str,
                      alpha: float, limit: float, opts: GemmOptions, x_amax: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Twin of moe_gate_up (a_amax: the row maxima in column 0, the other columns zero)."""
    R = routing.num_tokens * routing.top_k
    a = torch.zeros(R, w.n // 2, dtype=x.dtype, device=x.device)
    wf = _weight_torch(w, act)
    tok_all = (routing.sorted_assign.long() // routing.top_k)
    for e, r0, r1 in _grouped_rows(routing):
        tok = tok_all[r0:r1]
        xq = _quant_act_torch(x[tok], act, x_amax[tok] if x_amax is not None else None)
        h = xq @ wf[e].T + bias[e].float()
        gate = h[:, 0::2].clamp(max=limit)
        up = h[:, 1::2].clamp(-limit, limit)
        a[r0:r1] = (gate * torch.sigmoid(alpha * gate) * (up + 1)).to(x.dtype)
    a_amax = None
    if act == "fp8":
        a_amax = torch.zeros(R, triton.cdiv(w.n, opts.block_n), dtype=torch.float32, device=x.device)
        a_amax[:, 0] = a.float().abs().amax(-1) if R else 0
    return a, a_amax


def moe_down_torch(a: torch.Tensor, a_amax: torch.Tensor | None, routing: Routing, w: MXFP4Weight,
                   bias: torch.Tensor | None, act: str, opts: GemmOptions, expert_start: int,
                   num_local_experts: int, fused_combine: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Twin of moe_down."""
    T, k = routing.num_tokens, routing.top_k
    out = torch.zeros(T, w.n, dtype=torch.float32, device=a.device)
    wf = _weight_torch(w, act)
    assign = routing.sorted_assign.long()
    for e, r0, r1 in _grouped_rows(routing):
        am = a_amax[r0:r1].amax(-1) if a_amax is not None else None
        y = _quant_act_torch(a[r0:r1], act, am) @ wf[e].T
        if bias is not None:
            y = y + bias[e].float()
        asg = assign[r0:r1]
        y = y * routing.topk_weights.flatten()[asg].unsqueeze(-1)
        if not fused_combine:  # the weighted rows pass through out_dtype on their way to the combine
            y = y.to(out_dtype).float()
        out.index_add_(0, asg // k, y)
    return out.to(out_dtype)


def moe_combine_torch(y: torch.Tensor, routing: Routing, expert_start: int, num_local_experts: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    T, k = routing.num_tokens, routing.top_k
    loc = routing.topk_ids.long() - expert_start
    local = ((loc >= 0) & (loc < num_local_experts)).reshape(T * k, 1)
    yy = torch.where(local, y.float(), torch.zeros((), device=y.device))
    return yy.reshape(T, k, -1).sum(1).to(out_dtype)
