"""RMSNorm with the residual add folded in: one kernel instead of the ~9 elementwise ones eager torch
launches per norm (49 norms per 20b step), and one read of the residual stream instead of three.

    y = rms_norm(x, weight, eps)                      # y = norm(x)
    y, h = rms_norm(x, weight, eps, residual=delta)   # h = x + delta (rounded to x.dtype), y = norm(h);
                                                      # delta may be float32 (the MoE's sum)

The sum is rounded to the activation dtype before it is normalised, exactly as `x + delta` followed
by the norm would do, so the twin and the unfused model agree bit for bit on the residual stream.
Triton on CUDA (and in the interpreter), `rms_norm_torch` elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import pdl_enter

@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, stride_x, stride_r, stride_y, stride_h, N, eps,
                     BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * (xf * rstd)).to(y_ptr.dtype.element_ty), mask=mask)


# the interpreter (TRITON_INTERPRET=1 before import) runs the kernel on CPU tensors
INTERPRETED = type(_rms_norm_kernel).__name__ == "InterpretedFunction"


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The twin: in fp32 as the reference model does, the weight applied last, back to x.dtype."""
    h = x if residual is None else (x + residual).to(x.dtype)  # the sum rounded once (residual: any float)
    hf = h.float()
    y = (weight.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [T, N] (and residual [T, N]) -> y [T, N], or (y, x + residual) when residual is given."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} must be 2-D with weight {tuple(weight.shape)} its width")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if not (x.is_cuda or INTERPRETED):
        return rms_norm_torch(x, weight, eps, residual)
    x = x if x.stride(1) == 1 else x.contiguous()
    residual = residual if residual is None or residual.stride(1) == 1 else residual.contiguous()
    T, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else y
    if T:
        r = residual if residual is not None else x
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(T,)](x, r, weight, y, h, x.stride(0), r.stride(0), y.stride(0), h.stride(0), N, eps,
                               BLOCK=block, RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 256)),
                               **pdl.args())
    return y if residual is None else (y, h)
