"""@triton.jit bodies of the paged-attention kernels; the wrappers live in attention.py.

Softmax runs in base 2: scores are scaled by sm_scale * log2(e) and sinks by log2(e). fp8 caches hold
codes whose value is code * scale (one float32 scale amax / 448 per token and head): the codes go
into tl.dot converted to the dot dtype (exact: e4m3 is a subset of fp16 and bf16), the K scale
multiplies the score columns and the V scale the probability columns (divided by the tile's largest V
scale, which multiplies the tile's P @ V), so no tile is ever dequantized element by element.

DOT picks the tl.dot operand dtype: DOT_Q (q's dtype), DOT_F16 (fp8 caches: e4m3 -> fp16 is one
instruction per pair on sm_89+, -> bf16 several; q is pre-scaled by qk_scale so that it fits fp16),
DOT_F32 (the interpreter, whose tl.dot on bf16 returns garbage).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import pdl_enter, pdl_trigger

LOG2E = 1.4426950408889634
DOT_Q, DOT_F16, DOT_F32 = 0, 1, 2


@triton.jit
def _fp8_scale(amax):
    # amax / 448, IEEE-rounded like torch's division (bit-exact twin: attention_torch.fp8_scale_torch)
    return tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)


@triton.jit
def _round_e4m3(x):
    # x (|x| <= 448) rounded to the float8_e4m3fn grid, ties to even, in fp32, so that the cast that
    # follows is exact. The hardware cast rounds the same way; Triton's interpreter does not (it
    # rounds ties up and drops the carry into the exponent: 31.6 -> 16), and one path serves both.
    bits = x.to(tl.int32, bitcast=True)
    mbits = bits & 0x7FFFFFFF
    normal = (mbits + 0x7FFFF + ((mbits >> 20) & 1)) & -1048576  # keep 3 mantissa bits
    mag = tl.abs(x)
    sub = (((mag * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)).to(tl.int32, bitcast=True)
    r = tl.where(mag < 0.015625, sub, normal) | (bits & -2147483648)  # subnormals: multiples of 2^-9
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _load_halves(ptr, rows, mask, D: tl.constexpr):
    # a [rows, D] tile as its two halves [rows, D/2] (the halves rotary embedding pairs up)
    d2 = tl.arange(0, D // 2)
    x1 = tl.load(ptr + rows[:, None] + d2[None, :], mask=mask, other=0.0)
    x2 = tl.load(ptr + rows[:, None] + D // 2 + d2[None, :], mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _rotate(x1, x2, c, s, out_ty):
    # (x1, x2) rotated by (cos, sin) [D/2] in fp32, rounded once to the activation dtype (as the twin)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return ((x1 * c[None, :] - x2 * s[None, :]).to(out_ty),
            (x2 * c[None, :] + x1 * s[None, :]).to(out_ty))


@triton.jit
def _store_kv_halves(c_ptr, sc_ptr, dst, sdst, x1, x2, mask, hmask, D: tl.constexpr, FP8: tl.constexpr):
    # one token's [heads, D] row into the cache; fp8 caches get codes and the per-row scale amax / 448
    if FP8:
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        sc = _fp8_scale(tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1)))  # [BLOCK_H]
        x1 = _round_e4m3(tl.clamp(tl.math.div_rn(x1, sc[:, None]), -448.0, 448.0))
        x2 = _round_e4m3(tl.clamp(tl.math.div_rn(x2, sc[:, None]), -448.0, 448.0))
        tl.store(sc_ptr + sdst, sc, mask=hmask)
    d2 = tl.arange(0, D // 2)[None, :]
    tl.store(c_ptr + dst[:, None] + d2, x1.to(c_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + dst[:, None] + D // 2 + d2, x2.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, pos_ptr, cos_ptr, sin_ptr,
                     kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                     stride_qt, stride_qh, stride_ot, stride_oh,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                     block_size,
                     HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_H: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    # one program per token: (ROPE) rotate its q heads into qo and its k heads, then K/V into the cache
    t = tl.program_id(0).to(tl.int64)
    if ROPE:
        d2 = tl.arange(0, D // 2)
        p = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(cos_ptr + p * (D // 2) + d2)
        s = tl.load(sin_ptr + p * (D // 2) + d2)
        hq = tl.arange(0, BLOCK_HQ)
        qmask = (hq < HQ)[:, None]
        q1, q2 = _load_halves(q_ptr + t * stride_qt, hq * stride_qh, qmask, D)
        q1, q2 = _rotate(q1, q2, c, s, qo_ptr.dtype.element_ty)
        qdst = qo_ptr + t * stride_ot + hq[:, None] * stride_oh + d2[None, :]
        tl.store(qdst, q1, mask=qmask)
        tl.store(qdst + D // 2, q2, mask=qmask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, BLOCK_H)
        hmask = h < H
        mask = hmask[:, None]
        k1, k2 = _load_halves(k_ptr + t * stride_kt, h * stride_kh, mask, D)
        if ROPE:
            k1, k2 = _rotate(k1, k2, c, s, k_ptr.dtype.element_ty)
        v1, v2 = _load_halves(v_ptr + t * stride_vt, h * stride_vh, mask, D)
        dst = blk * stride_cb + off * stride_ct + h * stride_ch  # [BLOCK_H]
        sdst = blk * stride_sb + off * stride_st + h
        _store_kv_halves(kc_ptr, ks_ptr, dst, sdst, k1, k2, mask, hmask, D, FP8)
        _store_kv_halves(vc_ptr, vs_ptr, dst, sdst, v1, v2, mask, hmask, D, FP8)


@triton.jit
def _to_dot_dtype(q, qk_scale, DOT: tl.constexpr):
    # -> (q in the dot dtype, the factor still to apply to q @ k^T)
    if DOT == 1:
        return (q.to(tl.float32) * qk_scale).to(tl.float16), 1.0
    elif DOT == 2:
        return q.to(tl.float32), qk_scale
    else:
        return q, qk_scale


@triton.jit
def _kv_rows(n0, bt_row_ptr, kvh, stride_cb, stride_ct, stride_ch, key_end, BLOCK_SIZE: tl.constexpr,
             BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of KV head kvh through the block table: (their blocks, their cache row
    offsets), [BLOCK_N] each (MASK_KEYS: keys >= key_end read block 0)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=pos < key_end, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE).to(tl.int64)
    return blk, blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kvh * stride_ch


@triton.jit
def _load_rows(c_ptr, row, n0, key_end, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr):
    """A [BLOCK_N, D] tile of K or V at the cache rows `row` (MASK_KEYS: keys >= key_end not loaded)."""
    d = tl.arange(0, D)
    if MASK_KEYS:
        return tl.load(c_ptr + row[:, None] + d[None, :], mask=(n0 + tl.arange(0, BLOCK_N) < key_end)[:, None],
                       other=0.0)
    return tl.load(c_ptr + row[:, None] + d[None, :])


@triton.jit
def _kv_tile(kc_ptr, vc_ptr, n0, bt_row_ptr, kvh, stride_cb, stride_ct, stride_ch, key_end, ty,
             BLOCK_SIZE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of KV head kvh: (their blocks [BLOCK_N], K and V [BLOCK_N, D] in dtype ty)."""
    blk, row = _kv_rows(n0, bt_row_ptr, kvh, stride_cb, stride_ct, stride_ch, key_end, BLOCK_SIZE, BLOCK_N,
                        MASK_KEYS)
    k = _load_rows(kc_ptr, row, n0, key_end, D, BLOCK_N, MASK_KEYS).to(ty)
    return blk, k, _load_rows(vc_ptr, row, n0, key_end, D, BLOCK_N, MASK_KEYS).to(ty)


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, vsc, n0, key_end, qpos, window, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
                  MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr):
    """The online softmax of one tile's scaled scores s [M, BLOCK_N] (keys n0..) and its values v (in
    the dot dtype; FP8: their scales vsc [BLOCK_N]) into acc [M, D], m_i, l_i [M] (base-2 logits).
    MASK_KEYS masks keys >= key_end; CAUSAL / USE_WINDOW mask against the query positions qpos [M]."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        ok = (pos < key_end)[None, :]
        if CAUSAL:
            ok = ok & (pos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            ok = ok & (qpos[:, None] - pos[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8:
        vmax = tl.maximum(tl.max(vsc, axis=0), 1e-30)  # keeps p * scale in [0, 1]: no fp16 underflow
        pv = tl.dot((p * (vsc / vmax)[None, :]).to(v.dtype), v) * vmax
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _attend_tile(q, acc, m_i, l_i, n0, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row_ptr, kvh,
                 stride_cb, stride_ct, stride_ch, stride_sb, stride_st, qk_scale,
                 key_end, qpos, window, BLOCK_SIZE: tl.constexpr,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
                 MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N) gathered through the block table.

    q [M, D]; acc [M, D] f32; m_i, l_i [M] f32 (base-2 logits). MASK_KEYS masks keys >= key_end
    (and never loads them); CAUSAL / USE_WINDOW mask against the query positions qpos [M].
    """
    blk, k, v = _kv_tile(kc_ptr, vc_ptr, n0, bt_row_ptr, kvh, stride_cb, stride_ct, stride_ch, key_end,
                         q.dtype, BLOCK_SIZE, D, BLOCK_N, MASK_KEYS)  # q is already in the dot dtype
    s = tl.dot(q, tl.trans(k))  # [M, BLOCK_N] f32
    vsc = s  # fp8 only
    if FP8:  # the scales after the dot, as their own loads
        pos = n0 + tl.arange(0, BLOCK_N)
        srow = blk * stride_sb + (pos % BLOCK_SIZE) * stride_st + kvh
        if MASK_KEYS:
            kmask = pos < key_end
            ksc = tl.load(ks_ptr + srow, mask=kmask, other=0.0)
            vsc = tl.load(vs_ptr + srow, mask=kmask, other=0.0)
        else:
            ksc = tl.load(ks_ptr + srow)
            vsc = tl.load(vs_ptr + srow)
        s = s * (ksc * qk_scale)[None, :]
    else:
        s = s * qk_scale
    return _softmax_step(acc, m_i, l_i, s, v, vsc, n0, key_end, qpos, window, BLOCK_N, FP8, MASK_KEYS, CAUSAL,
                         USE_WINDOW)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, sinks_ptr,
                    out_ptr, qk_scale, window,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, num_m_tiles,
                    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    FP8: tl.constexpr, USE_WINDOW: tl.constexpr, DOT: tl.constexpr):
    # grid (q heads, query tiles, sequences); the heads sharing a KV head run side by side and the
    # longest (last) query tiles start first
    h = tl.program_id(0)
    mt = num_m_tiles - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    qlen = tl.load(qsl_ptr + b + 1) - q0
    m_start = mt * BLOCK_M
    if m_start < qlen:
        seq_len = tl.load(seq_lens_ptr + b)
        ctx = seq_len - qlen  # cached prefix before this step's tokens
        rows = m_start + tl.arange(0, BLOCK_M)
        rmask = rows < qlen
        qpos = ctx + rows
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (q0 + rows).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=rmask[:, None], other=0.0)
        q, qk_scale = _to_dot_dtype(q, qk_scale, DOT)
        kvh = h // GROUP
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        # the sink starts the running max and sum: exp2(sink - m) = 1; no row is ever all -inf
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        hi = tl.minimum(seq_len, ctx + m_start + BLOCK_M)  # past the tile's last query: masked anyway
        if USE_WINDOW:
            lo = tl.maximum(ctx + m_start - window + 1, 0)
            for n0 in range(lo, hi, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, n0, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row,
                                             kvh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                                             qk_scale, hi, qpos, window, BLOCK_SIZE,
                                             D, BLOCK_N, FP8, True, True, True)
        else:
            # keys before the tile's first query are seen by every row: no masks there
            full = ((ctx + m_start) // BLOCK_N) * BLOCK_N
            for n0 in range(0, full, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, n0, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row,
                                             kvh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                                             qk_scale, hi, qpos, window, BLOCK_SIZE,
                                             D, BLOCK_N, FP8, False, False, False)
            for n0 in range(full, hi, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, n0, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row,
                                             kvh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                                             qk_scale, hi, qpos, window, BLOCK_SIZE,
                                             D, BLOCK_N, FP8, True, True, False)
        o = acc / l_i[:, None]
        tl.store(out_ptr + (q0 + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _rope_cos_sin(pos_ptr, cos_ptr, sin_ptr, t, t_real, D: tl.constexpr):
    """The token's rotation: cos and sin [D/2] of its position (a padding sequence has no token t)."""
    d2 = tl.arange(0, D // 2)
    p = tl.load(pos_ptr + tl.where(t_real, t, 0)).to(tl.int64)
    return tl.load(cos_ptr + p * (D // 2) + d2), tl.load(sin_ptr + p * (D // 2) + d2)


@triton.jit
def _rope_kv_decode(q_ptr, k_ptr, v_ptr, c, s, slot, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
                    t, kvh, heads, qmask, write, stride_qt, stride_qh, stride_kt, stride_kh,
                    stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr,
                    PATCH: tl.constexpr):
    """The decode kernel's own rope + KV write (_write_kv_kernel's math, for one token and KV head):
    returns the token's rotated q heads [BLOCK_H, D] and, PATCH, its k and v rows [1, D] as the cache
    holds them (else q twice). With `write` (the program that attends the token's own key) it writes
    k and v into the cache; without PATCH it then waits at a CTA barrier, so the attention after it
    reads them back."""
    q1, q2 = _load_halves(q_ptr + t * stride_qt, heads * stride_qh, qmask[:, None], D)
    q1, q2 = _rotate(q1, q2, c, s, q_ptr.dtype.element_ty)
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_H, D))  # [q1 | q2] per head
    h = kvh + tl.zeros([1], tl.int32)  # the write helpers take rows of heads: one row here
    one = h >= 0
    k_row = q
    v_row = q
    if PATCH:
        k1, k2 = _load_halves(k_ptr + t * stride_kt, h * stride_kh, one[:, None], D)
        k1, k2 = _rotate(k1, k2, c, s, k_ptr.dtype.element_ty)
        v1, v2 = _load_halves(v_ptr + t * stride_vt, h * stride_vh, one[:, None], D)
        k_row = tl.reshape(tl.permute(tl.join(k1, k2), (0, 2, 1)), (1, D))
        v_row = tl.reshape(tl.permute(tl.join(v1, v2), (0, 2, 1)), (1, D))
    if write:
        if not PATCH:
            k1, k2 = _load_halves(k_ptr + t * stride_kt, h * stride_kh, one[:, None], D)
            k1, k2 = _rotate(k1, k2, c, s, k_ptr.dtype.element_ty)
            v1, v2 = _load_halves(v_ptr + t * stride_vt, h * stride_vh, one[:, None], D)
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        dst = blk * stride_cb + off * stride_ct + h * stride_ch
        sdst = blk * stride_sb + off * stride_st + h
        _store_kv_halves(kc_ptr, ks_ptr, dst, sdst, k1, k2, one[:, None], one, D, FP8)
        _store_kv_halves(vc_ptr, vs_ptr, dst, sdst, v1, v2, one[:, None], one, D, FP8)
    if not PATCH:
        tl.debug_barrier()  # a CTA barrier orders the block's global writes before its later reads
    return q, k_row, v_row


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, sinks_ptr,
                   out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, qk_scale, window, num_splits,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                   k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                   BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                   BLOCK_N: tl.constexpr,
                   FP8: tl.constexpr, USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                   DOT: tl.constexpr, ROPE_KV: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr = False,
                   TRIGGER: tl.constexpr = False):
    # one query token per sequence; program (KV head, sequence, split) takes the GROUP query heads of
    # its KV head as the rows of one tile (padded to BLOCK_H >= 16 for tl.dot) and a slice of keys.
    # A sequence's KV heads run side by side: they share the 32-byte sectors of the fp8 scales.
    # ROPE_KV: q, k and v come unrotated from the projection; the kernel rotates q, and the program
    # whose keys end at the token's own writes its k and v into the cache (no KV-write kernel before).
    # EARLY (ROPE_KV under PDL, a cache in k's dtype, a grid of at most one program an SM): what the
    # step's inputs and the cache hold (the lengths, the rotation, the first tile of keys) is read
    # before the PDL wait, while the qkv GEMM still runs; the token's own key and value, not yet in
    # the cache then, are patched into their tile from registers.
    tl.static_assert(ROPE_KV or not EARLY, "EARLY waits for PDL in the ROPE_KV path")
    if TRIGGER:
        pdl_trigger(PDL)
    if not EARLY:
        pdl_enter(PDL)
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    t = tl.load(qsl_ptr + b)
    t_end = tl.load(qsl_ptr + b + 1)  # t_end == t: a padding sequence without a token
    seq_len = tl.where(t_end > t, tl.load(seq_lens_ptr + b), 0)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    start = lo
    end = seq_len
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, seq_len)
    g = tl.arange(0, BLOCK_H)
    gmask = g < GROUP
    qmask = gmask & (g * 0 + t < t_end)  # block-shaped: the interpreter rejects scalar bools in masks
    heads = kvh * GROUP + g
    d = tl.arange(0, D)
    t_real = t < t_end
    t = t.to(tl.int64)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    if SPLIT:
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # finite: an empty split stays NaN-free
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    else:
        sink = tl.load(sinks_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = sink
        l_i = tl.full([BLOCK_H], 1.0, dtype=tl.float32)
    qpos = tl.zeros([BLOCK_H], dtype=tl.int32) + seq_len - 1
    if ROPE_KV:
        c, s = _rope_cos_sin(pos_ptr, cos_ptr, sin_ptr, t, t_real, D)
        slot = tl.load(slot_ptr + tl.where(t_real, t, 0)).to(tl.int64)  # a padding sequence has no token t
        write = t_real & (end == seq_len) & (start < end) & (slot >= 0)  # slot < 0: a graph's padding row
        if EARLY:  # the first tile, before the wait
            _, k0, v0 = _kv_tile(kc_ptr, vc_ptr, start, bt_row, kvh, stride_cb, stride_ct, stride_ch, end,
                                 kc_ptr.dtype.element_ty, BLOCK_SIZE, D, BLOCK_N, True)
            pdl_enter(PDL)
        q, k_row, v_row = _rope_kv_decode(q_ptr, k_ptr, v_ptr, c, s, slot, kc_ptr, vc_ptr, ks_ptr, vs_ptr, t, kvh,
                                          heads, qmask, write, stride_qt, stride_qh, stride_kt, stride_kh,
                                          stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, stride_sb,
                                          stride_st, BLOCK_SIZE, BLOCK_H, D, FP8, EARLY)
    else:
        q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=qmask[:, None], other=0.0)
    q, qk_scale = _to_dot_dtype(q, qk_scale, DOT)
    # keys in [start, end) all pass the causal and window tests: only the end is masked
    if EARLY:
        own = seq_len - 1  # the token's own key: from registers, the cache may not hold it yet
        for n0 in range(start, end, BLOCK_N):
            if n0 > start:
                _, k0, v0 = _kv_tile(kc_ptr, vc_ptr, n0, bt_row, kvh, stride_cb, stride_ct, stride_ch, end,
                                     kc_ptr.dtype.element_ty, BLOCK_SIZE, D, BLOCK_N, True)
            if n0 + BLOCK_N > own:  # the tile with the token's key
                mine = (n0 + tl.arange(0, BLOCK_N) == own)[:, None]
                k0 = tl.where(mine, k_row, k0)
                v0 = tl.where(mine, v_row, v0)
            s_ = tl.dot(q, tl.trans(k0.to(q.dtype))) * qk_scale
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s_, v0.to(q.dtype), s_, n0, end, qpos, window, BLOCK_N,
                                          False, True, False, False)
    else:
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, n0, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row,
                                         kvh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st,
                                         qk_scale, end, qpos, window, BLOCK_SIZE,
                                         D, BLOCK_N, FP8, True, False, False)
    if SPLIT:
        pidx = (b * (GROUP * tl.num_programs(0)) + heads) * num_splits + split  # [B, Hq, S]
        tl.store(part_m_ptr + pidx, m_i, mask=gmask)
        tl.store(part_l_ptr + pidx, l_i, mask=gmask)
        tl.store(part_acc_ptr + pidx[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=qmask[:, None])


@triton.jit
def _decode_combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, qsl_ptr, sinks_ptr, out_ptr,
                           num_splits, stride_ot, stride_oh,
                           D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = False):
    if TRIGGER:
        pdl_trigger(PDL)
    pdl_enter(PDL)
    # merges the splits of one (sequence, query head) and adds the sink to the denominator
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    d = tl.arange(0, D)
    base = (b * tl.num_programs(1) + h) * num_splits
    m = tl.load(part_m_ptr + base + s, mask=smask, other=-1.0e30)
    l = tl.load(part_l_ptr + base + s, mask=smask, other=0.0)
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
    m_tot = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_tot)  # [BLOCK_S]
    denom = tl.sum(l * w, axis=0) + tl.exp2(sink - m_tot)
    o = tl.sum(acc * w[:, None], axis=0) / denom
    t = tl.load(qsl_ptr + b)
    t_end = tl.load(qsl_ptr + b + 1)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d * 0 + t < t_end)
