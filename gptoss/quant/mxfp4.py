"""MXFP4: e2m1 codes in blocks of 32 sharing one e8m0 scale (the OCP microscaling format).

Checkpoint layout (HF gpt-oss): blocks uint8 [..., N, K/32, 16], two codes per byte with the
element of lower index in the low nibble; scales uint8 [..., N, K/32], value 2^(s - 127).

Quantization rules (docs/quantization.md derives the bounds):
- scale: the smallest power of two 2^k with amax <= 6 * 2^k, k clamped to [-127, 127]. Nothing
  saturates (the OCP "floor(log2 amax) - 2" rule clips block maxima in (6, 8) * 2^k to 6).
- elements: x / 2^k (exact) rounded to the nearest e2m1 value, ties to the even code (RNE).
  Values that round to zero get code 0 (+0), so a zero block packs to zero bytes.
- a zero block gets scale byte 0.
- NaN/inf: e2m1 has neither, so a block holding any NaN or +-inf gets the e8m0 NaN scale (255)
  and codes 0; it dequantizes to all-NaN. Other blocks are unaffected.
Computed in float32; then |dequant - x| <= max(|x|, 2^k) / 4 for every element.
"""

from __future__ import annotations

import math

import torch

BLOCK = 32
# code 0..7 = +{0, .5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 255
# midpoints between neighbouring magnitudes: the rounding boundaries
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def fp4_lut(device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=dtype, device=device)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., B] -> codes uint8 [..., 2B], low nibble first."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., 2B] (values 0..15) -> uint8 [..., B], low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def e8m0_to_float(scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    # 2^(s-127) by ldexp, so s = 0 (2^-127, an fp32 subnormal) and 254 are exact; 255 is NaN in e8m0
    s = scales.to(torch.int32)
    out = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s - E8M0_BIAS)
    out = torch.where(s == E8M0_NAN, torch.full_like(out, float("nan")), out)
    return out.to(dtype)


def e8m0_exponent(amax: torch.Tensor, max_value: float) -> torch.Tensor:
    """Smallest k in [-127, 127] with amax <= max_value * 2^k, as int32; amax == 0 gives -127.

    Exact: frexp splits amax = m * 2^e (m in [0.5, 1)) without rounding, where a float log2 can
    round 2^j - ulp up to j and pick a scale one step too coarse.
    """
    max_m, max_e = math.frexp(max_value)
    m, e = torch.frexp(amax.float())
    k = e - max_e + (m > max_m).to(torch.int32)
    k = torch.where(amax == 0, torch.full_like(k, -E8M0_BIAS), k)
    return k.clamp(-E8M0_BIAS, 254 - E8M0_BIAS)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32] -> [..., N, K] in `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not "
                         f"match: expected blocks [..., N, K/32, 16] and scales [..., N, K/32]")
    values = fp4_lut(blocks.device)[unpack_fp4(blocks).long()]  # [..., N, K/32, 32]
    out = values * e8m0_to_float(scales).unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def _round_to_fp4_codes(y: torch.Tensor) -> torch.Tensor:
    """y already divided by its block scale (|y| <= 6): the nearest e2m1 code, ties to the even
    code. The code's lowest bit is its mantissa bit, so "even code" is IEEE round-to-nearest-even."""
    ay = y.abs()
    mids = torch.tensor(_FP4_MIDPOINTS, device=y.device)
    # number of midpoints strictly below |y|: the nearest magnitude, a tie going to the lower one
    idx = torch.bucketize(ay, mids, out_int32=True)
    # a tie below an odd code moves up to its even neighbour
    on_mid = (idx < len(mids)) & (ay == mids[idx.clamp(max=len(mids) - 1)])
    idx = idx + (on_mid & (idx % 2 == 1)).to(idx.dtype)
    sign = (torch.signbit(y) & (idx > 0)).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]); rules above."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"quantize_mxfp4 needs the last dimension to be a multiple of 32, got {x.shape[-1]}")
    xb = x.float().unflatten(-1, (-1, BLOCK))  # [..., K/32, 32]
    amax = xb.abs().amax(-1)  # NaN if the block holds a NaN, inf if an inf
    bad = ~torch.isfinite(amax)
    k = e8m0_exponent(torch.where(bad, torch.zeros_like(amax), amax), FP4_MAX)
    y = torch.ldexp(xb, -k.unsqueeze(-1))  # a power-of-two division: exact
    y = torch.where(bad.unsqueeze(-1), torch.zeros_like(y), y)
    scales = torch.where(bad, E8M0_NAN, k + E8M0_BIAS).to(torch.uint8)
    return pack_fp4(_round_to_fp4_codes(y)), scales
