"""y = x @ W^T (+ bias) for one or two rows (batch-1 decode): bf16 weights streamed once, each program
a strip of BLOCK_N output columns over all of K, products summed in fp32.

    y = linear_rows(x, w, bias)       # x [M, K] (M <= MAX_ROWS), w [N, K], bias [N] or None -> [M, N]
    t, h, y = rms_norm_linear_rows(x, residual, norm_weight, eps, w, bias)   # the norm fused in, one row

Used at one row for the attention projections and the router, where cuBLAS's small-M kernels reach
55-75% of the copy bandwidth: o [2880, 4096] 10.8 us against 14.4, qkv [5120, 2880] 13.3 on the
persistent grid against 13.3 (H100, `benchmarks/bench_gemv.py`); ours also take part in programmatic
dependent launch (gptoss.kernels.pdl), cuBLAS's do not. At two rows cuBLAS won both.
`GemvOptions` picks the strip and K-step sizes; `linear_rows_torch` is the twin (fp32 sums of the same
bf16 values, rounded once to x.dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import pdl_enter

MAX_ROWS = 2


@dataclass(frozen=True)
class GemvOptions:
    block_n: int = 4      # output columns per program (H100 sweep: 4 of 1-16)
    block_k: int = 1024   # K step: 4 x 1024 bf16 = 8 KB of independent 16-byte loads a step
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 0  # > 0: a persistent grid of this many programs an SM, each streaming
                              # strips back to back (no half-empty last wave); 0: one program a strip


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PDL: tl.constexpr):
    # strips of BLOCK_N output columns, pid, pid + P, ...; each K step's weight load is issued before
    # the previous step's math, and past a strip's last step it loads the next strip's first (the
    # load after the last strip fully masked). The weights do not depend on the kernel before: the
    # first load comes before the PDL wait.
    P = tl.num_programs(0)
    n_strips = tl.cdiv(N, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    cols = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    s = tl.program_id(0)
    n = s * BLOCK_N + cols
    w = tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_wn + kk[None, :],
                mask=(n < N)[:, None] & (kk < K)[None, :], other=0.0)
    pdl_enter(PDL)
    for s in range(tl.program_id(0), n_strips, P):
        n = s * BLOCK_N + cols
        n_mask = n < N
        # (reduced each K step: an elementwise [BLOCK_M, BLOCK_N, BLOCK_K] accumulator reduced once a
        # strip measured 0-25% slower on H100, for its registers)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                        other=0.0).to(tl.float32)
            last = k0 + BLOCK_K >= K
            k_nx = tl.where(last, 0, k0 + BLOCK_K) + kk
            n_nx = tl.where(last, s + P, s) * BLOCK_N + cols
            w_next = tl.load(w_ptr + n_nx.to(tl.int64)[:, None] * stride_wn + k_nx[None, :],
                             mask=(n_nx < N)[:, None] & (k_nx < K)[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32)[None, :, :] * x[:, None, :], axis=2)  # [BLOCK_M, BLOCK_N]
            w = w_next
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _norm_gemv_kernel(x_ptr, r_ptr, nw_ptr, t_ptr, h_ptr, w_ptr, b_ptr, y_ptr, N, K, eps, stride_wn,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PDL: tl.constexpr):
    # one row: h = x + r (rounded to h's dtype), t = norm(h) * nw (rounded to t's dtype), y = t @ W^T + b.
    # Every program computes the row's norm (2880 values from L2) and its strip of y; program 0 also
    # stores h and t, for the residual stream and the next GEMM.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    kk = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)  # before the wait
    pdl_enter(PDL)
    ks = tl.arange(0, KP)
    hv = (tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
          + tl.load(r_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hv * hv, axis=0) / K + eps)
    if tl.program_id(0) == 0:
        tl.store(h_ptr + ks, hv.to(h_ptr.dtype.element_ty), mask=ks < K)
        tv = tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32) * (hv * rstd)
        tl.store(t_ptr + ks, tv.to(t_ptr.dtype.element_ty), mask=ks < K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        hk = (tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
              + tl.load(r_ptr + k, mask=k_mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
        tk = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32) * (hk.to(tl.float32) * rstd)
        tk = tk.to(t_ptr.dtype.element_ty).to(tl.float32)  # the rounded t, as the unfused GEMV reads it
        w_next = tl.load(w_rows + (k + BLOCK_K)[None, :], mask=n_mask[:, None] & ((k + BLOCK_K) < K)[None, :],
                         other=0.0)
        acc += tl.sum(w.to(tl.float32) * tk[None, :], axis=1)
        w = w_next
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def linear_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                opts: GemvOptions | None = None) -> torch.Tensor:
    """x [M, K] with M <= MAX_ROWS, w [N, K] (rows contiguous), bias [N] or None -> [M, N] in x.dtype."""
    opts = opts or GemvOptions()
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_ROWS or w.shape[1] != K or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"linear_rows: x {tuple(x.shape)} / w {tuple(w.shape)} need M <= {MAX_ROWS}, "
                         "the same K and contiguous rows")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        grid = triton.cdiv(N, opts.block_n)
        if opts.programs_per_sm:
            grid = min(grid, opts.programs_per_sm * _num_sms(x.device))
        _gemv_kernel[(grid,)](
            x, w, bias if bias is not None else w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
            BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=opts.block_n, BLOCK_K=opts.block_k,
            HAS_BIAS=bias is not None, num_warps=opts.num_warps, num_stages=opts.num_stages, **pdl.args())
    return y


def rms_norm_linear_rows(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         w: torch.Tensor, bias: torch.Tensor | None = None, opts: GemvOptions | None = None):
    """One row: (t, h, y) with h = x + residual, t = rms_norm(h) * norm_weight, y = t @ w^T + bias, in one
    kernel (rms_norm's and linear_rows' results, up to the order of the sums). x, t, h, y in x.dtype."""
    opts = opts or GemvOptions()
    K = x.shape[-1]
    if x.shape != (1, K) or residual.shape != (1, K) or w.shape[1] != K or norm_weight.shape != (K,):
        raise ValueError(f"rms_norm_linear_rows: x {tuple(x.shape)}, residual {tuple(residual.shape)}, norm "
                         f"weight {tuple(norm_weight.shape)}, w {tuple(w.shape)}: one row of the same K")
    if not (x.is_contiguous() and residual.is_contiguous() and w.stride(-1) == 1):
        raise ValueError("rms_norm_linear_rows: x, residual and w's rows must be contiguous")
    t, h = torch.empty_like(x), torch.empty_like(x)
    y = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)
    _norm_gemv_kernel[(triton.cdiv(w.shape[0], opts.block_n),)](
        x, residual, norm_weight, t, h, w, bias if bias is not None else w, y, w.shape[0], K, eps, w.stride(0),
        BLOCK_N=opts.block_n, BLOCK_K=opts.block_k, KP=triton.next_power_of_2(K), HAS_BIAS=bias is not None,
        num_warps=opts.num_warps, num_stages=opts.num_stages, **pdl.args())
    return t, h, y


def linear_rows_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                      opts: GemvOptions | None = None) -> torch.Tensor:
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_linear_rows_torch(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               w: torch.Tensor, bias: torch.Tensor | None = None, opts: GemvOptions | None = None):
    from .rmsnorm import rms_norm_torch
    t, h = rms_norm_torch(x, norm_weight, eps, residual)
    return t, h, linear_rows_torch(t, w, bias)
