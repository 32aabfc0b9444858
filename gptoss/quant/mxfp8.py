"""MXFP8: e4m3 (float8_e4m3fn) values in blocks of 32 sharing one e8m0 scale, for activations.

Layout: values float8_e4m3fn [..., K], scales uint8 [..., K/32], value 2^(s - 127).

Quantization rules (docs/quantization.md derives the bounds):
- scale: the smallest power of two 2^k with amax <= 448 * 2^k over the block's finite elements,
  k clamped to [-127, 127], so the block max never overflows e4m3 (nothing saturates).
- elements: x / 2^k (exact) cast to e4m3 with round-to-nearest-even.
- NaN/inf: e4m3fn has NaN but no inf, so a NaN or +-inf element becomes NaN on its own; it does not
  enter the block's amax, and its neighbours quantize as if it were absent. A zero (or all
  non-finite) block gets scale byte 0.
Computed in float32; then |dequant - x| <= max(2^-4 |x|, 2^-10 * 2^k) for every finite element.
"""

from __future__ import annotations

import torch

from .mxfp4 import BLOCK, E8M0_BIAS, e8m0_exponent, e8m0_to_float

E4M3_MAX = 448.0


def quantize_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (values float8_e4m3fn [..., K], scales uint8 [..., K/32]); rules above."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"quantize_mxfp8 needs the last dimension to be a multiple of 32, got {x.shape[-1]}")
    xb = x.float().unflatten(-1, (-1, BLOCK))  # [..., K/32, 32]
    finite = torch.isfinite(xb)
    amax = torch.where(finite, xb.abs(), torch.zeros_like(xb)).amax(-1)
    k = e8m0_exponent(amax, E4M3_MAX)
    y = torch.ldexp(xb, -k.unsqueeze(-1))  # a power-of-two division: exact, and |y| <= 448
    # an explicit NaN: torch's cast would saturate inf to 448 (and older versions differ)
    y = torch.where(finite, y, torch.full_like(y, float("nan")))
    return y.to(torch.float8_e4m3fn).flatten(-2), (k + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp8(values: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """values float8_e4m3fn [..., K], scales uint8 [..., K/32] -> [..., K] in `dtype`."""
    if values.shape[:-1] != scales.shape[:-1] or values.shape[-1] != scales.shape[-1] * BLOCK:
        raise ValueError(f"mxfp8 values {tuple(values.shape)} and scales {tuple(scales.shape)} do not "
                         f"match: expected values [..., K] and scales [..., K/32]")
    v = values.float().unflatten(-1, (-1, BLOCK))  # [..., K/32, 32]
    return (v * e8m0_to_float(scales).unsqueeze(-1)).flatten(-2).to(dtype)
