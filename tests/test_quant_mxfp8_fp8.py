"""MXFP8 and FP8 (e4m3): the scale rules, e4m3 rounding (exhaustive ties), error bounds, exactness
on representable values, zeros and NaN/inf."""


import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gptoss.quant import dequantize_fp8, dequantize_mxfp8, quantize_fp8, quantize_mxfp8
from gptoss.quant.fp8 import SCALE_FLOOR
from gptoss.quant.mxfp4 import e8m0_to_float
from test_quant_mxfp4 import min_exponent  # the same scale oracle serves both block formats

E4M3 = torch.float8_e4m3fn
# float32 over its whole exponent range up to 2^127 (past that, rounding up can reach 2^128 = inf)
finite_f32 = st.floats(width=32, min_value=-2.0 ** 127, max_value=2.0 ** 127)
# every finite e4m3 byte (0x7f and 0xff are NaN)
e4m3_bytes = st.integers(0, 255).filter(lambda b: b & 0x7F != 0x7F)


def f32(shape_strategy, elements=finite_f32):
    return shape_strategy.flatmap(lambda shp: arrays(np.float32, shp, elements=elements)).map(torch.from_numpy)




def e4m3_bound(x: torch.Tensor, scale: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
    """|dequant - x| allowed: half an ulp of e4m3 (2^-4 relative for normals), or half its
    smallest subnormal (2^-10) times the scale, whichever is larger."""
    x, scale = x.double(), scale.double()
    return torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + slack)


def mx_quant(x):
    """x [n, 32] -> (value bytes [n, 32], scale bytes [n], dequantized float32 [n, 32])."""
    v, s = quantize_mxfp8(x)
    return v.view(torch.uint8), s[:, 0], dequantize_mxfp8(v, s, torch.float32)


def fp8_quant(x):
    q, s = quantize_fp8(x)
    return q.view(torch.uint8), s, dequantize_fp8(q, s, torch.float32)


def tie_cases():
    """Every midpoint between neighbouring positive e4m3 values, with the neighbour whose mantissa
    (its byte's lowest bit) is even, then the same negated; each group of 31 led by 448, which
    pins the scale to 1 in both formats."""
    vals = torch.arange(0x7F, dtype=torch.uint8).view(E4M3).float()  # 0 .. 448, increasing
    mids = (vals[1:] + vals[:-1]) / 2  # exact in float32
    lo = torch.arange(0x7E, dtype=torch.uint8)
    expect = torch.where(lo % 2 == 0, lo, lo + 1)
    mids, expect = torch.cat([mids, -mids]), torch.cat([expect, expect | 0x80])
    n = -(-len(mids) // 31) * 31
    mids = torch.cat([mids, torch.zeros(n - len(mids))]).view(-1, 31)
    expect = torch.cat([expect, torch.zeros(n - len(expect), dtype=torch.uint8)]).view(-1, 31)
    lead = torch.full((len(mids), 1), 448.0)
    return torch.cat([lead, mids], 1), torch.cat([torch.full((len(mids), 1), 0x7E, dtype=torch.uint8), expect], 1)


@pytest.mark.parametrize("quant", [mx_quant, fp8_quant], ids=["mxfp8", "fp8"])
def test_e4m3_ties_round_to_even_exhaustively(quant):
    x, expect = tie_cases()
    got, scale, _ = quant(x)
    assert torch.all(scale == (127 if quant is mx_quant else 1.0))
    assert torch.equal(got, expect)


@settings(deadline=None, max_examples=100)
@given(f32(st.tuples(st.integers(1, 4), st.just(32))))
# one ulp above 448 * 2^+-100: a float log2 rounds the excess away and picks a scale too small
@example(torch.tensor([[float(np.nextafter(np.float32(448 * 2.0 ** e), np.float32(np.inf)))] * 32
                       for e in (100, -100)]))
def test_mxfp8_scale_rule_and_error_bound(x):
    vbytes, scales, out = mx_quant(x)
    # the scale: the smallest power of two that fits the block max into 448 (nothing overflows)
    assert scales.tolist() == [min_exponent(a, 448.0) + 127 for a in x.abs().amax(-1).tolist()]
    assert not torch.any(vbytes & 0x7F == 0x7F)  # no NaN from finite input
    s = e8m0_to_float(scales).unsqueeze(-1)
    assert ((out.double() - x.double()).abs() <= e4m3_bound(x, s)).all()


@settings(deadline=None, max_examples=100)
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(
    arrays(np.uint8, (n, 32), elements=e4m3_bytes),
    arrays(np.uint8, (n,), elements=st.integers(0, 246)))))  # 448 * 2^(246-127) is finite in fp32
