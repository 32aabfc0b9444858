"""FP8: e4m3 (float8_e4m3fn) with a dynamic float32 scale, per tensor or per token (row).

scale = amax / 448 over the finite elements (of the tensor, or of each row along the last dim),
floored at the smallest normal float32 so an all-zero input divides by a positive number and the
scale keeps full precision. q = x / scale, clamped to +-448, cast with round-to-nearest-even.
NaN and +-inf become NaN (e4m3fn has no inf), and do not enter amax.
Then |dequant - x| <= max(2^-4 |x|, 2^-10 * scale), up to float32 rounding of x / scale (2^-24).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
SCALE_FLOOR = torch.finfo(torch.float32).tiny


def quantize_fp8(x: torch.Tensor, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] -> (q float8_e4m3fn [..., H], scale float32: [] per tensor, [..., 1] per token)."""
    xf = x.float()
    finite = torch.isfinite(xf)
    ax = torch.where(finite, xf.abs(), torch.zeros_like(xf))
    amax = ax.amax(-1, keepdim=True) if per_token else ax.amax()
    scale = (amax / E4M3_MAX).clamp(min=SCALE_FLOOR)
    # fp32 division can land a hair above 448; clamp rather than trust the cast to saturate
    y = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX)
    y = torch.where(finite, y, torch.full_like(y, float("nan")))
    return y.to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """q float8_e4m3fn [..., H], scale float32 [] or [..., 1] -> [..., H] in `dtype`."""
    return (q.float() * scale).to(dtype)
