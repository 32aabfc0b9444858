"""The Triton MoE backends ("triton", "triton_fp8", "triton_mxfp8") and their kernels.

Every kernel against its plain-torch twin, every backend against "torch", on fresh random inputs
(never zeros). On CPU the kernels run under Triton's interpreter on tiny shapes, in a child process
started by test_interpreter_suite with TRITON_INTERPRET=1 (tests taking the `interp` fixture run
only there). GPU tests (marked gpu) cover the gpt-oss shapes.

Errors are normalised by max|ref|. bf16 backends: max 2e-2, RMS 4e-3.
fp8 / mxfp8 (e4m3 activations, 3 mantissa bits), the bound derived: rounding to nearest leaves each
activation a relative error of at most 2^-4 and of RMS u = 2^-3/sqrt(12) * 0.72 = 2.6% (an ulp is
2^-3 of the leading power of two; 0.72 is the mean of 1/mantissa). A dot product sums these
independent errors, so gate_up's output carries u of its own RMS; SwiGLU (slope <= ~1.1) passes it
on and the down GEMM adds u again for its quantized input: RMS(out - ref) ~ sqrt(2) u = 3.7% of
RMS(ref). The weights add nothing (e2m1 codes times a power of two are exact in e4m3 and bf16).
We assert RMS(out - ref) <= 7.5% of RMS(ref) (2x the estimate) and max|out - ref| <= 0.1 max|ref|
(the largest of n errors and the largest of n outputs both sit near z_n sigma, so their ratio is
also ~3.7%; 0.1 leaves room for the scatter of 64-output tiny cases). Measured: RMS ratio 2.5-5.8%,
max 2.7-7.4% on the tiny CPU cases. Against their own torch twins (the same quantization in torch)
the fp8/mxfp8 kernels agree to float32 accumulation order: max 5e-3, RMS 5e-4 (fp8 on Hopper:
2e-2 / 2e-3, its MMA accumulates each 128-deep K step at reduced precision).
"""

from __future__ import annotations

import itertools
import os
import types

import pytest
import torch

from gptoss.kernels.moe_gemm import INTERPRETED
from gptoss.moe import get_moe_backend, list_moe_backends
from gptoss.moe.base import MoESpec, MoEWeights
from gptoss.moe.registry import _REGISTRY

BACKENDS = ("triton", "triton_fp8", "triton_mxfp8")
ACT = {"triton": "bf16", "triton_fp8": "fp8", "triton_mxfp8": "mxfp8"}
TOL_BF16 = (2e-2, 4e-3)  # max, RMS, normalised by max|ref|


# ----------------------------------------------------------------------------- helpers


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.float() - ref.float())
    m = ref.float().abs().max().clamp(min=1e-30)
    return (d.abs().max() / m).item(), (d.pow(2).mean().sqrt() / m).item()