def test_mxfp8_representable_values_roundtrip_exactly(case):
    vbytes, sbytes = (torch.from_numpy(a) for a in case)
    x = vbytes.view(E4M3).float() * e8m0_to_float(sbytes).unsqueeze(-1)
    got_bytes, scales, out = mx_quant(x)
    assert torch.equal(out, x)
    # where the block max is in e4m3's top binade [256, 448] the bytes come back too
    top = (vbytes & 0x7F >= 0x78).any(-1)
    assert torch.equal(scales[top], sbytes[top]) and torch.equal(got_bytes[top], vbytes[top])


@settings(deadline=None, max_examples=100)
@given(f32(st.one_of(st.tuples(st.integers(1, 64)), st.tuples(st.integers(1, 4), st.integers(1, 40)))),
       st.booleans())
def test_fp8_scale_and_error_bound(x, per_token):
    if per_token and x.dim() == 1:
        x = x.unsqueeze(0)
    q, scale = quantize_fp8(x, per_token=per_token)
    amax = x.abs().amax(-1, keepdim=True) if per_token else x.abs().amax()
    assert scale.dtype == torch.float32 and scale.shape == amax.shape
    # scale = amax / 448 (one float32 rounding), never below the floor
    ideal = torch.clamp(amax.double() / 448, min=SCALE_FLOOR)
    assert ((scale.double() - ideal).abs() <= ideal * 2.0 ** -24).all()
    # the element holding amax lands on 448 unless the floor kicked in
    qmax = q.float().abs().amax(-1, keepdim=True) if per_token else q.float().abs().amax()
    assert (qmax[amax.double() / 448 >= SCALE_FLOOR] == 448).all()
    err = (dequantize_fp8(q, scale, torch.float32).double() - x.double()).abs()
    # the 2^-20 slack covers the float32 rounding of x / scale and q * scale (2^-24 each)
    assert (err <= e4m3_bound(x, scale, slack=2.0 ** -20)).all()


@settings(deadline=None, max_examples=50)
@given(f32(st.tuples(st.integers(1, 5), st.integers(1, 40))))
def test_fp8_per_token_is_per_tensor_on_each_row(x):
    q, scale = quantize_fp8(x, per_token=True)
    for i in range(x.shape[0]):
        qi, si = quantize_fp8(x[i])
        assert torch.equal(q[i].view(torch.uint8), qi.view(torch.uint8)) and scale[i, 0] == si


@settings(deadline=None, max_examples=50)
@given(arrays(np.uint8, st.integers(1, 64), elements=e4m3_bytes), st.integers(-60, 60))
def test_fp8_representable_values_roundtrip_exactly(vbytes, j):
    vbytes = torch.from_numpy(vbytes)
    vbytes[0] = 0x7E  # 448: with it the scale is exactly 2^j
    x = torch.ldexp(vbytes.view(E4M3).float(), torch.tensor(j))
    qbytes, scale, out = fp8_quant(x)
    assert scale == 2.0 ** j and torch.equal(qbytes, vbytes) and torch.equal(out, x)


def test_zeros():
    x = torch.zeros(2, 64)
    x[1] = -0.0
    v, s = quantize_mxfp8(x)
    assert s.eq(0).all() and dequantize_mxfp8(v, s, torch.float32).eq(0).all()
    q, scale = quantize_fp8(x)
    assert scale == SCALE_FLOOR and dequantize_fp8(q, scale, torch.float32).eq(0).all()
    q, scale = quantize_fp8(x, per_token=True)
    assert scale.shape == (2, 1) and scale.eq(SCALE_FLOOR).all() and q.float().eq(0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_becomes_nan_and_leaves_neighbours_alone(bad):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x[1, 5] = 1e4  # the largest element: were it dropped, its neighbours would quantize differently
    clean = x.clone()
    clean[1, 5] = 0.0
    x[1, 5] = bad
    nan_at = torch.zeros_like(x, dtype=torch.bool)
    nan_at[1, 5] = True
    for quant, dequant, kw in ((quantize_mxfp8, dequantize_mxfp8, {}), (quantize_fp8, dequantize_fp8, {}),
                               (quantize_fp8, dequantize_fp8, {"per_token": True})):
        q, s = quant(x, **kw)
        q0, s0 = quant(clean, **kw)
        assert torch.equal(s, s0)  # non-finite elements do not enter the scale
        out, out0 = dequant(q, s, torch.float32), dequant(q0, s0, torch.float32)
        assert torch.equal(out.isnan(), nan_at) and torch.equal(out[~nan_at], out0[~nan_at])
    # a block with nothing finite: NaN values, scale byte 0
    v, s = quantize_mxfp8(torch.full((32,), bad))
    assert s.item() == 0 and dequantize_mxfp8(v, s, torch.float32).isnan().all()


def test_mxfp8_shapes_and_dtypes():
    x = torch.randn(3, 2, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    v, s = quantize_mxfp8(x)
    assert v.shape == (3, 2, 96) and v.dtype == E4M3 and s.shape == (3, 2, 3) and s.dtype == torch.uint8
    assert dequantize_mxfp8(v, s).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp8(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp8(v, s[..., :2])
