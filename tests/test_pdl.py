"""Programmatic dependent launch (gptoss.kernels.pdl): off by default, switched by `enabled`, and on
the GPU a chain of our kernels captured with it in a CUDA graph gives what the plain launches give."""

import pytest
import torch

from gptoss.kernels import pdl


def test_args_follow_enabled():
    assert pdl.args() == {"PDL": False}
    with pdl.enabled(True):
        assert pdl.args() == {"PDL": True, "launch_pdl": True}
        with pdl.enabled(False):
            assert pdl.args() == {"PDL": False}
        assert pdl.args()["PDL"]
    assert pdl.args() == {"PDL": False}


def _chain(x, res, w_norm, w_lin, b_lin):
    """norm + residual -> GEMV -> norm + residual -> GEMV: each kernel reads what the one before it
    wrote and overwrites nothing the one before still reads only if it waits."""
    from gptoss.kernels.gemv import linear_rows
    from gptoss.kernels.rmsnorm import rms_norm
    for _ in range(3):
        y, h = rms_norm(x, w_norm, 1e-5, res)
        x = linear_rows(y, w_lin, b_lin)
        res = h
    return x, res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper (or later) GPU")
def test_pdl_chain_in_graph_matches_plain_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    H = 2880
    x = torch.randn(1, H, generator=g, device="cuda").bfloat16()
    res = torch.randn(1, H, generator=g, device="cuda").bfloat16()
    w_norm = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).bfloat16()
    w_lin = (torch.randn(H, H, generator=g, device="cuda") / H ** 0.5).bfloat16()
    b_lin = (0.1 * torch.randn(H, generator=g, device="cuda")).bfloat16()
    with pdl.enabled(True):
        _chain(x, res, w_norm, w_lin, b_lin)  # compile the PDL variants outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(x, res, w_norm, w_lin, b_lin)
    for _ in range(3):  # fresh inputs each replay: every kernel's result must come from them
        x.copy_(torch.randn(1, H, generator=g, device="cuda"))
        res.copy_(torch.randn(1, H, generator=g, device="cuda"))
        graph.replay()
        ref = _chain(x, res, w_norm, w_lin, b_lin)  # plain launches, deterministic kernels
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
