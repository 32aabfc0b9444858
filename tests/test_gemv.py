"""gemv.linear_rows (the batch-1 output projection and router) vs its twin, on fresh random inputs.

CPU: the kernel runs in Triton's interpreter in a child process (TRITON_INTERPRET=1 must be set
before triton decorates it), in float32 (the interpreter's fp32 -> bf16 cast truncates); GPU
(@pytest.mark.gpu): the 20b shapes in bf16, where one output may round to the other side of a
bf16 ulp (the sums run in another order)."""

from __future__ import annotations

import pytest
import torch

from gptoss.kernels.gemv import (GemvOptions, embed_norm_linear_rows, embed_norm_linear_rows_torch, linear_rows,
                                 linear_rows_route, linear_rows_torch, rms_norm_linear_rows, rms_norm_linear_rows_torch)

def check_against_twin(device: str, dtype: torch.dtype, M: int, N: int, K: int, bias: bool, opts, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    y = linear_rows(x, w, b, opts)
    ref = linear_rows_torch(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert err <= tol, (M, N, K, bias, opts, err)


def check_norm_against_twin(device: str, dtype: torch.dtype, N: int, K: int, res_dtype: torch.dtype, opts,
                            seed: int, t_chunk_order: bool = False):
    """The norm + GEMV kernel: t and h as rms_norm gives them (a bf16 t may round the other way where
    the sum of squares differs in its last bit), y as linear_rows of that t (t_chunk_order: t written
    in moe_token's chunk order)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, K, generator=g).to(dtype).to(device)
    r = torch.randn(1, K, generator=g).to(res_dtype).to(device)
    nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    t, h, y = rms_norm_linear_rows(x, r, nw, 1e-5, w, b, opts, t_chunk_order)
    t_ref, h_ref, y_ref = rms_norm_linear_rows_torch(x, r, nw, 1e-5, w, b)
    assert t.dtype == h.dtype == y.dtype == dtype and y.shape == (1, N)
    if t_chunk_order:
        from gptoss.kernels.moe_token import natural_order
        assert t.shape == (1, 64 * -(-K // 64))
        t = natural_order(t, K)
    assert torch.equal(h, h_ref)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for name, a, ref in (("t", t, t_ref), ("y", y, y_ref)):
        err = ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err <= tol, (name, N, K, opts, err)


def check_embed_against_twin(device: str, dtype: torch.dtype, V: int, N: int, K: int, opts, seed: int):
    """The embedding's row gathered into the norm + GEMV kernel (the first layer's qkv): h the table's
    row ids[0] exactly, t and y as the twin's (rms_norm then linear_rows_torch), a fresh id a call."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, K, generator=g).to(dtype).to(device)
    nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    for _ in range(2):
        ids = torch.randint(V, (1,), generator=g).to(device)
        t, h, y = embed_norm_linear_rows(ids, table, nw, 1e-5, w, b, opts)
        t_ref, h_ref, y_ref = embed_norm_linear_rows_torch(ids, table, nw, 1e-5, w, b)
        assert torch.equal(h, h_ref) and y.shape == (1, N) and t.dtype == y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        for name, a, ref in (("t", t, t_ref), ("y", y, y_ref)):
            err = ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert err <= tol, (name, V, N, K, opts, err)


def test_embed_gemv_rejects_bad_ids():
    table, w, nw = torch.randn(10, 8), torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="one int64 id"):
        embed_norm_linear_rows(torch.tensor([1, 2]), table, nw, 1e-5, w)
    with pytest.raises(ValueError, match="one int64 id"):
        embed_norm_linear_rows(torch.tensor([1], dtype=torch.int32), table, nw, 1e-5, w)
    with pytest.raises(ValueError, match="as wide as w's"):
        embed_norm_linear_rows(torch.tensor([1]), table, nw, 1e-5, torch.randn(4, 6))


