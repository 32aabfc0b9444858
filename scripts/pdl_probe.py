"""Does this Triton launch with programmatic dependent launch, and what does it save a kernel boundary?
A chain of 200 small kernels (each reads x and its own weight strip, writes y) captured in a CUDA
graph, timed per kernel without PDL, with it, and with the weights loaded before the wait; the chain's
result is checked against a plain recompute.

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
    ts = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) * 1000 / n_kernels)
    x0 = torch.randn(N, device="cuda"); xs[0].copy_(x0); g.replay(); torch.cuda.synchronize()
    ref = x0.clone()
    for i in range(n_kernels):
        ref = ref + ws[i]
    ok = torch.allclose(xs[n_kernels % 2], ref, atol=1e-3)
    ts.sort()
    return ts[3], ok

for N in (1 << 14, 1 << 20, 1 << 22):
    for pdl, pf in ((False, False), (True, False), (True, True)):
        us, ok = run(pdl, pf, N=N)
        print(f"N={N:>8} ({N*4/1e6:.2f} MB w) pdl={pdl} prefetch={pf}: {us:.2f} us/kernel, correct={ok}")
