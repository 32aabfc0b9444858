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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper (or later) GPU")
@pytest.mark.parametrize("splits", [None, 1])
def test_attention_lets_o_launch_early_in_graph_gpu(splits):
    """Batch-1 decode's qkv GEMV -> attention (+ the split combine) -> o GEMV in a PDL graph, where
    attention lets the kernels after it launch before its own wait (attention.TRIGGER_EARLY) and o loads
    all its weights before its wait: each replay, on fresh inputs, gives what plain launches give (a
    kernel reading its input before the one before wrote it would give the last replay's)."""
    from gptoss.kernels import attention as A
    from gptoss.kernels.attention import AttentionOptions, rope_kv_attention
    from gptoss.kernels.gemv import linear_rows
    from gptoss.model.gpt_oss import O_GEMV
    assert A.TRIGGER_EARLY and O_GEMV.preload == 4
    g = torch.Generator(device="cuda").manual_seed(1)
    H, hq, hkv, d, bs, ctx = 2880, 64, 8, 64, 16, 200

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()
    w_qkv, w_o = rnd((hq + 2 * hkv) * d, H, scale=H ** -0.5), rnd(H, hq * d, scale=(hq * d) ** -0.5)
    kc, vc = rnd(ctx // bs + 1, bs, hkv, d), rnd(ctx // bs + 1, bs, hkv, d)
    ang = torch.rand(ctx + 1, d // 2, generator=g, device="cuda") * 6.3
    cos, sin = ang.cos(), ang.sin()
    i32 = dict(dtype=torch.int32, device="cuda")
    tables, qsl = torch.arange(ctx // bs + 1, **i32)[None], torch.tensor([0, 1], **i32)
    seq_lens, slots = torch.tensor([ctx + 1], **i32), torch.tensor([ctx], device="cuda")
    pos, sinks = torch.tensor([ctx], device="cuda"), torch.randn(hq, generator=g, device="cuda")
    opts = AttentionOptions(decode_num_splits=splits)
    x = rnd(1, H)

    def step():
        q, k, v = linear_rows(x, w_qkv).split([hq * d, hkv * d, hkv * d], dim=-1)
        o = rope_kv_attention(q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d)), pos,
                              cos, sin, kc, vc, slots, tables, qsl, seq_lens, 1, ctx + 1, sinks, d ** -0.5, None,
                              None, None, options=opts)
        return linear_rows(o.flatten(1), w_o, None, O_GEMV)
    with pdl.enabled(True):
        step()  # compile the PDL variants outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    for _ in range(3):
        x.copy_(rnd(1, H))
        graph.replay()
        ref = step()  # plain launches
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < 2 ** -7, err
