"""y = x @ W^T (+ bias) for one or two rows (batch-1 decode): bf16 weights streamed once, each program
a strip of BLOCK_N output columns over all of K, products summed in fp32.

    y = linear_rows(x, w, bias)       # x [M, K] (M <= MAX_ROWS), w [N, K], bias [N] or None -> [M, N]
    t, h, y = rms_norm_linear_rows(x, residual, norm_weight, eps, w, bias)   # the norm fused in, one row
    h, u = linear_rows_route(x, w, bias, residual, norm_weight, router_weight, sums, zero_next)
                                      # one row, the MoE router folded in (gptoss.kernels.router_partials)
    t, h, y = embed_norm_linear_rows(ids, table, norm_weight, eps, w, bias)   # the embedding's row, normed

Used at one row for the attention projections, the router and the unembedding, where cuBLAS's
small-M kernels reach 55-75% of the copy bandwidth: o [2880, 4096] 9.3 us against 14.4, qkv [5120,
2880] 11.5 against 13.3, and even on the unembedding [201088, 2880], which no L2 holds, cuBLAS reads
2.82 TB/s (410 us) where these strips read 3.16 (367 us; H100, `benchmarks/bench_gemv.py`: CUDA
graphs with PDL); ours also take part in programmatic dependent launch (gptoss.kernels.pdl),
cuBLAS's do not. At two rows cuBLAS won qkv and o.

One row (ONE_ROW) keeps everything 2-D: each thread multiplies its 8 contiguous weights of a row by
the matching 8 inputs and adds them into its own partial sum, so a K step needs no shuffles, shared
memory or barriers (the 3-D form for two rows reduces across the CTA every step: 267 SASS
instructions a K step against 191, and 9.3-11.5 us against 9.7-12.4 at the best tiles).
Under PDL the weights, which do not depend on the kernel before, are loaded before the wait: the
first K step, or with `preload` all of K (one row, one strip a program), so that a kernel that
launches while the one before still runs has its bytes streaming by the time that one ends. o [2880,
4096] after an 8-program stand-in busy for 4 / 8 us (`python scripts/pdl_probe.py`, H100, us a pair):
11.8 / 14.9 with all four steps loaded early against 13.0 / 17.1 with the first.
`GemvOptions` picks the strip and K-step sizes; `linear_rows_torch` is the twin (fp32 sums of the same
bf16 values, rounded once to x.dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .moe_token import _chunk_pos, chunk_order, chunk_width
from .pdl import pdl_enter
from .sm_count import sm_count

MAX_ROWS = 2
# the o GEMV with the router folded in, one strip a program: its router, norm and bias weights loaded
# before the PDL wait (a switch for scripts/ab_decode.py)
ROUTE_WEIGHTS_EARLY = True
ONE_ROW_PATH = True  # one row: the kernel's 2-D variant (a switch for scripts/ab_decode.py)


@dataclass(frozen=True)
class GemvOptions:
    block_n: int = 2      # output columns per program (H100, one row, PDL graphs: 2 of 2-16 for qkv and o)
    block_k: int = 1024   # K step: 2 x 1024 bf16 = 4 KB of independent 16-byte loads a step
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 0  # > 0: a persistent grid of this many programs an SM, each streaming
                              # strips back to back (no half-empty last wave); 0: one program a strip
    preload: int = 1          # one row, one program a strip: K steps (1-4, covering all of K when > 1)
                              # whose weights are loaded before the PDL wait, so that they stream while
                              # the kernel before still runs (1: the first step, then one step ahead)

    def covers(self, k: int) -> bool:
        """Whether the preload may take K = k: one step (then one ahead), or steps that cover all of K."""
        return self.preload == 1 or self.preload * self.block_k >= k


@triton.jit
def _row_h(x_ptr, r_ptr, h_ptr, k, K, RES: tl.constexpr):
    """h[k] = x + r (RES) or x, rounded to h's dtype, in fp32."""
    hk = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    if RES:
        hk += tl.load(r_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return hk.to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _row_t(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, k, K, rstd, RES: tl.constexpr):
    """t[k] = norm(h)[k] * nw[k] (h: _row_h), rounded to t's dtype as the unfused kernels store it, in fp32."""
    tk = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32) * (_row_h(x_ptr, r_ptr, h_ptr, k, K, RES) * rstd)
    return tk.to(t_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _w_tile(w_ptr, n, k, N, K, stride_wn):
    """The weights of columns n over K positions k ([BLOCK_N, BLOCK_K], zeros past N and K)."""
    return tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_wn + k[None, :],
                   mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _x_row(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, k, K, rstd, NORM: tl.constexpr, RES: tl.constexpr = True):
    """One row's inputs at K positions k in fp32: x, or NORM the normed t."""
    if NORM:
        return _row_t(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, k, K, rstd, RES)
    else:
        return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _dot_row(acc1, w, x1, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """One row's K step: each thread's VEC products of a row summed into its own partial [BLOCK_N, BLOCK_K / VEC]."""
    return acc1 + tl.sum(tl.reshape(w.to(tl.float32) * x1[None, :], (BLOCK_N, BLOCK_K // VEC, VEC)), axis=2)


@triton.jit
def _store_strip(acc, b_ptr, y_ptr, m, m_mask, n, N, stride_ym, HAS_BIAS: tl.constexpr):
    n_mask = n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _route_weights(n, N, b_ptr, nw_ptr, wr_ptr, stride_wr, E, HAS_BIAS: tl.constexpr, E_R: tl.constexpr):
    """ROUTE's weights at columns n: bias and norm weight [BLOCK_N] fp32, router [E_R, BLOCK_N]."""
    n_mask = n < N
    b = tl.zeros(n.shape, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    e = tl.arange(0, E_R)
    wr = tl.load(wr_ptr + e[:, None] * stride_wr + n[None, :], mask=(e < E)[:, None] & n_mask[None, :], other=0.0)
    return b, tl.load(nw_ptr + n, mask=n_mask, other=0.0).to(tl.float32), wr


@triton.jit
def _store_routed(acc, b, nw, wr, r, n, N, t_ptr, h_ptr, slot_ptr, E, E_R: tl.constexpr):
    """ROUTE's epilogue for one row's columns n (acc [BLOCK_N] fp32; b, nw, wr: _route_weights; r the
    residual there): y rounded as the unfused kernel stores it, h = r + y and u = nw * h rounded as the
    unfused norm + residual kernels round them, then the router's partial sums of these columns added
    into a slot: W_r[e, n] @ u[n] for e < E, and sum(h[n]^2) at E."""
    n_mask = n < N
    y = (acc + b).to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (r.to(tl.float32) + y).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + n, h, mask=n_mask)
    hf = tl.where(n_mask, h.to(tl.float32), 0.0)
    u = (nw * hf).to(t_ptr.dtype.element_ty)
    tl.store(t_ptr + _chunk_pos(n), u, mask=n_mask)
    e = tl.arange(0, E_R)
    tl.atomic_add(slot_ptr + e, tl.sum(wr.to(tl.float32) * u.to(tl.float32)[None, :], axis=1), mask=e < E,
                  sem="relaxed")
    tl.atomic_add(slot_ptr + E, tl.sum(hf * hf, axis=0), sem="relaxed")


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, M, N, K, eps,
                 stride_xm, stride_wn, stride_ym, wr_ptr, sums_ptr, zero_ptr, E, stride_wr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 NORM: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr, ONE_ROW: tl.constexpr = False,
                 VEC: tl.constexpr = 8, T_CHUNK: tl.constexpr = False, PRE: tl.constexpr = 1,
                 ROUTE: tl.constexpr = False, E_W: tl.constexpr = 1, SLOTS: tl.constexpr = 1,
                 E_R: tl.constexpr = 1, ROUTE_EARLY: tl.constexpr = False, ids_ptr=None,
                 GATHER: tl.constexpr = False, RES: tl.constexpr = True):
    # strips of BLOCK_N output columns, pid, pid + P, ...; each K step's weight load is issued before
    # the previous step's math, and past a strip's last step it loads the next strip's first (the
    # load after the last strip fully masked). The weights do not depend on the kernel before: the
    # first load comes before the PDL wait. PRE > 1 (one row, one strip a program): the strip's PRE
    # K steps, all of K, are loaded before the wait, to stream while the kernel before runs.
    # NORM (one row): the GEMV's input is t = rms_norm(x + r) * nw. Every program computes the row's
    # norm (K values from L2) and builds t's K steps itself; program 0 also stores h = x + r and t,
    # for the residual stream and the next GEMM (T_CHUNK: t in moe_token's chunk order, for its gate_up).
    # ROUTE (one row, the o projection): the router folded in (gptoss.kernels.router_partials); r, nw,
    # t and h are then the output's: h = r + y, u = nw * h into t (chunk order), the router's partial
    # sums into sums_ptr, and program 0 zeroes the next layer's (zero_ptr, SLOTS x E_W floats).
    # GATHER (NORM, one row, no residual): x is the row ids_ptr[0] of a table (x_ptr, rows stride_xm
    # apart), read once the kernel before (which writes the id) has ended: the embedding and the first
    # layer's norm folded into its qkv projection.
    tl.static_assert(not (ROUTE and NORM), "ROUTE and NORM: the norm is on one side of the GEMV")
    tl.static_assert(not GATHER or (NORM and ONE_ROW and not RES), "GATHER: one row through the norm, no residual")
    P = tl.num_programs(0)
    n_strips = tl.cdiv(N, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    cols = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    s = tl.program_id(0)
    n = s * BLOCK_N + cols
    w = _w_tile(w_ptr, n, kk, N, K, stride_wn)
    w1, w2, w3 = w, w, w
    if PRE >= 2:
        w1 = _w_tile(w_ptr, n, BLOCK_K + kk, N, K, stride_wn)
    if PRE >= 3:
        w2 = _w_tile(w_ptr, n, 2 * BLOCK_K + kk, N, K, stride_wn)
    if PRE >= 4:
        w3 = _w_tile(w_ptr, n, 3 * BLOCK_K + kk, N, K, stride_wn)
    if ROUTE & ROUTE_EARLY:  # weights: before the wait, with the GEMV's (the epilogue then waits on none)
        rb, rnw, rwr = _route_weights(n, N, b_ptr, nw_ptr, wr_ptr, stride_wr, E, HAS_BIAS, E_R)
    pdl_enter(PDL)
    if GATHER:
        x_ptr += tl.load(ids_ptr).to(tl.int64) * stride_xm
    if ROUTE:
        if tl.program_id(0) == 0:
            z = tl.arange(0, SLOTS * E_W)
            tl.store(zero_ptr + z, tl.zeros((SLOTS * E_W,), tl.float32))
    rstd = 0.0
    if NORM:
        ks = tl.arange(0, KP)
        hv = _row_h(x_ptr, r_ptr, h_ptr, ks, K, RES)
        rstd = 1.0 / tl.sqrt(tl.sum(hv * hv, axis=0) / K + eps)
        if tl.program_id(0) == 0:
            tl.store(h_ptr + ks, hv.to(h_ptr.dtype.element_ty), mask=ks < K)
            t_at = _chunk_pos(ks) if T_CHUNK else ks
            tl.store(t_ptr + t_at, _row_t(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, ks, K, rstd, RES).to(
                t_ptr.dtype.element_ty), mask=ks < K)
    if PRE >= 2:
        acc1 = tl.zeros((BLOCK_N, BLOCK_K // VEC), tl.float32)
        acc1 = _dot_row(acc1, w, _x_row(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, kk, K, rstd, NORM, RES),
                        BLOCK_N, BLOCK_K, VEC)
        acc1 = _dot_row(acc1, w1, _x_row(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, BLOCK_K + kk, K, rstd, NORM, RES),
                        BLOCK_N, BLOCK_K, VEC)
        if PRE >= 3:
            acc1 = _dot_row(acc1, w2, _x_row(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, 2 * BLOCK_K + kk, K, rstd, NORM, RES),
                            BLOCK_N, BLOCK_K, VEC)
        if PRE >= 4:
            acc1 = _dot_row(acc1, w3, _x_row(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, 3 * BLOCK_K + kk, K, rstd, NORM, RES),
                            BLOCK_N, BLOCK_K, VEC)
        if ROUTE:
            if not ROUTE_EARLY:
                rb, rnw, rwr = _route_weights(n, N, b_ptr, nw_ptr, wr_ptr, stride_wr, E, HAS_BIAS, E_R)
            _store_routed(tl.sum(acc1, axis=1), rb, rnw, rwr, tl.load(r_ptr + n, mask=n < N, other=0.0), n, N,
                          t_ptr, h_ptr, sums_ptr + (s % SLOTS) * E_W, E, E_R)
        else:
            _store_strip(tl.sum(acc1, axis=1)[None, :], b_ptr, y_ptr, m, m_mask, n, N, stride_ym, HAS_BIAS)
    else:
        for s in range(tl.program_id(0), n_strips, P):
            n = s * BLOCK_N + cols
            # two rows: reduced each K step (an elementwise [BLOCK_M, BLOCK_N, BLOCK_K] accumulator reduced
            # once a strip measured 0-25% slower on H100, for its registers); one row: each thread's VEC
            # products of a row summed into its own partial [BLOCK_N, BLOCK_K / VEC], reduced once a strip
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc1 = tl.zeros((BLOCK_N, BLOCK_K // VEC), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                if ONE_ROW:
                    x1 = _x_row(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, k, K, rstd, NORM, RES)
                else:
                    if NORM:
                        x = tl.broadcast_to(_row_t(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, k, K, rstd, RES)[None, :],
                                            (BLOCK_M, BLOCK_K))
                    else:
                        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                                    mask=m_mask[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
                last = k0 + BLOCK_K >= K
                k_nx = tl.where(last, 0, k0 + BLOCK_K) + kk
                n_nx = tl.where(last, s + P, s) * BLOCK_N + cols
                w_next = _w_tile(w_ptr, n_nx, k_nx, N, K, stride_wn)
                if ONE_ROW:
                    acc1 = _dot_row(acc1, w, x1, BLOCK_N, BLOCK_K, VEC)
                else:
                    acc += tl.sum(w.to(tl.float32)[None, :, :] * x[:, None, :], axis=2)  # [BLOCK_M, BLOCK_N]
                w = w_next
            if ONE_ROW:
                acc = tl.sum(acc1, axis=1)[None, :]
            if ROUTE:
                rb, rnw, rwr = _route_weights(n, N, b_ptr, nw_ptr, wr_ptr, stride_wr, E, HAS_BIAS, E_R)
                _store_routed(tl.sum(acc, axis=0), rb, rnw, rwr, tl.load(r_ptr + n, mask=n < N, other=0.0), n, N,
                              t_ptr, h_ptr, sums_ptr + (s % SLOTS) * E_W, E, E_R)
            else:
                _store_strip(acc, b_ptr, y_ptr, m, m_mask, n, N, stride_ym, HAS_BIAS)


def _launch(x, w, bias, y, opts: GemvOptions, norm=None, t_chunk: bool = False, route=None, ids=None) -> None:
    """The GEMV over x's rows, or (norm = (residual, norm_weight, eps, t, h)) over rms_norm(x + residual),
    or (route = (residual, norm_weight, u, h, router_weight, sums, zero_next)) with the router folded in.
    ids (with norm, its residual None: no residual is added): x is a table, the row its row ids[0]."""
    M, K = x.shape
    if ids is not None:
        M = 1
    N = w.shape[0]
    one_row = ONE_ROW_PATH and M == 1
    pre = opts.preload if one_row else 1
    if not 1 <= opts.preload <= 4 or (pre > 1 and (opts.programs_per_sm or not opts.covers(K))):
        raise ValueError(f"{opts}: preload takes 1 to 4 K steps, and above 1 one strip a program "
                         f"(programs_per_sm=0) whose {opts.preload} steps of {opts.block_k} cover K={K}")
    grid = triton.cdiv(N, opts.block_n)
    if opts.programs_per_sm:
        grid = min(grid, opts.programs_per_sm * sm_count(x.device))
    r, nw, eps, t, h = norm if norm is not None else (x, x, 0.0, x, x)
    if r is None:
        r = x
    wr, sums, zero, e_w = x, x, x, 1
    if route is not None:
        r, nw, t, h, wr, sums, zero = route
        e_w = sums.shape[1]
    _gemv_kernel[(grid,)](
        x, w, bias if bias is not None else w, y, r, nw, t, h, M, N, K, float(eps), x.stride(0), w.stride(0),
        y.stride(0), wr, sums, zero, wr.shape[0], wr.stride(0), BLOCK_M=max(1, triton.next_power_of_2(M)),
        BLOCK_N=opts.block_n, BLOCK_K=opts.block_k, HAS_BIAS=bias is not None, NORM=norm is not None,
        KP=triton.next_power_of_2(K), ONE_ROW=one_row, VEC=min(8, opts.block_k), T_CHUNK=t_chunk, PRE=pre,
        ROUTE=route is not None, E_W=e_w, SLOTS=sums.shape[0] if route is not None else 1,
        E_R=triton.next_power_of_2(wr.shape[0]), ROUTE_EARLY=ROUTE_WEIGHTS_EARLY and pre > 1,
        ids_ptr=ids if ids is not None else x, GATHER=ids is not None, RES=ids is None,
        num_warps=opts.num_warps, num_stages=opts.num_stages, **pdl.args())


def linear_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                opts: GemvOptions | None = None) -> torch.Tensor:
    """x [M, K] with M <= MAX_ROWS, w [N, K] (rows contiguous), bias [N] or None -> [M, N] in x.dtype."""
    M, K = x.shape
    if M > MAX_ROWS or w.shape[1] != K or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"linear_rows: x {tuple(x.shape)} / w {tuple(w.shape)} need M <= {MAX_ROWS}, "
                         "the same K and contiguous rows")
    y = torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device)
    if M:
        _launch(x, w, bias, y, opts or GemvOptions())
    return y


def rms_norm_linear_rows(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         w: torch.Tensor, bias: torch.Tensor | None = None, opts: GemvOptions | None = None,
                         t_chunk_order: bool = False):
    """One row: (t, h, y) with h = x + residual, t = rms_norm(h) * norm_weight, y = t @ w^T + bias, in one
    kernel (rms_norm's and linear_rows' results, up to the order of the sums). x, t, h, y in x.dtype.
    t_chunk_order: t [1, chunk_width(K)] in moe_token's chunk order (what lies past K unwritten), as
    the one-token MoE's gate_up reads it fastest."""
    K = x.shape[-1]
    if x.shape != (1, K) or residual.shape != (1, K) or w.shape[1] != K or norm_weight.shape != (K,):
        raise ValueError(f"rms_norm_linear_rows: x {tuple(x.shape)}, residual {tuple(residual.shape)}, norm "
                         f"weight {tuple(norm_weight.shape)}, w {tuple(w.shape)}: one row of the same K")
    if not (x.is_contiguous() and residual.is_contiguous() and w.stride(-1) == 1):
        raise ValueError("rms_norm_linear_rows: x, residual and w's rows must be contiguous")
    t = torch.empty(1, chunk_width(K) if t_chunk_order else K, dtype=x.dtype, device=x.device)
    h = torch.empty_like(x)
    y = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, w, bias, y, opts or GemvOptions(), (residual, norm_weight, eps, t, h), t_chunk_order)
    return t, h, y


def embed_norm_linear_rows(ids: torch.Tensor, table: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           w: torch.Tensor, bias: torch.Tensor | None = None, opts: GemvOptions | None = None):
    """One token: (t, h, y) with h = table[ids[0]] (the embedding), t = rms_norm(h) * norm_weight and
    y = t @ w^T + bias, in one kernel that reads the id once the kernel before has written it (under
    PDL its weights stream meanwhile): rms_norm_linear_rows of the embedded row, no residual."""
    V, K = table.shape
    if ids.shape != (1,) or ids.dtype != torch.int64 or w.shape[1] != K or norm_weight.shape != (K,):
        raise ValueError(f"embed_norm_linear_rows: ids {tuple(ids.shape)} {ids.dtype}, table {tuple(table.shape)}, "
                         f"norm weight {tuple(norm_weight.shape)}, w {tuple(w.shape)}: one int64 id, the "
                         "table's rows as wide as w's")
    if not (table.is_contiguous() and w.stride(-1) == 1):
        raise ValueError("embed_norm_linear_rows: the table and w's rows must be contiguous")
    t = torch.empty(1, K, dtype=table.dtype, device=table.device)
    h = torch.empty_like(t)
    y = torch.empty(1, w.shape[0], dtype=table.dtype, device=table.device)
    _launch(table, w, bias, y, opts or GemvOptions(), (None, norm_weight, eps, t, h), ids=ids)
    return t, h, y


def linear_rows_route(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      norm_weight: torch.Tensor, router_weight: torch.Tensor, sums: torch.Tensor,
                      zero_next: torch.Tensor, opts: GemvOptions | None = None):
    """One row, the o projection with the MoE router folded in (gptoss.kernels.router_partials):
    (h, u) with y = x @ w^T + bias, h = residual + y [1, N] and u = norm_weight * h [1, chunk_width(N)]
    in moe_token's chunk order, all in x.dtype; the router's partial sums added into `sums` (zero
    before: [SLOTS, width(E)] float32) and `zero_next` (the same shape, another buffer) zeroed."""
    N, K = w.shape
    E = router_weight.shape[0]
    if x.shape != (1, K) or residual.shape != (1, N) or norm_weight.shape != (N,) or router_weight.shape != (E, N):
        raise ValueError(f"linear_rows_route: x {tuple(x.shape)}, w {tuple(w.shape)}, residual {tuple(residual.shape)}, "
                         f"norm weight {tuple(norm_weight.shape)}, router weight {tuple(router_weight.shape)}: one "
                         "row, the residual and norm as wide as w's rows, the router over them")
    if sums.shape != zero_next.shape or sums.dtype != torch.float32 or sums.shape[1] < E + 1 or any(
            d & (d - 1) for d in sums.shape) or not (
            sums.is_contiguous() and zero_next.is_contiguous()) or sums.data_ptr() == zero_next.data_ptr():
        raise ValueError(f"linear_rows_route: sums {tuple(sums.shape)} {sums.dtype} and zero_next "
                         f"{tuple(zero_next.shape)} must be two contiguous float32 buffers of the same shape, "
                         f"powers of two, each row at least {E + 1} wide")
    if not (x.is_contiguous() and residual.is_contiguous() and w.stride(-1) == 1 and router_weight.stride(-1) == 1):
        raise ValueError("linear_rows_route: x, residual and the weights' rows must be contiguous")
    h = torch.empty(1, N, dtype=x.dtype, device=x.device)
    u = torch.empty(1, chunk_width(N), dtype=x.dtype, device=x.device)
    _launch(x, w, bias, h, opts or GemvOptions(), route=(residual, norm_weight, u, h, router_weight, sums, zero_next))
    return h, u


def linear_rows_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                      opts: GemvOptions | None = None) -> torch.Tensor:
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def embed_norm_linear_rows_torch(ids: torch.Tensor, table: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                 w: torch.Tensor, bias: torch.Tensor | None = None, opts: GemvOptions | None = None):
    from .rmsnorm import rms_norm_torch
    h = table[ids]
    t = rms_norm_torch(h, norm_weight, eps)
    return t, h, linear_rows_torch(t, w, bias)


def rms_norm_linear_rows_torch(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               w: torch.Tensor, bias: torch.Tensor | None = None, opts: GemvOptions | None = None,
                               t_chunk_order: bool = False):
    from .rmsnorm import rms_norm_torch
    t, h = rms_norm_torch(x, norm_weight, eps, residual)
    return chunk_order(t) if t_chunk_order else t, h, linear_rows_torch(t, w, bias)
