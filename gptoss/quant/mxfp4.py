"""MXFP4: e2m1 codes in blocks of 32 sharing one e8m0 scale (the OCP microscaling format).

Checkpoint layout (HF gpt-oss): blocks uint8 [..., N, K/32, 16], two codes per byte with the
element of lower index in the low nibble; scales uint8 [..., N, K/32], value 2^(s - 127).
"""

from __future__ import annotations

import torch

BLOCK = 32
# code 0..7 = +{0, .5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
FP4_MAX = 6.0
# e2m1 has an exponent of at most 2 (6 = 1.5 * 2^2): a block's scale exponent is floor(log2 amax) - 2
FP4_EMAX = 2


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
    # 2^(s-127) built from the exponent bits directly, so s = 0 (2^-127) and 254 are exact in fp32;
    # 255 is NaN in e8m0
    s = scales.to(torch.int32)
    out = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s - E8M0_BIAS)
    out = torch.where(s == 255, torch.full_like(out, float("nan")), out)
    return out.to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32] -> [..., N, K] in `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not "
                         f"match: expected blocks [..., N, K/32, 16] and scales [..., N, K/32]")
    values = fp4_lut(blocks.device)[unpack_fp4(blocks).long()]  # [..., N, K/32, 32]
    out = values * e8m0_to_float(scales).unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def _round_to_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """x already divided by its block scale (|x| <= 6 save for saturation): nearest e2m1 code,
    ties to the code with an even mantissa (round-to-nearest-even)."""
    ax = x.abs().clamp(max=FP4_MAX)
    mags = fp4_lut(x.device)[:8]
    # midpoints between neighbours; a tie goes to the neighbour whose code is even
    mid = (mags[1:] + mags[:-1]) / 2  # [7]
    idx = (ax.unsqueeze(-1) > mid).sum(-1)  # strictly above the midpoint -> upper neighbour
    at_mid = (ax.unsqueeze(-1) == mid)  # exactly on a midpoint between code k and k+1
    tie_k = at_mid.float().argmax(-1)
    is_tie = at_mid.any(-1)
    # codes k and k+1: mantissa bit is the code's lowest bit; pick the even one
    even = torch.where(tie_k % 2 == 0, tie_k, tie_k + 1)
    idx = torch.where(is_tie, even, idx)
    sign = (torch.signbit(x) & (idx > 0)).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    The scale is 2^(floor(log2(amax)) - 2) (the OCP rule), so the largest element lands in
    [4, 8) and values above 6 saturate to 6; a zero block gets the smallest scale.
    """
    if x.shape[-1] % BLOCK:
        raise ValueError(f"quantize_mxfp4 needs the last dimension to be a multiple of 32, got {x.shape[-1]}")
    xb = x.float().unflatten(-1, (-1, BLOCK))  # [..., K/32, 32]
    amax = xb.abs().amax(-1)
    amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
    exp = torch.floor(torch.log2(amax.clamp(min=2.0 ** -127))) - FP4_EMAX
    exp = exp.clamp(-E8M0_BIAS, 254 - E8M0_BIAS)
    scale = torch.ldexp(torch.ones_like(exp), exp.to(torch.int32))
    codes = _round_to_fp4_codes(torch.nan_to_num(xb / scale.unsqueeze(-1), nan=0.0))
    return pack_fp4(codes), (exp + E8M0_BIAS).to(torch.uint8)