def check_route_against_twin(device: str, dtype: torch.dtype, N: int, K: int, E: int, opts, seed: int):
    """The o GEMV with the router folded in (router_partials): h and u as the twin's epilogue on
    linear_rows_torch's y (a bf16 output may round the other way where y's sums differ in their last
    bit), the slots' sums adding up to the twin's, the next buffer zeroed; and the identity it rests
    on: the finished logits are the router's over rms_norm(h)."""
    from gptoss.kernels import router_partials as RP
    from gptoss.kernels.moe_token import natural_order
    from gptoss.kernels.rmsnorm import rms_norm_torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    r = torch.randn(1, N, generator=g).to(dtype).to(device)
    nw = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype).to(device)
    wr = torch.randn(E, N, generator=g).to(dtype).to(device)
    rb = torch.randn(E, generator=g).to(dtype).to(device)
    sums, nxt = RP.new_sums(E, device), torch.randn(RP.SLOTS, RP.width(E), generator=g).to(device)
    h, u = linear_rows_route(x, w, b, r, nw, wr, sums, nxt, opts)
    ref = torch.zeros_like(sums)
    h_ref, u_ref = RP.route_torch(linear_rows_torch(x, w, b), r, nw, wr, ref)
    assert h.shape == (1, N) and u.shape == (1, 64 * -(-N // 64)) and h.dtype == u.dtype == dtype
    assert torch.equal(nxt, torch.zeros_like(nxt))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for name, a, want in (("h", h, h_ref), ("u", natural_order(u, N), u_ref), ("sums", sums.sum(0), ref[0])):
        err = ((a.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert err <= tol, (name, N, K, E, opts, err)
    assert not sums[:, E + 1:].any()
    lg, _ = RP.finish_logits_torch(RP.RouterPartials(sums, rb, 1e-5, N, E))
    want = rms_norm_torch(h_ref, nw, 1e-5).float() @ wr.float().T + rb.float()
    err = ((lg.float() - want).abs().max() / want.abs().max()).item()
    assert err <= (1e-5 if dtype == torch.float32 else 2 ** -6), (N, K, E, err)


def test_route_gemv_rejects_bad_buffers():
    from gptoss.kernels import router_partials as RP
    x, w, r, nw, wr = torch.randn(1, 8), torch.randn(4, 8), torch.randn(1, 4), torch.ones(4), torch.randn(3, 4)
    s = RP.new_sums(3, "cpu")
    with pytest.raises(ValueError, match="two contiguous float32 buffers"):
        linear_rows_route(x, w, None, r, nw, wr, s, s)  # the same buffer twice
    with pytest.raises(ValueError, match="two contiguous float32 buffers"):
        linear_rows_route(x, w, None, r, nw, wr, torch.zeros(16, 3), torch.zeros(16, 3))  # no room for sum(h^2)
    with pytest.raises(ValueError, match="one row"):
        linear_rows_route(x, w, None, torch.randn(1, 5), nw, wr, s, RP.new_sums(3, "cpu"))


def test_norm_gemv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one row of the same K"):
        rms_norm_linear_rows(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-5, torch.randn(4, 8))
    with pytest.raises(ValueError, match="one row of the same K"):
        rms_norm_linear_rows(torch.randn(1, 8), torch.randn(1, 8), torch.ones(8), 1e-5, torch.randn(4, 6))


def test_rejects_more_rows_and_mismatched_k():
    with pytest.raises(ValueError, match=r"M <= 2"):
        linear_rows(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"the same K"):
        linear_rows(torch.randn(1, 8), torch.randn(4, 6))


def test_rejects_preload_that_cannot_cover_k():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    for opts in (GemvOptions(2, 2, preload=2), GemvOptions(2, 8, preload=5), GemvOptions(2, 8, preload=0),
                 GemvOptions(2, 8, preload=2, programs_per_sm=1)):
        with pytest.raises(ValueError, match="preload takes 1 to 4 K steps"):
            linear_rows(x, w, None, opts)


def test_model_drops_o_preload_only_where_it_cannot_cover_k():
    from gptoss.model.gpt_oss import O_GEMV, _covering
    assert _covering(O_GEMV, 4096) is O_GEMV and O_GEMV.preload > 1
    assert _covering(O_GEMV, O_GEMV.preload * O_GEMV.block_k + 1).preload == 1


def test_kernel_in_interpreter():
    code = ("import torch, tests.test_gemv as t\n"
            "from gptoss.kernels.gemv import GemvOptions as O\n"
            "cases = ((1, 40, 300, True, O()), (2, 33, 1000, False, O(16, 128)), (1, 5, 2048, True, O(2, 512)),\n"
            "         (2, 64, 64, True, O(8, 1024)), (1, 32, 2880, True, O(1, 1024)),\n"
            "         (1, 40, 300, True, O(4, 128, programs_per_sm=1)), (2, 33, 1000, False, O(2, 256, programs_per_sm=2)))\n"
            "for i, (M, N, K, b, o) in enumerate(cases):\n"
            "    t.check_against_twin('cpu', torch.float32, M, N, K, b, o, i)\n"
            "for i, (N, K, rd, o) in enumerate(((32, 2880, torch.float32, O(1, 4096, 8)),\n"
            "                                   (5, 300, torch.float32, O(2, 128)), (24, 300, torch.float32, O(8, 128)),\n"
            "                                   (40, 300, torch.float32, O(4, 128, programs_per_sm=1)))):\n"
            "    t.check_norm_against_twin('cpu', torch.float32, N, K, rd, o, 10 + i)\n"
            "t.check_norm_against_twin('cpu', torch.float32, 24, 300, torch.float32, O(8, 128), 15, True)\n"
            "# preload: all of K before the wait, in 2-4 steps (the last partly past K); two rows ignore it\n"
            "for i, (M, N, K, o) in enumerate(((1, 7, 4096, O(2, 1024, preload=4)),\n"
            "                                   (1, 33, 1000, O(2, 256, preload=4)), (1, 9, 700, O(4, 256, preload=3)),\n"
            "                                   (1, 9, 512, O(4, 256, preload=2)), (2, 33, 1000, O(2, 256, preload=4)))):\n"
            "    t.check_against_twin('cpu', torch.float32, M, N, K, True, o, 30 + i)\n"
            "t.check_norm_against_twin('cpu', torch.float32, 24, 300, torch.float32, O(8, 128, preload=3), 40, True)\n"
            "# the embedding's row gathered in (the first layer's qkv), preloaded and stepped\n"
            "t.check_embed_against_twin('cpu', torch.float32, 50, 24, 300, O(8, 128, preload=3), 45)\n"
            "t.check_embed_against_twin('cpu', torch.float32, 7, 33, 1000, O(2, 256), 46)\n"
            "# the o GEMV with the router folded in: preloaded or stepped K, strips past N, 5-40 experts\n"
            "for i, (N, K, E, o) in enumerate(((40, 300, 8, O(2, 128, preload=3)), (96, 256, 32, O(2, 128)),\n"
            "                                  (33, 128, 5, O(4, 64, preload=2)), (70, 512, 40, O(8, 128)))):\n"
            "    t.check_route_against_twin('cpu', torch.float32, N, K, E, o, 50 + i)\n"
            "import gptoss.kernels.gemv as g\n"
            "g.ROUTE_WEIGHTS_EARLY = False  # the router's weights loaded in the epilogue, the A/B switch\n"
            "t.check_route_against_twin('cpu', torch.float32, 40, 300, 8, O(2, 128, preload=3), 54)\n"
            "g.ONE_ROW_PATH = False  # one row through the two-row (3-D) form, the A/B switch\n"
            "t.check_against_twin('cpu', torch.float32, 1, 40, 300, True, O(), 20)\n"
            "t.check_norm_against_twin('cpu', torch.float32, 5, 300, torch.float32, O(2, 128), 21)\n"
            "print('ok')\n")
    from interpreted import check_interpreted
    check_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("res_dtype", [torch.bfloat16, torch.float32])
def test_gpu_norm_gemv_matches_twin(res_dtype):
    from gptoss.model.gpt_oss import QKV_GEMV, QKV_NORM_GEMV, ROUTER_GEMV
    for i, (N, K, o) in enumerate(((32, 2880, ROUTER_GEMV), (32, 2880, GemvOptions()), (640, 2880, GemvOptions(2, 512)),
                                   (5120, 2880, QKV_GEMV), (5120, 2880, QKV_NORM_GEMV))):
        check_norm_against_twin("cuda", torch.bfloat16, N, K, res_dtype, o, i)
    check_norm_against_twin("cuda", torch.bfloat16, 32, 2880, res_dtype, ROUTER_GEMV, 9, t_chunk_order=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_embed_gemv_matches_twin():
    from gptoss.model.gpt_oss import QKV_NORM_GEMV
    for i, o in enumerate((QKV_NORM_GEMV, GemvOptions())):
        check_embed_against_twin("cuda", torch.bfloat16, 201088, 5120, 2880, o, 70 + i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_route_gemv_matches_twin():
    from gptoss.model.gpt_oss import O_GEMV
    for i, (N, K, E, o) in enumerate(((2880, 4096, 32, O_GEMV), (2880, 4096, 128, GemvOptions()),
                                      (2880, 2048, 32, GemvOptions(2, 1024, preload=2)))):
        check_route_against_twin("cuda", torch.bfloat16, N, K, E, o, 60 + i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M,N,K,bias", [(1, 2880, 4096, True), (1, 5120, 2880, True), (2, 2880, 4096, False),
                                        (1, 1440, 2048, False), (1, 32, 2880, True)])
def test_gpu_matches_twin(M, N, K, bias):
    from gptoss.model.gpt_oss import O_GEMV
    for opts in (GemvOptions(), GemvOptions(8, 512), GemvOptions(16, 256, 4, 3), GemvOptions(1, 1024),
                 GemvOptions(4, 1024, programs_per_sm=4), GemvOptions(2, 512, programs_per_sm=8), O_GEMV,
                 GemvOptions(1, 1024, preload=4)):
        check_against_twin("cuda", torch.bfloat16, M, N, K, bias, opts, M + N)
