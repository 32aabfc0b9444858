"""The fused residual-add + RMSNorm kernel vs its twin, on fresh random inputs.

CPU: the kernel runs in Triton's interpreter in a child process (TRITON_INTERPRET=1 must be set
before triton decorates it); GPU (@pytest.mark.gpu): the 20b width in bf16."""

from __future__ import annotations

import pytest
import torch

from gptoss.kernels import rmsnorm
from gptoss.kernels.rmsnorm import rms_norm, rms_norm_torch

def check_against_twin(device: str, dtype: torch.dtype, T: int, N: int, seed: int,
                       delta_dtype: torch.dtype | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, N, generator=g) * 3).to(dtype).to(device)
    # delta_dtype float32: the MoE's float32 sum, added to the residual stream unrounded
    delta = torch.randn(T, N, generator=g).to(delta_dtype or dtype).to(device)
    w = (torch.rand(N, generator=g) + 0.5).to(dtype).to(device)
    y, h = rms_norm(x, w, 1e-5, residual=delta)
    y_ref, h_ref = rms_norm_torch(x, w, 1e-5, residual=delta)
    # the residual stream is the rounded sum, bit for bit; the norm agrees to a last-bit rounding
    assert torch.equal(h, h_ref), "residual sum differs from x + delta"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
    assert err <= tol, f"normed rows: max err {err:.3g} (tol {tol})"
    y2 = rms_norm(x, w, 1e-5)
    assert torch.equal(y2, rms_norm(x, w, 1e-5)) and y2.shape == x.shape
    err2 = ((y2.float() - rms_norm_torch(x, w, 1e-5).float()).abs().max() / y_ref.float().abs().max()).item()
    assert err2 <= tol, f"without residual: max err {err2:.3g}"


def test_twin_matches_the_reference_formula():
    g = torch.Generator().manual_seed(3)
    x, d, w = torch.randn(5, 48, generator=g), torch.randn(5, 48, generator=g), torch.randn(48, generator=g)
    h = x + d
    ref = w * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    y, h2 = rms_norm_torch(x, w, 1e-5, residual=d)
    assert torch.equal(h2, h) and torch.allclose(y, ref, atol=1e-6)


def test_twin_rounds_a_float32_residual_once():
    g = torch.Generator().manual_seed(4)
    x, d, w = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(3, 64, generator=g), torch.ones(64)
    y, h = rms_norm_torch(x, w.bfloat16(), 1e-5, residual=d)
    assert h.dtype == torch.bfloat16 and torch.equal(h, (x.float() + d).bfloat16())
    assert y.dtype == torch.bfloat16


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"residual \(3, 4\)"):
        rms_norm(torch.randn(3, 8), torch.ones(8), 1e-5, residual=torch.randn(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        rms_norm(torch.randn(2, 3, 8), torch.ones(8), 1e-5)


def test_kernel_in_interpreter():
    if rmsnorm.INTERPRETED:
        pytest.skip("already interpreting")
    code = ("import torch, tests.test_rmsnorm as t\n"
            "from gptoss.kernels import rmsnorm\n"
            "assert rmsnorm.INTERPRETED\n"
            "for T, N, seed in ((1, 64, 0), (7, 100, 1), (3, 2880, 2)):\n"
            "    t.check_against_twin('cpu', torch.float32, T, N, seed)\n"
            "print('ok')\n")
    from interpreted import check_interpreted
    check_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 37, 2048])
def test_gpu_matches_twin(T):
    check_against_twin("cuda", torch.bfloat16, T, 2880, T)
    check_against_twin("cuda", torch.bfloat16, T, 2880, T + 1, delta_dtype=torch.float32)