def assert_backend_close(out: torch.Tensor, ref: torch.Tensor, act: str, what=()) -> None:
    """The module docstring's bounds: bf16 2e-2 / 4e-3; fp8, mxfp8 max 0.1, RMS 7.5% of RMS(ref)."""
    em, er = errors(out, ref)
    if act == "bf16":
        assert em < TOL_BF16[0] and er < TOL_BF16[1], (*what, em, er)
    else:
        ratio = ((out.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()
        assert em < 0.1 and ratio < 0.075, (*what, em, ratio)


def distinct_logits(T: int, E: int, gen: torch.Generator, device="cpu", dtype=torch.bfloat16) -> torch.Tensor:
    """Router logits without ties within a row (torch.topk leaves the order of ties open)."""
    ranks = torch.argsort(torch.rand(T, E, generator=gen, device=device), dim=1).float()
    return ((ranks - E / 2) * (4.0 / E) + 0.5 * torch.randn(T, 1, generator=gen, device=device)).to(dtype)


def random_weights(spec: MoESpec, gen: torch.Generator, device="cpu") -> MoEWeights:
    """MXFP4 expert weights of RMS ~ 1/sqrt(fan_in): random codes, scale exponents 2^-8 .. 2^-6."""
    E, I2, H = spec.local_experts, 2 * spec.intermediate_size, spec.hidden_size

    def mx(n, k):
        blocks = torch.randint(0, 256, (E, n, k // 32, 16), generator=gen, device=device, dtype=torch.uint8)
        base = 127 - 2 - round(0.5 * torch.log2(torch.tensor(float(k))).item())
        scales = torch.randint(base - 1, base + 2, (E, n, k // 32), generator=gen, device=device).to(torch.uint8)
        return blocks, scales

    b1, s1 = mx(I2, H)
    b2, s2 = mx(H, I2 // 2)
    return MoEWeights(b1, s1, (0.1 * torch.randn(E, I2, generator=gen, device=device)).bfloat16(),
                      b2, s2, (0.1 * torch.randn(E, H, generator=gen, device=device)).bfloat16())


def slice_weights(w: MoEWeights, experts: slice = slice(None), inter: slice | None = None) -> MoEWeights:
    """A rank's share: an expert slice and (TP) a slice of the intermediate dimension."""
    g = [t[experts] for t in (w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias,
                              w.down_blocks, w.down_scales, w.down_bias)]
    if inter is not None:
        rows = slice(2 * inter.start, 2 * inter.stop)  # interleaved gate/up rows
        g[0], g[1], g[2] = g[0][:, rows], g[1][:, rows], g[2][:, rows]
        blk = slice(inter.start // 32, inter.stop // 32)
        g[3], g[4] = g[3][:, :, blk], g[4][:, :, blk]
    return MoEWeights(*(t.contiguous() for t in g))


def torch_backend(weights: MoEWeights, spec: MoESpec):
    return get_moe_backend("torch", "cpu", None)(weights, spec, torch.bfloat16)


@pytest.fixture(scope="module")
def interp():
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child process of test_interpreter_suite")
    from gptoss.kernels import moe_gemm, moe_routing
    from gptoss.moe import triton_backends
    return types.SimpleNamespace(routing=moe_routing, gemm=moe_gemm, backends=triton_backends)


def test_interpreter_suite():
    """Runs this file's interpreter tests in a child process with TRITON_INTERPRET=1 from the start:
    Triton decides interpreted or compiled when `triton` and each kernel module are imported, and
    one process cannot hold both (the interpreter needs triton.language's own jit functions
    interpreted too), so the child keeps the interpreter away from every other test."""
    if INTERPRETED:
        pytest.skip("this is the child")
    from interpreted import run_interpreted
    r = run_interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)])
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail


def check_routing(r, q, n_local=None):
    n = int(q.expert_offsets[-1]) if n_local is None else n_local
    assert torch.equal(r.topk_ids.cpu(), q.topk_ids.cpu())
    torch.testing.assert_close(r.topk_weights.cpu(), q.topk_weights.cpu(), atol=1e-6, rtol=1e-5)
    assert torch.equal(r.expert_offsets.cpu(), q.expert_offsets.cpu())
    assert torch.equal(r.sorted_assign[:n].cpu(), q.sorted_assign[:n].cpu())
    assert torch.equal(r.assign_pos.cpu(), q.assign_pos.cpu())
    assert torch.equal(r.tile_expert.cpu(), q.tile_expert.cpu())
    assert torch.equal(r.tile_row.cpu(), q.tile_row.cpu())


# ----------------------------------------------------------------------------- registry


def test_registered_and_not_supported_on_cpu_without_interpreter():
    names = list_moe_backends()
    for name in BACKENDS:
        assert name in names
    if INTERPRETED:
        pytest.skip("this process imported the kernels under TRITON_INTERPRET=1")
    for name in BACKENDS:
        ok, why = _REGISTRY[name].is_supported(torch.device("cpu"), None)
        assert not ok and "TRITON_INTERPRET" in why
        with pytest.raises(ValueError, match="cannot run here"):
            get_moe_backend(name, "cpu", None)
    assert get_moe_backend("auto", "cpu", None).name == "torch"


def test_compute_capability_limits(monkeypatch):
    from gptoss.moe import triton_backends as tb
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    ok, why = tb.TritonFp8MoE.is_supported(torch.device("cuda"), None)
    assert not ok and "8.9" in why and "8.0" in why
    ok, why = tb.TritonMoE.is_supported(torch.device("cuda"), None)
    assert not ok and "9.0" in why
    assert tb.TritonMxfp8MoE.is_supported(torch.device("cuda"), None) == (True, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    for cls in (tb.TritonMoE, tb.TritonFp8MoE, tb.TritonMxfp8MoE):
        assert cls.is_supported(torch.device("cuda"), None) == (True, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    ok, why = tb.TritonMxfp8MoE.is_supported(torch.device("cuda"), None)
    assert not ok and "7.5" in why


def test_bf16x2_encoding_roundtrip():
    from gptoss.kernels.moe_gemm import _BF16X2_BITS, decode_bf16x2, encode_bf16x2
    assert sorted(b for sign, mag in _BF16X2_BITS for b in (sign, *mag)) == list(range(32))
    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, 256, (3, 5, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(decode_bf16x2(encode_bf16x2(d)), d)
    assert not encode_bf16x2(torch.zeros(4, 8, dtype=torch.uint8)).any()  # zero padding stays zero


def test_interpreted_backends_supported_on_cpu(interp):
    for name in BACKENDS:
        assert get_moe_backend(name, "cpu", None).is_supported(torch.device("cpu"), None) == (True, "")


# ----------------------------------------------------------------------------- kernels vs twins (interpreter)


@pytest.mark.parametrize("T,E,k,start,n_local,block_m,block_t", [
    (1, 8, 4, 0, 8, 16, 0),       # decode: one fused program
    (6, 8, 4, 2, 4, 16, 0),       # an expert slice (EP rank)
    (37, 8, 4, 0, 8, 32, 8),      # several token blocks: top-k, offsets, scatter kernels
    (20, 6, 3, 1, 4, 16, 4),      # top_k not a power of two
])
def test_routing_matches_twin(interp, T, E, k, start, n_local, block_m, block_t):
    R = interp.routing
    g = torch.Generator().manual_seed(T * 100 + E)
    lg = distinct_logits(T, E, g)
    o = R.RoutingOptions(block_m=block_m, block_t=block_t)
    check_routing(R.moe_routing(lg, k, start, n_local, o), R.moe_routing_torch(lg, k, start, n_local, o))


def test_routing_every_token_on_one_expert(interp):
    R = interp.routing
    g = torch.Generator().manual_seed(1)
    lg = distinct_logits(19, 8, g)
    lg[:, 5] = 10.0  # expert 5 first for every token
    o = R.RoutingOptions(block_m=16, block_t=8)
    r = R.moe_routing(lg, 2, 0, 8, o)
    check_routing(r, R.moe_routing_torch(lg, 2, 0, 8, o))
    assert (r.topk_ids[:, 0] == 5).all()
    counts = r.expert_offsets.diff()
    assert counts[5] == 19 and int(counts.sum()) == 38


@pytest.mark.parametrize("act,swap,layout_bk,fused,enc,prefetch", [
    ("bf16", False, 0, False, "e2m1", 0), ("bf16", False, 64, True, "bf16x2", 2),
    ("bf16", False, 0, False, "bf16x2", 1), ("fp8", False, 64, False, "e2m1", 1),
    ("fp8", True, 0, True, "e2m1", 0), ("mxfp8", False, 0, True, "e2m1", 2),
    ("mxfp8", True, 64, False, "e2m1", 0),
])
def test_gemms_match_twins(interp, act, swap, layout_bk, fused, enc, prefetch):
    G, R = interp.gemm, interp.routing
    g = torch.Generator().manual_seed(7)
    # K = 160 (gate_up) and 96 (down) are not multiples of block_k 64: the masked tails; with
    # split_k 2 gate_up's K splits into 128 + 32, down's into 64 + 32
    T, E, k, H, I = 5, 4, 2, 160, 96
    spec = MoESpec(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    w = random_weights(spec, g)
    x = torch.randn(T, H, generator=g).bfloat16()
    r = R.moe_routing(distinct_logits(T, E, g), k, 0, E, R.RoutingOptions(block_m=16))
    bk = 64  # the down GEMM's K = 96: a masked tail (row layout) or a padded block (k-blocked)
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, layout_bk, act == "fp8", enc)
    w2 = G.prepare_mxfp4_weight(w.down_blocks, w.down_scales, layout_bk, act == "fp8", enc)
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    # the "fused" cases split K in both GEMMs (partial sums in fp32 atomics)
    o1 = G.GemmOptions(block_n=64, block_k=bk, swap_ab=swap, split_k=2 if fused else 1, prefetch=prefetch)
    o2 = G.GemmOptions(block_n=64, block_k=bk, swap_ab=swap, split_k=2 if fused else 1, prefetch=prefetch)
    x_amax = G.row_absmax(x) if act == "fp8" else None
    if x_amax is not None:
        torch.testing.assert_close(x_amax, G.row_absmax_torch(x), rtol=0, atol=0)
    a, a_amax = G.moe_gate_up(x, r, w1, b1, act, 1.702, 7.0, o1, x_amax)
    a_t, a_amax_t = G.moe_gate_up_torch(x, r, w1, b1, act, 1.702, 7.0, o1, x_amax)
    n = T * k
    em, er = errors(a[:n], a_t[:n])
    assert em < 4e-3 and er < 5e-4, (em, er)  # a few bf16 roundings may differ by one ulp
    if act == "fp8":
        torch.testing.assert_close(a_amax.amax(1), a_amax_t.amax(1))
    y = G.moe_down(a, a_amax, r, w2, b2, act, o2, 0, E, fused, torch.bfloat16)
    y_t = G.moe_down_torch(a, a_amax, r, w2, b2, act, o2, 0, E, fused, torch.bfloat16)
    em, er = errors(y, y_t)
    assert em < 4e-3 and er < 5e-4, (em, er)


def check_fragments(G, R, g, device, T, block_m, opts, E=4, k=2, H=160, I=96, tol=(4e-3, 5e-4), scale_shift=0):
    """Both GEMMs with "fragments" weights against the twins of the checkpoint-layout weights.
    scale_shift: every block scale that much larger (and x that much smaller), past 128 for 12: the
    upcast's two-multiply mode."""
    w = random_weights(MoESpec(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I), g, device)
    w.gate_up_scales += scale_shift
    w.down_scales += scale_shift
    x = (torch.randn(T, H, generator=g, device=device) * 2.0 ** -scale_shift).bfloat16()
    r = R.moe_routing(distinct_logits(T, E, g, device), k, 0, E, R.RoutingOptions(block_m=block_m))
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    f1, f2, c1, c2 = (G.prepare_mxfp4_weight(b, s, 0, False, enc, frag)
                      for enc, frag in (("bf16x2", True), ("e2m1", False)) for b, s in
                      ((w.gate_up_blocks, w.gate_up_scales), (w.down_blocks, w.down_scales)))
    assert f1.fragments and f1.data.shape == (E, 2 * I // 4, 2 * ((H + 63) // 64 * 64))
    assert f1.upcast_mode == (1 if int(w.gate_up_scales.max()) > 128 else 2), f1.upcast_mode
    for o in opts:
        fused = o.split_k > 1 or block_m == 16
        a, _ = G.moe_gate_up(x, r, f1, b1, "bf16", 1.702, 7.0, o)
        a_t, _ = G.moe_gate_up_torch(x, r, c1, b1, "bf16", 1.702, 7.0, o)
        em, er = errors(a[:T * k], a_t[:T * k])
        assert em < tol[0] and er < tol[1], ("gate_up", o, em, er)
        y = G.moe_down(a, None, r, f2, b2, "bf16", o, 0, E, fused, torch.bfloat16)
        y_t = G.moe_down_torch(a, None, r, c2, b2, "bf16", o, 0, E, fused, torch.bfloat16)
        em, er = errors(y, y_t)
        assert em < max(tol[0], 2 ** -7 + 1e-4) and er < tol[1], ("down", o, em, er)
    with pytest.raises(ValueError, match="needs swap_ab=True"):
        G.moe_gate_up(x, r, f1, b1, "bf16", 1.702, 7.0, G.GemmOptions(block_n=64, block_k=64))
    return w


def test_fragments_layout_roundtrip():
    from gptoss.kernels import moe_gemm as G
    g = torch.Generator().manual_seed(3)
    for K in (64, 96, 160):  # Kp 64, 128, 192: zero padding on the last two
        d = torch.randint(0, 256, (2, 32, K // 2), generator=g, dtype=torch.uint8)
        s = torch.randint(0, 256, (2, 32, K // 32), generator=g, dtype=torch.uint8)
        D, S = G.swizzle_fragments(d, s)
        # the documented position of one byte and one scale: n = 16G + 8h + 2p + s, j = 32C + 8q + 4w + t
        for (Gi, h, p, si, C, q, w, t) in ((1, 1, 2, 1, 0, 3, 1, 2), (0, 0, 3, 0, K // 64 - 1, 1, 0, 3)):
            n, j = 16 * Gi + 8 * h + 2 * p + si, 32 * C + 8 * q + 4 * w + t
            if 2 * j < K:
                assert D[1, 4 * Gi + p, 128 * C + 64 * si + 16 * t + 4 * q + 2 * w + h] == d[1, n, j]
                assert S[1, 4 * Gi + p, 8 * C + 4 * si + 2 * (q // 2) + h] == s[1, n, j // 16]
        d2, s2 = G.unswizzle_fragments(D, S, K)
        assert torch.equal(d2, d) and torch.equal(s2, s)
        wf = G.prepare_mxfp4_weight(d.reshape(2, 32, K // 32, 16), s, 0, False, "bf16x2", True)
        blocks, scales = wf.checkpoint_layout()
        assert torch.equal(blocks.reshape(2, 32, K // 2), d) and torch.equal(scales, s)
    with pytest.raises(ValueError, match="multiple of 16"):
        G.swizzle_fragments(d[:, :24], s[:, :24])
    with pytest.raises(ValueError, match="fragments layout takes"):
        G.prepare_mxfp4_weight(d.reshape(2, 32, K // 32, 16), s, 0, False, "e2m1", True)


def test_fragments_match_twins(interp):
    # K = 160 / 96 pad to 192 / 128 (zero codes); down's N = 160 leaves a half N tile of stored rows
    G, R = interp.gemm, interp.routing
    opts = [G.GemmOptions(64, 64, swap_ab=True), G.GemmOptions(64, 128, swap_ab=True, split_k=2, prefetch=1),
            G.GemmOptions(32, 64, swap_ab=True, prefetch=2)]
    check_fragments(G, R, torch.Generator().manual_seed(17), "cpu", 5, 16, opts)
    # scales past 128: 2^126 and the scale in two multiplies
    check_fragments(G, R, torch.Generator().manual_seed(18), "cpu", 5, 16, opts[:1], scale_shift=12)


def test_split_k_workspace(interp):
    # split-K gate_up: every tile's last split applies bias + SwiGLU, counted in the caller's zeroed
    # workspace, which it leaves zero (a second call on the same workspace gives the same rows); it
    # zeroes the fused combine's float32 output, which moe_down adds into and returns uncast
    G, R = interp.gemm, interp.routing
    g = torch.Generator().manual_seed(23)
    T, E, k, H, I = 5, 4, 2, 160, 96
    w = random_weights(MoESpec(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I), g)
    x = torch.randn(T, H, generator=g).bfloat16()
    r = R.moe_routing(distinct_logits(T, E, g), k, 0, E, R.RoutingOptions(block_m=16))
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, "bf16x2")
    w2 = G.prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, "bf16x2")
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    o = G.GemmOptions(block_n=64, block_k=64, split_k=3)  # K = 160: three 64-deep blocks, one split each
    need = G.gate_up_workspace_size(r, w1, o)
    n_tiles = -(-2 * I // 64)
    assert need == T * k * 2 * I + r.max_tiles * n_tiles
    assert G.gate_up_workspace_size(r, w1, G.GemmOptions(block_n=64, block_k=64)) == 0
    ws = torch.zeros(need + 7)
    out = torch.full((T, H), float("nan"))
    a, _ = G.moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o, workspace=ws, zero=out)
    a_t, _ = G.moe_gate_up_torch(x, r, w1, b1, "bf16", 1.702, 7.0, o)
    em, er = errors(a[:T * k], a_t[:T * k])
    assert em < 4e-3 and er < 5e-4, (em, er)
    assert not ws.any() and not out.any()  # sums and counters cleared by the last splits; out zeroed
    a2, _ = G.moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o, workspace=ws)
    assert torch.equal(a2[:T * k], a[:T * k]) and not ws.any()
    with pytest.raises(ValueError, match=f"needs {need} contiguous float32"):
        G.moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o, workspace=torch.zeros(need - 1))
    with pytest.raises(ValueError, match="zero must be a contiguous float32"):
        G.moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o, zero=out.bfloat16())
    y = G.moe_down(a, None, r, w2, b2, "bf16", o, 0, E, True, torch.float32, out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == torch.float32
    y_t = G.moe_down_torch(a, None, r, w2, b2, "bf16", o, 0, E, True, torch.bfloat16)
    em, er = errors(y, y_t)
    assert em < 4e-3 and er < 5e-4, (em, er)
    with pytest.raises(ValueError, match="contiguous float32"):
        G.moe_down(a, None, r, w2, b2, "bf16", o, 0, E, True, torch.float32, torch.zeros(T, H).bfloat16())


@pytest.mark.parametrize("start,n_local,E", [(0, 8, 8), (4, 4, 8), (0, 24, 24), (8, 16, 40)])
def test_inline_routing_matches_routed_gemms(interp, start, n_local, E):
    # one token, no routing kernel: gate_up finds the token's top-k itself (ties to the lower index,
    # as moe_routing), writes topk_ids / topk_weights, and row j of `a` is the token's j-th expert;
    # an expert-parallel rank skips the other rank's experts. The rows and the down output match the
    # GEMMs run on moe_routing's grouped rows. Up to 32 experts (padded) the kernel ranks the experts,
    # above it runs the routing kernel's top-k (40: 64 padded).
    G, R = interp.gemm, interp.routing
    g = torch.Generator().manual_seed(31 + start)
    k, H, I = 4, 64, 64
    w = slice_weights(random_weights(MoESpec(E, k, H, I), g), experts=slice(start, start + n_local))
    x = torch.randn(1, H, generator=g).bfloat16()
    lg = distinct_logits(1, E, g)
    lg[0, start + n_local - 1] = lg.max() + 0.5  # third: a local expert on every rank
    lg[0, 5] = lg[0, 2] = lg.max() + 1  # a tie for first place: expert 2 before 5
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, "bf16x2", True)
    w2 = G.prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, "bf16x2", True)
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    o = G.GemmOptions(64, 64, swap_ab=True, split_k=2)
    ref = R.moe_routing_torch(lg, k, start, n_local, R.RoutingOptions(block_m=16))
    r = R.inline_routing(lg, k, start, n_local, R.RoutingOptions(block_m=16))
    assert r.max_tiles == k and r.logits is lg
    out = torch.full((1, H), float("nan"))
    a, _ = G.moe_gate_up(x, r, w1, b1, "bf16", 1.702, 7.0, o, zero=out)
    assert torch.equal(r.topk_ids, ref.topk_ids) and r.topk_ids[0, 0] == 2 and r.topk_ids[0, 1] == 5
    assert r.topk_ids[0, 2] == start + n_local - 1
    torch.testing.assert_close(r.topk_weights, ref.topk_weights, atol=1e-6, rtol=1e-5)
    a_ref, _ = G.moe_gate_up_torch(x, ref, w1, b1, "bf16", 1.702, 7.0, o)
    local = [j for j in range(k) if ref.assign_pos[j] >= 0]
    assert 0 < len(local) < k or n_local == E
    em, er = errors(a[local], a_ref[ref.assign_pos[local].long()])
    assert em < 4e-3 and er < 5e-4, (em, er)
    y = G.moe_down(a, None, r, w2, b2, "bf16", o, start, n_local, True, torch.float32, out)
    y_ref = G.moe_down_torch(a_ref, None, ref, w2, b2, "bf16", o, start, n_local, True, torch.float32)
    em, er = errors(y, y_ref)
    assert em < 4e-3 and er < 5e-4, (em, er)
    with pytest.raises(ValueError, match="one token"):
        R.inline_routing(torch.cat([lg, lg]), k, start, n_local)
    with pytest.raises(ValueError, match="inline_routing"):
        G.moe_gate_up_torch(x, r, w1, b1, "bf16", 1.702, 7.0, o)


def check_token_kernels(G, R, T_, g, device, E, start, n_local, H, I, opts, tol):
    """moe_token's GEMMs at one token against the twins on moe_routing_torch's grouped rows: the
    top-k (a tie for first place: the lower index), a [k, I] by slot, out [1, H]; an EP rank skips
    the other rank's experts."""
    k = 4
    w = slice_weights(random_weights(MoESpec(E, k, H, I), g, device), experts=slice(start, start + n_local))
    x = torch.randn(1, H, generator=g, device=device).bfloat16()
    lg = distinct_logits(1, E, g, device)
    lg[0, start + n_local - 1] = lg.max() + 0.5  # third: a local expert on every rank
    lg[0, 5] = lg[0, 2] = lg.max() + 1  # a tie for first place: expert 2 before 5
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, "bf16x2", True)
    w2 = G.prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, "bf16x2", True)
    assert T_.supported(w1) and T_.supported(w2)
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    ref = R.moe_routing_torch(lg, k, start, n_local, R.RoutingOptions(block_m=16))
    a_ref, _ = G.moe_gate_up_torch(x, ref, w1, b1, "bf16", 1.702, 7.0, G.GemmOptions())
    y_ref = G.moe_down_torch(a_ref, None, ref, w2, b2, "bf16", G.GemmOptions(), start, n_local, True, torch.float32)
    local = [j for j in range(k) if ref.assign_pos[j] >= 0]
    assert torch.equal(T_.natural_order(T_.chunk_order(a_ref), I), a_ref)
    for up_opts, down_opts in opts:
        r = R.inline_routing(lg, k, start, n_local)
        out = torch.full((1, H), float("nan"), device=device)
        a = T_.token_gate_up(x, r, w1, b1, 1.702, 7.0, up_opts, zero=out)
        assert torch.equal(r.topk_ids, ref.topk_ids) and r.topk_ids[0, 0] == 2 and r.topk_ids[0, 1] == 5
        torch.testing.assert_close(r.topk_weights, ref.topk_weights, atol=1e-6, rtol=1e-5)
        em, er = errors(T_.natural_order(a, I)[local], a_ref[ref.assign_pos[local].long()])
        assert em < tol[0] and er < tol[1], (up_opts, em, er)
        # x in the chunk order (two 16-byte loads a chunk): the same words into the same sums
        a_c = T_.token_gate_up(T_.chunk_order(x), R.inline_routing(lg, k, start, n_local), w1, b1, 1.702, 7.0,
                               up_opts, x_chunk_order=True)
        assert torch.equal(T_.natural_order(a_c, I)[local], T_.natural_order(a, I)[local]), up_opts
        y = T_.token_down(a, r, w2, b2, out, down_opts)
        assert y is out
        em, er = errors(y, y_ref)
        assert em < tol[0] and er < tol[1], (down_opts, em, er)


@pytest.mark.parametrize("start,n_local,E,H,I", [(0, 8, 8, 64, 64), (4, 4, 8, 192, 96), (8, 16, 40, 128, 320)])
def test_token_kernels_match_twins(interp, start, n_local, E, H, I):
    # the interpreter runs moe_token's plain-Triton twin of its asm; the options cover warps sharing
    # a row group's chunks (an uneven share: TAIL), several row groups a warp, prefetch 0-4 (with one
    # chunk and with a last turn cut short), x loaded with the weights (x_ahead), the down GEMM split over
    # programs, row groups past N (the masked path) and K not a multiple of 64 (96, 320)
    from gptoss.kernels import moe_token as T_
    O = T_.TokenOptions
    opts = [(O(), O(split_k=2)), (O(4, 1, 1, 2, 2), O(4, 1, 3, 1, 4)), (O(2, 2, 1, 0, 1), O(8, 2, 2, 2, 2)),
            (O(8, 1, 1, 1, 8), O(1, 1, 5, 1, 1)), (O(2, 1, 1, 2, 1), O(2, 1, 1, 2, 1)),
            (O(4, 1, 1, 2, 2, True), O(4, 1, 3, 2, 4, True)), (O(2, 2, 1, 2, 1, True), O(8, 2, 2, 2, 2, True)),
            (O(4, 1, 1, 3, 2, True), O(4, 1, 2, 4, 4, True)), (O(2, 2, 1, 4, 1), O(4, 1, 3, 3, 2)),
            (T_.GATE_UP_OPTIONS, T_.DOWN_OPTIONS)]
    check_token_kernels(interp.gemm, interp.routing, T_, torch.Generator().manual_seed(41 + I), "cpu", E, start,
                        n_local, H, I, opts, (4e-3, 5e-4))
    w = slice_weights(random_weights(MoESpec(8, 4, 64, 64), torch.Generator().manual_seed(1)))
    big = interp.gemm.prepare_mxfp4_weight(w.down_blocks, w.down_scales * 0 + 200, 0, False, "bf16x2", True)
    assert not T_.supported(big)  # a scale past 128 needs two multiplies: moe_gemm's kernels take it
    r = interp.routing.inline_routing(torch.randn(1, 8).bfloat16(), 4, 0, 8)
    w1 = interp.gemm.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, "bf16x2", True)
    with pytest.raises(ValueError, match="x_ahead rides in the prefetch buffers: it needs prefetch 2 to 4"):
        T_.token_gate_up(torch.zeros(1, 64).bfloat16(), r, w1, w.gate_up_bias.float(), 1.702, 7.0,
                         O(4, 1, 1, 1, 2, True))
    with pytest.raises(ValueError, match="every block scale <= 128"):
        T_.token_down(torch.zeros(4, 64).bfloat16(), r, big, None, torch.zeros(1, 64))
    odd = torch.randn(65).bfloat16()[1:].view(1, 64)  # bf16 pairs read as words need 4-byte alignment
    with pytest.raises(ValueError, match="4-byte aligned"):
        T_.token_gate_up(odd, r, w1, w.gate_up_bias.float(), 1.702, 7.0)
    with pytest.raises(ValueError, match=r"16-byte aligned bfloat16 \[1, 64\] \(in the chunk order"):
        T_.token_gate_up(torch.zeros(1, 66).bfloat16()[:, 2:], r, w1, w.gate_up_bias.float(), 1.702, 7.0,
                         x_chunk_order=True)
    w2 = interp.gemm.prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, "bf16x2", True)
    with pytest.raises(ValueError, match=r"\[4, 64\] in the chunk order"):  # down takes gate_up's `a` only
        T_.token_down(torch.zeros(4, 32).bfloat16(), r, w2, None, torch.zeros(1, 64))
    # the "triton" backend takes them at one token unless given a config or switched off
    B = interp.backends
    spec = MoESpec(8, 4, 64, 64)
    assert B.TritonMoE(w, spec, torch.bfloat16)._token_kernels
    assert not B.TritonMoE(w, spec, torch.bfloat16, config=B.MoEKernelConfig())._token_kernels
    assert not B.TritonMoE(w, spec, torch.float32)._token_kernels
    # ... and then would take one token's x in the chunk order (the router kernel writes it so); given
    # it where it does not take it (more tokens), the backend puts x back in order
    m = B.TritonMoE(w, spec, torch.bfloat16)
    assert m.takes_chunk_order(1) and not m.takes_chunk_order(2)
    assert not B.TritonMoE(w, spec, torch.bfloat16, config=B.MoEKernelConfig()).takes_chunk_order(1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 64, generator=g).bfloat16()
    lg = torch.randn(1, 8, generator=g).bfloat16()
    want = m.forward_sum(x, lg)
    assert torch.equal(m.forward_sum(T_.chunk_order(x), lg, x_chunk_order=True), want)
    B.TOKEN_KERNELS = False  # moe_gemm's kernels read x in its natural order
    try:
        assert not m.takes_chunk_order(1)
        assert torch.equal(m.forward_sum(T_.chunk_order(x), lg, x_chunk_order=True), m.forward_sum(x, lg))
    finally:
        B.TOKEN_KERNELS = True
    with pytest.raises(ValueError, match="natural order"):
        get_moe_backend("torch", "cpu", None)(w, spec, torch.bfloat16).forward_sum(x, lg, x_chunk_order=True)


def test_split_k_workspace_grows_and_keeps_the_outgrown():
    """The backends' shared workspace grows when a step needs more (a short prompt's prefill after the
    decode graphs were captured) and keeps the outgrown one alive: graphs replay with its address."""
    from gptoss.moe.triton_backends import _TritonMoE
    dev = torch.device("cpu")
    saved = _TritonMoE._workspaces.pop(dev, None)
    try:
        small = _TritonMoE._workspace(100, dev)
        assert small.numel() >= 100 and not small.any() and _TritonMoE._workspace(50, dev) is small
        assert _TritonMoE._workspace(0, dev) is None
        big = _TritonMoE._workspace(small.numel() + 1, dev)
        assert big.numel() >= 2 * small.numel() and not big.any()
        assert any(t is small for t in _TritonMoE._outgrown)
    finally:
        _TritonMoE._workspaces.pop(dev, None)
        if saved is not None:
            _TritonMoE._workspaces[dev] = saved


def test_mma_needs_16_rows(interp):
    G, R = interp.gemm, interp.routing
    g = torch.Generator().manual_seed(12)
    w = random_weights(MoESpec(num_experts=4, top_k=2, hidden_size=64, intermediate_size=64), g)
    r = R.moe_routing(distinct_logits(3, 4, g), 2, 0, 4, R.RoutingOptions(block_m=8))
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, "bf16x2")
    with pytest.raises(ValueError, match="block_m=8; the MMA path needs >= 16"):
        G.moe_gate_up(torch.randn(3, 64).bfloat16(), r, w1, w.gate_up_bias.float(), "bf16", 1.702, 7.0,
                      G.GemmOptions(block_n=32, block_k=64))


def test_combine_matches_twin(interp):
    G, R = interp.gemm, interp.routing
    g = torch.Generator().manual_seed(3)
    T, E, k = 5, 8, 4
    r = R.moe_routing(distinct_logits(T, E, g), k, 2, 4, R.RoutingOptions())  # half the experts local
    y = torch.randn(T * k, 48, generator=g).bfloat16()
    torch.testing.assert_close(G.moe_combine(y, r, 2, 4, torch.bfloat16),
                               G.moe_combine_torch(y, r, 2, 4, torch.bfloat16))


# ----------------------------------------------------------------------------- backends vs "torch" (interpreter)


def _backend_case(cls, spec, T, seed, one_expert=False, **kw):
    g = torch.Generator().manual_seed(seed)
    w = random_weights(spec, g)
    x = torch.randn(T, spec.hidden_size, generator=g).bfloat16()
    lg = distinct_logits(T, spec.num_experts, g)
    if one_expert:
        lg[:, 1] = 10.0
    backend = cls(w, spec, torch.bfloat16, **kw)
    out = backend.forward(x, lg)
    ref = torch_backend(w, spec).forward(x, lg)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # the model takes forward_sum: float32 where the down GEMM's atomics combine, uncast
    s = backend.forward_sum(x, lg)
    assert s.dtype == (torch.float32 if backend.config_for(T).fused_combine else torch.bfloat16)
    assert torch.equal(s.to(torch.bfloat16), out)
    return out, ref


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("T,one_expert", [(1, False), (13, False), (20, True)])
def test_backend_matches_torch_interpreted(interp, name, T, one_expert):
    B, G = interp.backends, interp.gemm
    cls = {"triton": B.TritonMoE, "triton_fp8": B.TritonFp8MoE, "triton_mxfp8": B.TritonMxfp8MoE}[name]
    spec = MoESpec(num_experts=8, top_k=4, hidden_size=64, intermediate_size=64)
    kw = {}
    if one_expert:  # every token's first expert the same; prefill-style tiles, atomics combine
        swap = name == "triton"  # its default "fragments" weights take swap_ab tiles only
        kw["config"] = B.MoEKernelConfig(block_m=32, gate_up=G.GemmOptions(block_n=64, block_k=64, swap_ab=swap),
                                         down=G.GemmOptions(block_n=64, block_k=64, swap_ab=swap),
                                         fused_combine=True)
    out, ref = _backend_case(cls, spec, T, seed=T, one_expert=one_expert, **kw)
    assert_backend_close(out, ref, ACT[name], (name, T))


def test_expert_and_tensor_parallel_slices_interpreted(interp):
    """EP: two ranks with half the experts each; TP: two ranks with half the intermediate dimension,
    only the first adding the down bias. Each rank matches "torch" on the same spec, and the ranks
    sum to the unsliced layer."""
    cls = interp.backends.TritonMoE
    g = torch.Generator().manual_seed(11)
    full = MoESpec(num_experts=8, top_k=2, hidden_size=64, intermediate_size=64)
    w = random_weights(full, g)
    x = torch.randn(4, 64, generator=g).bfloat16()
    lg = distinct_logits(4, 8, g)
    ref = torch_backend(w, full).forward(x, lg).float()
    G_ = interp.gemm.GemmOptions
    cfgs = {"asm": interp.backends.MoEKernelConfig(gate_up=G_(block_n=64, block_k=32, prefetch=1),
                                                   down=G_(block_n=64, block_k=32, prefetch=1)),
            "fragments": interp.backends.MoEKernelConfig(gate_up=G_(block_n=64, block_k=64, swap_ab=True),
                                                         down=G_(block_n=64, block_k=64, swap_ab=True))}
    ranks = {  # EP: half the experts each; TP: half the intermediate dimension, one down bias
        "ep": [(MoESpec(8, 2, 64, 64, expert_start=4 * r, num_local_experts=4),
                slice_weights(w, experts=slice(4 * r, 4 * r + 4))) for r in range(2)],
        "tp": [(MoESpec(8, 2, 64, 32, add_down_bias=r == 0),
                slice_weights(w, inter=slice(32 * r, 32 * r + 32))) for r in range(2)],
    }
    for (mode, shards), (upcast, cfg) in itertools.product(ranks.items(), cfgs.items()):
        parts = []
        for spec, wr in shards:
            out = cls(wr, spec, torch.bfloat16, config=cfg, upcast=upcast).forward(x, lg)
            em, er = errors(out, torch_backend(wr, spec).forward(x, lg))
            assert em < 2e-2 and er < 4e-3, (mode, upcast)
            parts.append(out.float())
        em, er = errors(parts[0] + parts[1], ref)
        assert em < 2e-2 and er < 4e-3, (mode, upcast)


# ----------------------------------------------------------------------------- GPU: the gpt-oss shapes


@pytest.fixture(scope="module")
def cuda_weights():
    cache = {}

    def get(E, H, I):
        if (E, H, I) not in cache:
            cache.clear()  # one set at a time: 128 experts of 2880 are 1.7 GB
            g = torch.Generator(device="cuda").manual_seed(E + H)
            cache[(E, H, I)] = random_weights(MoESpec(E, 4, H, I), g, "cuda")
        return cache[(E, H, I)]
    return get


GPU_CASES = [(E, T) for E in (32,) for T in (1, 8, 64, 512, 4096)] + [(128, T) for T in (1, 64, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("E,T", GPU_CASES)
def test_backend_matches_torch_gpu(cuda_weights, name, E, T):
    H = I = 2880
    spec = MoESpec(E, 4, H, I)
    w = cuda_weights(E, H, I)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    lg = distinct_logits(T, E, g, "cuda")
    cls = get_moe_backend(name, "cuda", None)
    out = cls(w, spec, torch.bfloat16).forward(x, lg)
    ref = get_moe_backend("torch", "cuda", None)(w, spec, torch.bfloat16).forward(x, lg)
    assert_backend_close(out, ref, ACT[name], (name, E, T))


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", ["small", "one_expert", "ep_tp"])
def test_backend_edge_cases_gpu(name, case):
    cls = get_moe_backend(name, "cuda", None)
    g = torch.Generator(device="cuda").manual_seed(5)
    if case == "ep_tp":  # the 120b layer on rank 1 of 4 (EP) and TP=2 rank 1 (no down bias)
        specs = [MoESpec(128, 4, 2880, 2880, expert_start=32, num_local_experts=32),
                 MoESpec(32, 4, 2880, 1440, add_down_bias=False)]
    else:
        specs = [MoESpec(8, 4, 64, 64) if case == "small" else MoESpec(32, 4, 2880, 2880)]
    for spec in specs:
        w = random_weights(spec, g, "cuda")
        for T in (1, 3, 100, 700):
            x = torch.randn(T, spec.hidden_size, generator=g, device="cuda").bfloat16()
            lg = distinct_logits(T, spec.num_experts, g, "cuda")
            if case == "one_expert":
                lg[:, 7] = 10.0
            out = cls(w, spec, torch.bfloat16).forward(x, lg)
            ref = get_moe_backend("torch", "cuda", None)(w, spec, torch.bfloat16).forward(x, lg)
            assert_backend_close(out, ref, ACT[name], (name, case, spec, T))


@pytest.mark.gpu
@pytest.mark.parametrize("act,enc", [("bf16", "bf16x2"), ("bf16", "e2m1"), ("fp8", "e2m1"), ("mxfp8", "e2m1")])
def test_gemms_match_twins_gpu(act, enc):
    from gptoss.kernels import moe_gemm as G
    from gptoss.kernels import moe_routing as R
    g = torch.Generator(device="cuda").manual_seed(9)
    T, E, k, H, I = 700, 32, 4, 2880, 2880
    spec = MoESpec(E, k, H, I)
    w = random_weights(spec, g, "cuda")
    x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    lg = distinct_logits(T, E, g, "cuda")
    o = R.RoutingOptions(block_m=64)
    r = R.moe_routing(lg, k, 0, E, o)
    check_routing(r, R.moe_routing_torch(lg, k, 0, E, o))
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, act == "fp8", enc)
    w2 = G.prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, act == "fp8", enc)
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    for swap, prefetch, split in ((False, 0, 1), (True, 0, 1), (False, 2, 1), (False, 0, 4)):
        if swap and enc == "bf16x2":
            with pytest.raises(ValueError, match="swap_ab"):
                G.moe_gate_up(x, r, w1, b1, act, 1.702, 7.0, G.GemmOptions(swap_ab=True))
            continue
        opts = G.GemmOptions(block_n=64, block_k=128, swap_ab=swap, prefetch=prefetch, split_k=split)
        x_amax = G.row_absmax(x) if act == "fp8" else None
        a, a_amax = G.moe_gate_up(x, r, w1, b1, act, 1.702, 7.0, opts, x_amax)
        a_t, a_amax_t = G.moe_gate_up_torch(x, r, w1, b1, act, 1.702, 7.0, opts, x_amax)
        em, er = errors(a[: T * k], a_t[: T * k])
        # fp8: Hopper's fp8 MMA sums each K step's products at reduced precision (Triton promotes
        # to float32 once per 128-deep step), so outputs land a little off the float32 twin
        # (seen on H100: max 1.0e-2 of max|a|, RMS 5.7e-4)
        tm, tr = (2e-2, 2e-3) if act == "fp8" else (5e-3, 5e-4)
        assert em < tm and er < tr, (act, swap, prefetch, split, em, er)
        y = G.moe_down(a, a_amax, r, w2, b2, act, opts, 0, E, split > 1, torch.bfloat16)
        y_t = G.moe_down_torch(a, a_amax, r, w2, b2, act, opts, 0, E, split > 1, torch.bfloat16)
        em, er = errors(y, y_t)
        # y is rounded to bf16 once, after fp32 sums in another order (split-K atomics): a value may
        # round the other way, one bf16 ulp, up to 2^-7 of max|y| (seen on H100: 5.5e-3, RMS 7e-6)
        assert em < max(tm, 2 ** -7 + 1e-4) and er < tr, (act, swap, prefetch, split, em, er)


@pytest.mark.gpu
@pytest.mark.parametrize("T,block_m", [(1, 16), (40, 16), (300, 64), (2048, 128)])
def test_fragments_match_twins_gpu(T, block_m):
    from gptoss.kernels import moe_gemm as G
    from gptoss.kernels import moe_routing as R
    G_ = G.GemmOptions
    opts = [G_(64, 128, 4, 3, True), G_(128, 64, 4, 4, True), G_(128, 64, 8, 3, True), G_(64, 128, 4, 3, True, 4),
            G_(256, 64, 8, 3, True)]
    check_fragments(G, R, torch.Generator(device="cuda").manual_seed(T), "cuda", T, block_m, opts,
                    E=32, k=4, H=2880, I=2880, tol=(5e-3, 5e-4))
    # a TP rank's down GEMM: K = 1440 pads to 1472
    check_fragments(G, R, torch.Generator(device="cuda").manual_seed(T + 1), "cuda", T, block_m, opts[:2],
                    E=32, k=4, H=2880, I=1440, tol=(5e-3, 5e-4))
    # scales past 128: the upcast's two-multiply mode
    check_fragments(G, R, torch.Generator(device="cuda").manual_seed(T + 2), "cuda", T, block_m, opts[:1],
                    E=32, k=4, H=2880, I=2880, tol=(5e-3, 5e-4), scale_shift=12)


def exact_partials(E: int, H: int, local: int, g: torch.Generator, device):
    """Router partial sums whose finishing is exact (router_partials): (partials, u [1, H], x = u * rstd,
    logits [1, E]). The sums sit in one slot and the norm's eps is 0 with sum(h^2) = H * 4^3, so rstd
    = 2^-3 and u * rstd is exact in bf16; the logits are quarters (exact in bf16: the interpreter's
    cast truncates where the GPU's rounds), expert `local` first."""
    from gptoss.kernels import router_partials as RP
    sums = RP.new_sums(E, device)
    sums[0, :E] = 2.0 * (torch.randperm(E, generator=g, device=device) - E // 2)
    sums[0, local] = sums[0, :E].max() + 8
    sums[0, E] = H * 4.0 ** 3
    bias = 0.25 * torch.randint(-4, 5, (E,), generator=g, device=device)
    p = RP.RouterPartials(sums, bias.bfloat16(), 0.0, H, E)
    lg, rstd = RP.finish_logits_torch(p)
    assert rstd.item() == 2 ** -3
    u = torch.randn(1, H, generator=g, device=device).bfloat16()
    return p, u, (u.float() * rstd).bfloat16(), lg


def check_router_partials(G, R, T_, g, device, E, start, n_local, H, I, opts):
    """moe_token's GEMMs routed by the router's partial sums (router_partials) against the same
    GEMMs routed by the logits those sums finish into, on x = u * rstd (exact_partials: both ways take
    the same products, and the outputs must be equal)."""
    k = 4
    w = slice_weights(random_weights(MoESpec(E, k, H, I), g, device), experts=slice(start, start + n_local))
    w1 = G.prepare_mxfp4_weight(w.gate_up_blocks, w.gate_up_scales, 0, False, "bf16x2", True)
    w2 = G.prepare_mxfp4_weight(w.down_blocks, w.down_scales, 0, False, "bf16x2", True)
    b1, b2 = w.gate_up_bias.float(), w.down_bias.float()
    p, u, x, lg = exact_partials(E, H, start + n_local - 1, g, device)
    for up_opts, down_opts in opts:
        r = R.inline_routing(lg, k, start, n_local)
        out = torch.full((1, H), float("nan"), device=device)
        a = T_.token_gate_up(T_.chunk_order(x), r, w1, b1, 1.702, 7.0, up_opts, zero=out, x_chunk_order=True)
        y = T_.token_down(a, r, w2, b2, out, down_opts).clone()
        rp = R.partial_routing(p, k, start, n_local)
        out_p = torch.full((1, H), float("nan"), device=device)
        a_p = T_.token_gate_up(T_.chunk_order(u), rp, w1, b1, 1.702, 7.0, up_opts, zero=out_p, x_chunk_order=True)
        assert torch.equal(rp.topk_ids, r.topk_ids) and torch.equal(rp.topk_weights, r.topk_weights)
        local = [j for j in range(k) if start <= r.topk_ids[0, j] < start + n_local]
        assert local and torch.equal(T_.natural_order(a_p, I)[local], T_.natural_order(a, I)[local]), up_opts
        y_p = T_.token_down(a_p, rp, w2, b2, out_p, down_opts)
        torch.testing.assert_close(y_p, y, atol=1e-5, rtol=1e-5)  # down's atomics add in any order


def test_token_kernels_take_router_partials(interp):
    from gptoss.kernels import moe_token as T_
    O = T_.TokenOptions
    opts = [(T_.GATE_UP_OPTIONS, T_.DOWN_OPTIONS), (O(4, 1, 1, 2, 2), O(4, 1, 3, 1, 4))]
    for i, (E, start, n_local) in enumerate(((8, 0, 8), (8, 4, 4), (40, 8, 16))):
        check_router_partials(interp.gemm, interp.routing, T_, torch.Generator().manual_seed(60 + i), "cpu", E, start,
                              n_local, 64, 64, opts)


def test_triton_backend_takes_router_partials_interpreted(interp):
    """forward_sum with the router's partial sums (the model's batch-1 path) against the torch backend
    on the logits they finish into; only one token in the chunk order is taken."""
    from gptoss.kernels import moe_token as T_
    spec = MoESpec(num_experts=8, top_k=4, hidden_size=64, intermediate_size=64)
    g = torch.Generator().manual_seed(70)
    w = random_weights(spec, g)
    m = interp.backends.TritonMoE(w, spec, torch.bfloat16)
    assert m.takes_router_partials(1) and not m.takes_router_partials(2)
    big = MoESpec(num_experts=64, top_k=4, hidden_size=64, intermediate_size=64)  # past PARTIALS_MAX_EXPERTS
    big_w = random_weights(big, torch.Generator().manual_seed(71))
    assert not interp.backends.TritonMoE(big_w, big, torch.bfloat16).takes_router_partials(1)
    p, u, x, lg = exact_partials(8, 64, 3, g, "cpu")
    out = m.forward_sum(T_.chunk_order(u), None, x_chunk_order=True, router_partials=p)
    assert_backend_close(out, torch_backend(w, spec).forward(x, lg), "bf16")
    with pytest.raises(ValueError, match="one token in the chunk order"):
        m.forward_sum(u, None, router_partials=p)
    with pytest.raises(ValueError, match="one token in the chunk order"):
        m.forward_sum(T_.chunk_order(torch.cat([u, u])), None, x_chunk_order=True, router_partials=p)


def test_router_partials_only_where_a_backend_takes_them():
    from gptoss.kernels import router_partials as RP
    spec = MoESpec(8, 2, 64, 64)
    m = torch_backend(random_weights(spec, torch.Generator().manual_seed(0)), spec)
    assert not m.takes_router_partials(1)
    p = RP.RouterPartials(RP.new_sums(8, "cpu"), torch.zeros(8), 1e-5, 64, 8)
    with pytest.raises(ValueError, match="routes by logits"):
        m.forward_sum(torch.randn(1, 64), None, router_partials=p)


@pytest.mark.gpu
def test_token_kernels_match_twins_gpu():
    # the asm on sm_90: the 20b layer, the 120b's 128 experts on an EP rank, a TP rank's K = 1440
    from gptoss.kernels import moe_gemm as G
    from gptoss.kernels import moe_routing as R
    from gptoss.kernels import moe_token as T_
    O = T_.TokenOptions
    opts = [(None, None), (O(), O(split_k=2)), (O(4, 1, 1, 2, 2), O(4, 1, 3, 1, 4)),
            (O(8, 2, 1, 0, 4), O(2, 2, 2, 2, 2)), (O(16, 1, 1, 2, 2), O(16, 1, 1, 1, 8)),
            (O(4, 1, 1, 2, 1), O(4, 1, 1, 2, 2))]
    g = torch.Generator(device="cuda").manual_seed(3)
    for E, start, n_local, H, I in ((32, 0, 32, 2880, 2880), (128, 32, 32, 2880, 2880), (32, 0, 32, 2880, 1440)):
        check_token_kernels(G, R, T_, g, "cuda", E, start, n_local, H, I, opts, (5e-3, 5e-4))
        check_router_partials(G, R, T_, g, "cuda", E, start, n_local, H, I, opts[:2])


@pytest.mark.gpu
def test_routing_large_gpu():
    from gptoss.kernels import moe_routing as R
    g = torch.Generator(device="cuda").manual_seed(2)
    for T, E, start, n_local in ((4096, 128, 0, 128), (3000, 128, 64, 32), (8192, 32, 0, 32)):
        lg = distinct_logits(T, E, g, "cuda")
        o = R.RoutingOptions(block_m=128)
        check_routing(R.moe_routing(lg, 4, start, n_local, o), R.moe_routing_torch(lg, 4, start, n_local, o))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_graph_capture_gpu(cuda_weights, T):
    """No host sync in forward: it captures into a CUDA graph and replays with new inputs. At one
    token gate_up splits K: its workspace, kept zero by the kernel between calls, serves every replay."""
    spec = MoESpec(32, 4, 2880, 2880)
    w = cuda_weights(32, 2880, 2880)
    m = get_moe_backend("triton", "cuda", None)(w, spec, torch.bfloat16)
    assert (m.config_for(T).gate_up.split_k > 1) == (T == 1)
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(T, 2880, generator=g, device="cuda").bfloat16()
    lg = distinct_logits(T, 32, g, "cuda")
    m.forward(x, lg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m.forward(x, lg)
    ref_backend = get_moe_backend("torch", "cuda", None)(w, spec, torch.bfloat16)
    for _ in range(3):
        x.copy_(torch.randn(T, 2880, generator=g, device="cuda").bfloat16())
        lg.copy_(distinct_logits(T, 32, g, "cuda"))
        graph.replay()
        em, er = errors(out, ref_backend.forward(x, lg))
        assert em < 2e-2 and er < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("ep", [False, True])
def test_token_kernels_in_pdl_graph_gpu(cuda_weights, ep):
    """Batch-1 MoE in a PDL graph after a router GEMV, as in decode: down finds its expert from the
    logits and loads its first weights before its PDL wait (moe_token.DOWN_EARLY). Every replay, with
    fresh inputs, matches the torch backend; on an EP rank the programs of other ranks' experts
    return, having waited."""
    from gptoss.kernels import moe_token, pdl
    from gptoss.kernels.gemv import linear_rows
    assert moe_token.DOWN_EARLY
    spec = MoESpec(128, 4, 2880, 2880, expert_start=32, num_local_experts=32) if ep else MoESpec(32, 4, 2880, 2880)
    w = cuda_weights(32, 2880, 2880)
    m = get_moe_backend("triton", "cuda", None)(w, spec, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(5 + ep)
    x = torch.randn(1, 2880, generator=g, device="cuda").bfloat16()
    z = torch.randn(1, 2880, generator=g, device="cuda").bfloat16()
    w_router = torch.randn(spec.num_experts, 2880, generator=g, device="cuda").bfloat16()
    with pdl.enabled(True):
        m.forward(x, linear_rows(z, w_router))  # compile the PDL variants outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lg = linear_rows(z, w_router)
            out = m.forward(x, lg)
    ref_backend = get_moe_backend("torch", "cuda", None)(w, spec, torch.bfloat16)
    for _ in range(3):
        x.copy_(torch.randn(1, 2880, generator=g, device="cuda").bfloat16())
        z.copy_(torch.randn(1, 2880, generator=g, device="cuda").bfloat16())
        graph.replay()
        em, er = errors(out, ref_backend.forward(x, lg))
        assert em < 2e-2 and er < 4e-3, (ep, em, er)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 700])
def test_triton_dot_scaled_upcast_gpu(cuda_weights, T):
    """"triton" with upcast="dot_scaled" (checkpoint codes through tl.dot_scaled), the other path."""
    spec = MoESpec(32, 4, 2880, 2880)
    w = cuda_weights(32, 2880, 2880)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 2880, generator=g, device="cuda").bfloat16()
    lg = distinct_logits(T, 32, g, "cuda")
    out = get_moe_backend("triton", "cuda", None)(w, spec, torch.bfloat16, upcast="dot_scaled").forward(x, lg)
    ref = get_moe_backend("torch", "cuda", None)(w, spec, torch.bfloat16).forward(x, lg)
    assert_backend_close(out, ref, "bf16", ("dot_scaled", T))


def test_llm_with_triton_backend_gives_torch_tokens_interpreted(interp, tmp_path):
    """The whole engine with moe_backend="triton" (interpreted kernels, fp32 on CPU) gives the
    greedy tokens of the "torch" backend."""
    from gptoss import LLM, SamplingParams
    from gptoss.testing import make_checkpoint
    ckpt = str(make_checkpoint(tmp_path / "tiny", preset="tiny", seed=5, device="cpu"))
    prompts = [{"prompt_token_ids": [5, 17, 300, 4000, 12]}, {"prompt_token_ids": list(range(900, 930))}]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = {}
    for name in ("torch", "triton"):
        llm = LLM(ckpt, moe_backend=name, dtype="float32", device="cpu", max_model_len=128, progress=False)
        assert llm.engine.moe_backend == name
        got[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        # "triton" re-lays the MXFP4 tensors: the checkpoint's copy is freed; "torch" computes from it
        mlp = llm.engine.worker.model.layers[0].mlp
        assert (mlp.gate_up_blocks.numel() == 0 and mlp.down_scales.numel() == 0) == (name == "triton")
    assert got["triton"] == got["torch"]
