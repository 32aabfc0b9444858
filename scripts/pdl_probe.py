"""Does this Triton launch with programmatic dependent launch, and what does it save a kernel boundary?
A chain of 200 small kernels (each reads x and its own weight strip, writes y) captured in a CUDA
graph, timed per kernel without PDL, with it, and with the weights loaded before the wait; the chain's
result is checked against a plain recompute. Then how much of a one-row GEMV's weights stream while
the kernel before it runs: pairs of an 8-program kernel busy for a set time (a stand-in for batch-1
attention) and the o projection's GEMV [2880, 4096], with its first K step or all of K loaded before
its wait.

    python scripts/pdl_probe.py
"""
import torch, triton, triton.language as tl, inspect
print("triton", triton.__version__)
try:
    from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents
    print("gdc available")
except Exception as e:
    print("no gdc", e); raise SystemExit

@triton.jit
def _step(x_ptr, y_ptr, w_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    # y = x + sum of a weight strip (weights independent of x: loadable before the wait)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if PREFETCH:
        w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if not PREFETCH:
        w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(y_ptr + offs, x + w, mask=offs < N)

def replay_us(g, per, reps=7):
    """Median us per item over reps timed replays of graph g (per items a replay)."""
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) * 1000 / per)
    return sorted(ts)[reps // 2]

def run(pdl, prefetch, n_kernels=200, N=1 << 20, BLOCK=4096):
    xs = [torch.randn(N, device="cuda") for _ in range(2)]
    ws = [torch.randn(N, device="cuda") for _ in range(n_kernels)]  # 4 MB each, 800 MB total: no L2 reuse
    def chain():
        for i in range(n_kernels):
            kw = {"launch_pdl": True} if pdl else {}
            _step[(triton.cdiv(N, BLOCK),)](xs[i % 2], xs[(i + 1) % 2], ws[i], N, BLOCK=BLOCK, PDL=pdl,
                                            PREFETCH=prefetch, num_warps=4, **kw)
    chain(); torch.cuda.synchronize()
    # correctness: replay result equals a plain recompute
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    us = replay_us(g, n_kernels)
    x0 = torch.randn(N, device="cuda"); xs[0].copy_(x0); g.replay(); torch.cuda.synchronize()
    ref = x0.clone()
    for i in range(n_kernels):
        ref = ref + ws[i]
    ok = torch.allclose(xs[n_kernels % 2], ref, atol=1e-3)
    return us, ok

for N in (1 << 14, 1 << 20, 1 << 22):
    for pdl, pf in ((False, False), (True, False), (True, True)):
        us, ok = run(pdl, pf, N=N)
        print(f"N={N:>8} ({N*4/1e6:.2f} MB w) pdl={pdl} prefetch={pf}: {us:.2f} us/kernel, correct={ok}")


from gptoss.kernels import pdl as gpdl  # noqa: E402
from gptoss.kernels.gemv import GemvOptions, linear_rows  # noqa: E402


@triton.jit
def _busy(x_ptr, ns, PDL: tl.constexpr):
    # busy for ns nanoseconds after the wait, then rewrites the row the GEMV after it reads
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    t = t0
    while t - t0 < ns:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    offs = tl.program_id(0) * 512 + tl.arange(0, 512)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 1.0)


def busy_then_gemv(opts, ns, use_pdl=True, n=20):
    """us a (busy kernel, o GEMV) pair, over n pairs in a graph, each GEMV on its own weights (cold)."""
    ws = [torch.randn(2880, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def chain():
        for i in range(n):
            _busy[(8,)](x, ns, **gpdl.args())
            linear_rows(x, ws[i], None, opts)
    with gpdl.enabled(use_pdl):
        chain()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain()
    return replay_us(g, n, reps=9)


print("| busy ns | o, first step early | o, all four early | o, first step, no PDL |")
print("|---|---|---|---|")
for ns in (0, 2000, 4000, 8000):
    r = [busy_then_gemv(GemvOptions(), ns), busy_then_gemv(GemvOptions(preload=4), ns),
         busy_then_gemv(GemvOptions(), ns, use_pdl=False)]
    print(f"| {ns} | " + " | ".join(f"{v:.2f}" for v in r) + " |")
