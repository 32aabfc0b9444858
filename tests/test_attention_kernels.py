"""Paged-attention kernels vs their torch twins on fresh random inputs.

CPU: the twins' own properties run in-process; the Triton kernels run in Triton's interpreter in a
subprocess (TRITON_INTERPRET=1 must be set before triton decorates the kernels, and setting it here
would leak into other test modules). GPU (@pytest.mark.gpu): the real shapes, contexts up to 32k.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptoss.kernels import attention as attn
from gptoss.kernels import pdl
from gptoss.kernels.attention import AttentionOptions, paged_attention, rope_kv_attention, rope_write_kv, write_kv
from gptoss.kernels.attention_torch import (fp8_scale_torch, paged_attention_torch, quantize_fp8_torch,
                                            rope_write_kv_torch, write_kv_torch)

FP8 = torch.float8_e4m3fn
CUDA = torch.cuda.is_available()
# fp8 KV (per token-and-head scales amax / 448) vs the same K/V unquantized, normalized by max|ref|:
# e4m3 keeps 3 mantissa bits, so this is a property of the format, not of the kernels; measured worst
# 0.14 / 0.015 on random inputs with peaked attention (docs/kv_cache.md). Kernels vs their twins on the
# same fp8 cache meet the bf16 tolerances.
FP8_MAX_TOL, FP8_RMS_TOL = 0.2, 0.025

interp_only = pytest.mark.skipif(not attn.INTERPRETED, reason="runs in the interpreter subprocess "
                                 "(test_kernels_in_interpreter)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def normalized_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().clamp_min(1e-30)
    diff = out - ref
    return (diff.abs().max() / scale).item(), (diff.pow(2).mean().sqrt() / scale).item()


def assert_close(out, ref, max_tol=2e-2, rms_tol=4e-3, what=""):
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite output"
    mx, rms = normalized_err(out, ref)
    assert mx <= max_tol and rms <= rms_tol, f"{what}: max {mx:.3g} (tol {max_tol}), rms {rms:.3g} (tol {rms_tol})"


class Case:
    """B sequences with cached prefixes (ctx_lens) and new tokens (query_lens) in a paged cache.

    Blocks are handed out shuffled; block 0 is the null block that unused table entries point at.
    Everything not written (null block, tails of last blocks, free blocks) holds NaN, so a kernel
    that reads past seq_len fails loudly.
    """

    def __init__(self, query_lens, ctx_lens, *, block_size=4, hq=4, hkv=2, d=32, fp8=False,
                 dtype=torch.bfloat16, device="cpu", window=None, q_scale=1.0, seed=0, spare_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.query_lens, self.seq_lens = list(query_lens), [q + c for q, c in zip(query_lens, ctx_lens)]
        self.window, self.fp8, self.block_size = window, fp8, block_size
        nblk = [-(-s // block_size) for s in self.seq_lens]
        num_blocks = sum(nblk) + 1 + spare_blocks
        ids = (torch.randperm(num_blocks - 1, generator=g) + 1)[:sum(nblk)]
        self.block_tables = torch.zeros(len(nblk), max(max(nblk), 1) + 1, dtype=torch.int32)
        i = 0
        for b, n in enumerate(nblk):
            self.block_tables[b, :n] = ids[i:i + n]
            i += n
        shape = (num_blocks, block_size, hkv, d)
        cdt = FP8 if fp8 else dtype
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype).to(cdt)
        self.v_cache = self.k_cache.clone()
        self.k_scale = torch.full(shape[:3], float("nan")) if fp8 else None
        self.v_scale = self.k_scale.clone() if fp8 else None
        total = sum(self.seq_lens)
        self.k = torch.randn(total, hkv, d, generator=g).to(dtype)
        self.v = torch.randn(total, hkv, d, generator=g).to(dtype)
        self.slots = torch.cat([self.block_tables[b, torch.arange(s) // block_size].long() * block_size
                                + torch.arange(s) % block_size for b, s in enumerate(self.seq_lens)])
        write_kv_torch(self.k, self.v, self.k_cache, self.v_cache, self.slots, self.k_scale, self.v_scale)
        self.q = (torch.randn(sum(query_lens), hq, d, generator=g) * q_scale).to(dtype)
        self.sinks = torch.randn(hq, generator=g).to(dtype)
        self.query_start_loc = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
        self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32)
        self.sm_scale = 1.0 / math.sqrt(d)
        self.to(device)

    def to(self, device):
        for name in ("block_tables", "k_cache", "v_cache", "k_scale", "v_scale", "k", "v", "slots", "q",
                     "sinks", "query_start_loc", "seq_lens_t"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def scales(self):
        return (self.k_scale, self.v_scale) if self.fp8 else (None, None)

    def reference(self):
        return paged_attention_torch(self.q, self.k_cache, self.v_cache, self.block_tables, self.query_lens,
                                     self.seq_lens, self.sinks, self.sm_scale, self.window, *self.scales())

    def run(self, options=None):
        return paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
                               self.seq_lens_t, max(self.query_lens), max(self.seq_lens), self.sinks,
                               self.sm_scale, self.window, *self.scales(), options=options)


# ---------------------------------------------------------------------------------------------------
# the twins (CPU, in-process)

def test_sink_semantics_by_hand():
    # one key: out = v * e^s / (e^s + e^sink)
    c = Case([1], [0], hq=2, hkv=1, d=16, dtype=torch.float32)
    s = (c.q[0] @ c.k[0, 0]) * c.sm_scale  # [Hq]
    w = torch.exp(s) / (torch.exp(s) + torch.exp(c.sinks))
    torch.testing.assert_close(c.reference()[0], w[:, None] * c.v[0, 0][None], rtol=1e-5, atol=1e-6)


def test_twin_chunked_prefill_equals_full_prefill():
    full = Case([37], [0], window=None, dtype=torch.float32, seed=3)
    ref = full.reference()
    for window in (None, 8):
        full.window = window
        ref = full.reference()
        start = 0
        for chunk in (10, 1, 26):  # each chunk attends over the cached prefix plus itself
            end = start + chunk
            out = paged_attention_torch(full.q[start:end], full.k_cache, full.v_cache, full.block_tables,
                                        [chunk], [end], full.sinks, full.sm_scale, window)
            torch.testing.assert_close(out, ref[start:end], rtol=1e-5, atol=1e-6)
            start = end


def test_fp8_scale_and_rounding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g) * torch.logspace(-6, 3, 512)[:, None]
    x[0] = 0.0
    codes, s = quantize_fp8_torch(x)
    assert torch.equal(s, fp8_scale_torch(x))
    amax = x.abs().amax(-1)
    assert torch.equal(s[1:], amax[1:] / 448) and s[0] > 0
    # each row's largest element lands on +-448 exactly
    top = codes.float().abs().gather(1, x.abs().argmax(-1, keepdim=True))[1:]
    assert (top == 448).all()
    deq = codes.float() * s[:, None]
    # e4m3: half an ulp is 2^-4 relative; below 2^-6 (subnormal) the step is 2^-9
    bound = (x.abs() * 2.0 ** -4 + s[:, None] * 2.0 ** -10) * (1 + 2.0 ** -20)
    assert ((deq - x).abs() <= bound).all()
    assert torch.equal(codes[0].float(), torch.zeros(64))


def test_twin_write_kv_skips_negative_slots_and_keeps_bf16_exact():
    kc = torch.zeros(3, 4, 2, 16, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    k = torch.randn(5, 2, 16).bfloat16()
    v = torch.randn(5, 2, 16).bfloat16()
    slots = torch.tensor([4, -1, 9, 0, -1])
    write_kv_torch(k, v, kc, vc, slots)
    flat = kc.view(-1, 2, 16)
    assert torch.equal(flat[4], k[0]) and torch.equal(flat[9], k[2]) and torch.equal(flat[0], k[3])
    assert flat[[1, 2, 3, 5, 6, 7, 8, 10, 11]].abs().sum() == 0


def test_wrappers_on_cpu_are_the_twins():
    if attn.INTERPRETED:
        pytest.skip("the interpreter runs the kernels instead")
    for fp8 in (False, True):
        c = Case([3, 1, 6], [5, 9, 0], fp8=fp8, window=4)
        kc, vc = c.k_cache.clone(), c.v_cache.clone()
        ks, vs = (c.k_scale.clone(), c.v_scale.clone()) if fp8 else (None, None)
        write_kv(c.k, c.v, kc, vc, c.slots, ks, vs)
        assert torch.equal(kc.view(torch.uint8), c.k_cache.view(torch.uint8))
        assert torch.equal(c.run(), c.reference())


def test_decode_warps_grow_only_for_grids_that_leave_sms_idle():
    cpu = torch.device("cpu")  # sm_count: 4 there
    o = AttentionOptions()
    assert attn._decode_warps(4, cpu, o) == o.decode_small_grid_num_warps == 8
    assert attn._decode_warps(5, cpu, o) == o.decode_num_warps == 4
    assert attn._decode_warps(1, cpu, AttentionOptions(decode_small_grid_num_warps=0)) == 4
    assert attn._decode_warps(1, cpu, attn.DEFAULT_FP8_OPTIONS) == 1  # fp8 keeps its tuned one warp


def test_wrapper_rejects_fp8_cache_without_scales():
    c = Case([2], [3], fp8=True)
    with pytest.raises(ValueError, match="fp8"):
        paged_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.query_start_loc, c.seq_lens_t, 2, 5,
                        c.sinks, c.sm_scale, None)


@pytest.mark.parametrize("q_scale", [1.0, 4.0])
def test_fp8_cache_accuracy_bound(q_scale):
    """fp8 KV vs the same K/V in a bf16 cache: the stated bound (q_scale 4: peaked attention)."""
    for window, qlens, ctxs in ((None, [1, 1, 40], [300, 5, 0]), (16, [1, 30], [200, 0])):
        kw = dict(hq=8, hkv=2, d=64, block_size=16, window=window, q_scale=q_scale, seed=7)
        ref = Case(qlens, ctxs, **kw).reference()
        out = Case(qlens, ctxs, fp8=True, **kw).reference()
        assert_close(out, ref, FP8_MAX_TOL, FP8_RMS_TOL, f"fp8 window={window} q_scale={q_scale}")


# ---------------------------------------------------------------------------------------------------
# the Triton kernels vs the twins: in the interpreter on CPU, on the GPU with @gpu

def test_kernels_in_interpreter():
    if attn.INTERPRETED:
        pytest.skip("already interpreting: the interp_* tests run in this process")
    from interpreted import run_interpreted
    r = run_interpreted(["-m", "pytest", __file__, "-q", "-x", "-k", "interp_", "-p", "no:cacheprovider"])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]


TINY = AttentionOptions(prefill_block_m=16, prefill_block_n=16, decode_block_n=16)


def _write_kv_matches_twin(device, fp8, dtype=torch.bfloat16, T=9, hkv=2, d=32, block_size=4):
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(T, hkv * 3 + 1, d, generator=g).to(dtype) * 3
    k, v = qkv[:, :hkv], qkv[:, hkv:2 * hkv]  # non-contiguous views, as from a fused projection
    k[0, 0] = 0.0                             # a zero row: scale 2^-126, codes 0
    nb = T // block_size + 2
    slots = torch.randperm(nb * block_size, generator=g)[:T]
    slots[3] = -1
    cdt = FP8 if fp8 else dtype
    caches = [torch.zeros(nb, block_size, hkv, d, dtype=dtype).to(cdt) for _ in range(4)]
    scales = [torch.zeros(nb, block_size, hkv) if fp8 else None for _ in range(4)]
    k, v, slots = k.to(device), v.to(device), slots.to(device)
    caches = [c.to(device) for c in caches]
    scales = [s.to(device) if s is not None else None for s in scales]
    write_kv(k, v, caches[0], caches[1], slots, scales[0], scales[1])
    write_kv_torch(k, v, caches[2], caches[3], slots, scales[2], scales[3])
    for a, b in ((0, 2), (1, 3)):
        assert torch.equal(caches[a].view(torch.uint8), caches[b].view(torch.uint8))
        if fp8:
            assert torch.equal(scales[a], scales[b])


def _rope_write_kv_matches_twin(device, fp8, dtype, T=11, hq=4, hkv=2, d=32, block_size=4, max_pos=64):
    """The fused rotary embedding + KV write vs apply_rope_torch + write_kv_torch: q and the cache
    contents agree (fp8 codes may differ by one step where fp32 rounding orders differ)."""
    g = torch.Generator().manual_seed(int(fp8) * 7 + T)
    qkv = torch.randn(T, hq + 2 * hkv, d, generator=g).to(dtype) * 2
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]  # strided views, as from the projection
    ang = torch.rand(max_pos, d // 2, generator=g) * 6.3
    cos, sin = ang.cos() * 1.3, ang.sin() * 1.3  # YaRN scales both by its attention factor
    pos = torch.randint(0, max_pos, (T,), generator=g)
    nb = T // block_size + 2
    slots = torch.randperm(nb * block_size, generator=g)[:T]
    slots[2] = -1  # a padding row: q is still rotated, nothing is written
    cdt = FP8 if fp8 else dtype
    caches = [torch.full((nb, block_size, hkv, d), 5.0, dtype=dtype).to(cdt).to(device) for _ in range(4)]
    scales = [torch.zeros(nb, block_size, hkv, device=device) if fp8 else None for _ in range(4)]
    args = [x.to(device) for x in (q, k, v, pos, cos, sin)]
    q_out = rope_write_kv(*args, caches[0], caches[1], slots.to(device), scales[0], scales[1])
    q_ref = rope_write_kv_torch(*args, caches[2], caches[3], slots.to(device), scales[2], scales[3])
    assert q_out.shape == q.shape and q_out.dtype == dtype
    tol = dict(max_tol=1e-5, rms_tol=1e-6) if dtype == torch.float32 else {}
    assert_close(q_out, q_ref, what="rotated q", **tol)
    assert not torch.allclose(q_out.float().cpu(), q.float(), atol=1e-2), "q was not rotated"
    for a, b in ((0, 2), (1, 3)):
        if fp8:
            assert_close(scales[a], scales[b], what="fp8 scales", **tol)
            deq = [caches[i].float() * scales[i][..., None] for i in (a, b)]
            assert_close(deq[0], deq[1], max_tol=0.07, rms_tol=4e-3, what="fp8 cache")
        else:
            assert_close(caches[a], caches[b], what="cache", **tol)
    untouched = torch.ones(nb * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (caches[0].float().view(-1, hkv, d)[untouched.to(device)] == 5.0).all(), "wrote outside its slots"


def _fused_decode_matches_unfused(device, ctxs, block_size, window, splits, fp8, dtype=torch.bfloat16,
                                  hq=8, hkv=2, d=32, seed=0, pdl_on=False):
    """rope_kv_attention at decode (the decode kernel rotates q and writes each new token's K/V) vs
    rope_write_kv + paged_attention: the same output and the same cache. The new tokens' slots start
    NaN, so a write the fused kernel skips, or a read before its write, shows in the output (pdl_on:
    launched with PDL, where a bf16 cache's keys are read before the kernel's wait and the token's own
    key and value patched in from registers)."""
    c = Case([1] * len(ctxs), ctxs, block_size=block_size, window=window, fp8=fp8, hq=hq, hkv=hkv, d=d,
             dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    B = len(ctxs)
    ends = torch.tensor(c.seq_lens).cumsum(0) - 1
    slots = c.slots[ends.to(c.slots.device)]
    qkv = (torch.randn(B, hq + 2 * hkv, d, generator=g) * 2).to(dtype).to(device)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]  # strided views, as from the projection
    pos = (c.seq_lens_t - 1).long()
    ang = torch.rand(max(c.seq_lens) + 1, d // 2, generator=g) * 6.3
    cos, sin = (ang.cos() * 1.3).to(device), (ang.sin() * 1.3).to(device)
    caches = []
    for _ in range(2):
        kc, vc = c.k_cache.clone(), c.v_cache.clone()
        ks, vs = (c.k_scale.clone(), c.v_scale.clone()) if fp8 else (None, None)
        for cache in (kc, vc):
            cache.view(-1, hkv, d)[slots] = float("nan")
        caches.append((kc, vc, ks, vs))
    args = (c.block_tables, c.query_start_loc, c.seq_lens_t, 1, max(c.seq_lens), c.sinks, c.sm_scale, window)
    opts = AttentionOptions(decode_block_n=16 if device == "cpu" else 128, decode_num_splits=splits)
    kc, vc, ks, vs = caches[0]
    q_rot = rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, ks, vs)
    ref = paged_attention(q_rot, kc, vc, *args, ks, vs, options=opts)
    kc, vc, ks, vs = caches[1]
    with pdl.enabled(pdl_on):
        out = rope_kv_attention(q, k, v, pos, cos, sin, kc, vc, slots, *args, ks, vs, options=opts)
    what = f"fused decode {ctxs} bs={block_size} w={window} splits={splits} fp8={fp8} pdl={pdl_on}"
    assert torch.isfinite(out.float()).all(), what
    assert_close(out, ref, max_tol=1e-3, rms_tol=1e-4, what=what)
    for a, b in zip(caches[0], caches[1]):
        if a is not None:
            assert torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0)), what + ": caches differ"


# (query_lens, ctx_lens, block_size, window): prefill, chunked prefill after a prefix, mixed batches
PREFILL_CASES = [
    ([7, 20, 3], [0, 0, 0], 4, None),
    ([7, 20, 3], [0, 0, 0], 4, 6),
    ([9, 1, 18], [13, 30, 5], 16, None),      # prefix hits; one decode row in the batch
    ([9, 1, 18], [13, 30, 5], 1, 5),
    ([33], [40], 8, 16),
]
DECODE_CASES = [
    ([0, 1, 5, 40, 70], 4, None, None),
    ([0, 1, 5, 40, 70], 4, 8, None),
    ([3, 33, 100], 16, None, 3),               # forced splits, some empty
    ([3, 33, 100], 8, 20, 4),
    ([100], 32, None, 1),
]


@interp_only
@pytest.mark.parametrize("fp8", [False, True])
def test_interp_write_kv(fp8):
    _write_kv_matches_twin("cpu", fp8)


@interp_only
@pytest.mark.parametrize("fp8", [False, True])
def test_interp_rope_write_kv(fp8):
    # float32: the interpreter's fp32 -> bf16 cast truncates; the GPU test covers bf16
    _rope_write_kv_matches_twin("cpu", fp8, torch.float32)


@interp_only
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_interp_prefill(case, fp8):
    qlens, ctxs, bs, window = PREFILL_CASES[case]
    c = Case(qlens, ctxs, block_size=bs, window=window, fp8=fp8, seed=case)
    # keep q a strided view, as it comes from the fused qkv projection
    c.q = torch.cat([c.q, torch.zeros_like(c.q[:, :1])], dim=1)[:, :-1]
    assert_close(c.run(TINY), c.reference(), what=f"prefill {qlens} {ctxs} bs={bs} w={window} fp8={fp8}")


@interp_only
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_interp_decode(case, fp8):
    ctxs, bs, window, splits = DECODE_CASES[case]
    hq, hkv = (8, 1) if case % 2 else (4, 2)  # group 8 and group 2 (padded to 16 rows)
    c = Case([1] * len(ctxs), ctxs, block_size=bs, window=window, fp8=fp8, hq=hq, hkv=hkv, seed=case)
    opts = AttentionOptions(decode_block_n=16, decode_num_splits=splits)
    assert_close(c.run(opts), c.reference(), what=f"decode {ctxs} bs={bs} w={window} splits={splits}")


@interp_only
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_interp_fused_decode_rope_kv(case, fp8):
    ctxs, bs, window, splits = DECODE_CASES[case]
    hq, hkv = (8, 1) if case % 2 else (4, 2)
    _fused_decode_matches_unfused("cpu", ctxs, bs, window, splits, fp8, torch.float32, hq=hq, hkv=hkv, seed=case)


@interp_only
def test_interp_fused_decode_skips_padding():
    # a sequence without a token and a graph padding row (slot -1, seq_len 1, the null block): the
    # fused kernel writes nowhere for either and leaves the real rows as the unfused pair computes them
    c = Case([1, 1], [6, 9], block_size=4, dtype=torch.float32)
    k = torch.randn(3, 2, 32)
    v = torch.randn(3, 2, 32)
    q = torch.randn(3, 4, 32)
    qsl = torch.tensor([0, 1, 1, 2, 3], dtype=torch.int32)  # sequence 1 brings no token; 3 is padding
    seq_lens = torch.tensor([7, 0, 10, 1], dtype=torch.int32)
    tables = torch.cat([c.block_tables[:1], torch.zeros_like(c.block_tables[:1]), c.block_tables[1:],
                        torch.zeros_like(c.block_tables[:1])])
    slots = torch.tensor([c.slots[6].item(), c.slots[7 + 9].item(), -1])  # the last positions: 6 and 9
    pos = torch.tensor([6, 9, 0])
    ang = torch.rand(16, 16) * 6.3
    outs, caches = [], []
    for fused in (False, True):
        kc, vc = c.k_cache.clone(), c.v_cache.clone()
        kc[0] = vc[0] = 0.5  # the null block: finite, so that the padding row's output is too
        args = (q, k, v, pos, ang.cos(), ang.sin(), kc, vc, slots, tables, qsl, seq_lens, 1, 10, c.sinks,
                c.sm_scale, None)
        attn.FUSED_DECODE_KV = fused
        try:
            outs.append(rope_kv_attention(*args, options=AttentionOptions(decode_block_n=16, decode_num_splits=3)))
        finally:
            attn.FUSED_DECODE_KV = True
        caches.append((kc, vc))
    assert_close(outs[1], outs[0], max_tol=1e-5, rms_tol=1e-6, what="padding")
    for a, b in zip(*caches):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert (caches[1][0][0] == 0.5).all() and (caches[1][1][0] == 0.5).all(), "wrote into the null block"


@interp_only
def test_interp_fp8_with_bf16_dots():
    # the GPU default for fp8 converts codes to fp16; the bf16 variant shares the rest of the path
    for qlens, ctxs, splits in (([1, 1], [20, 3], 2), ([6, 9], [0, 11], None)):
        c = Case(qlens, ctxs, block_size=4, fp8=True, window=7, seed=9)
        opts = AttentionOptions(prefill_block_m=16, prefill_block_n=16, decode_block_n=16,
                                decode_num_splits=splits, fp8_dot="bf16")
        assert_close(c.run(opts), c.reference(), what=f"fp8 bf16-dot {qlens} {ctxs}")


@interp_only
def test_interp_decode_skips_padding_sequences():
    c = Case([1, 1], [6, 9], block_size=4)
    ref = c.reference()
    c.query_start_loc = torch.tensor([0, 1, 1, 2], dtype=torch.int32)  # sequence 1 brings no token
    c.seq_lens_t = torch.tensor([7, 0, 10], dtype=torch.int32)
    c.block_tables = torch.cat([c.block_tables[:1], torch.zeros_like(c.block_tables[:1]), c.block_tables[1:]])
    for splits in (1, 3):
        out = paged_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.query_start_loc, c.seq_lens_t,
                              1, 10, c.sinks, c.sm_scale, None,
                              options=AttentionOptions(decode_block_n=16, decode_num_splits=splits))
        assert_close(out, ref, what=f"padding splits={splits}")


# ---------------------------------------------------------------------------------------------------
# GPU: the model's shapes (64 q heads, 8 KV heads, head_dim 64), contexts up to 32k

@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_write_kv_bit_exact(fp8):
    _write_kv_matches_twin("cuda", fp8, T=300, hkv=8, d=64, block_size=16)


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_rope_write_kv(fp8):
    _rope_write_kv_matches_twin("cuda", fp8, torch.bfloat16, T=300, hq=64, hkv=8, d=64, block_size=16,
                                max_pos=4096)


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("pdl_on", [False, True])
def test_gpu_fused_decode_rope_kv(fp8, window, pdl_on):
    for splits in (None, 1, 7):
        _fused_decode_matches_unfused("cuda", [0, 1, 127, 128, 1000, 4095], 16, window, splits, fp8,
                                      hq=64, hkv=8, d=64, seed=3, pdl_on=pdl_on)
    if pdl_on:  # one sequence, as batch-1 decode: the token's key first, last or inside its tile
        for ctx in (0, 127, 128, 200, 255, 1000):
            _fused_decode_matches_unfused("cuda", [ctx], 16, window, None, fp8, hq=64, hkv=8, d=64, seed=ctx,
                                          pdl_on=True)


# (block_size, window, fp8): every kernel variant at block 16, other block sizes on a few
GPU_CASES = [(16, None, False), (16, None, True), (16, 128, False), (16, 128, True), (64, None, True),
             (32, 128, False)]


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size,window,fp8", GPU_CASES)
def test_gpu_decode(block_size, window, fp8):
    ctxs = [0, 1, 127, 128, 1000, 4095, 8191, 32767]
    c = Case([1] * len(ctxs), ctxs, block_size=block_size, window=window, fp8=fp8, hq=64, hkv=8, d=64,
             device="cuda", seed=block_size)
    ref = c.reference()
    for splits in (None, 1, 7):  # auto, none, odd
        out = c.run(AttentionOptions(decode_num_splits=splits))
        assert_close(out, ref, what=f"decode bs={block_size} w={window} fp8={fp8} splits={splits}")


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size,window,fp8", GPU_CASES)
def test_gpu_prefill(block_size, window, fp8):
    # a 2k prompt, a chunk after a 30k prefix (prefix hit / chunked prefill), short ones, a decode row
    qlens, ctxs = [2048, 256, 1, 77, 300], [0, 30000, 5000, 0, 129]
    c = Case(qlens, ctxs, block_size=block_size, window=window, fp8=fp8, hq=64, hkv=8, d=64,
             device="cuda", seed=block_size + 1)
    assert_close(c.run(), c.reference(), what=f"prefill bs={block_size} w={window} fp8={fp8}")


@gpu
@needs_cuda
@pytest.mark.parametrize("q_scale", [1.0, 4.0])
def test_gpu_fp8_accuracy_bound(q_scale):
    qlens, ctxs = [1, 1, 1, 512], [100, 8000, 32000, 4000]
    kw = dict(hq=64, hkv=8, d=64, block_size=16, q_scale=q_scale, device="cuda", seed=5)
    for window in (None, 128):
        ref = Case(qlens, ctxs, window=window, **kw).reference()
        out = Case(qlens, ctxs, window=window, fp8=True, **kw).run()
        assert_close(out, ref, FP8_MAX_TOL, FP8_RMS_TOL, f"fp8 vs bf16 window={window} q_scale={q_scale}")
