"""The decode graphs' argmax kernel (kernels.argmax) against torch's argmax: ties go to the lower
index, signed zeros tie, all -inf rows give 0, the scratch puts itself back after every call, and a
second output (pinned host memory on the GPU) gets the same indices.

CPU: Triton's interpreter in a child process; GPU (@pytest.mark.gpu): the 20b vocabulary, in and out
of a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from interpreted import check_interpreted

_CHECKS = """
import torch
from gptoss.kernels.argmax import argmax_scratch, row_argmax

def fresh(R, V, dt, g, device):
    x = torch.randn(R, V, generator=g).to(dt)
    x[0, V // 3] = x[0].max()                     # the maximum tied at two more places
    x[0, V - 1] = x[0].max()
    if R > 1:                                     # signed zeros only: the first of them wins
        x[1] = torch.where(torch.rand(V, generator=g) < 0.5, 0.0, -0.0).to(dt)
    return x.to(device)

def check(cases, device, rounds=2):
    g = torch.Generator().manual_seed(0)
    sc = argmax_scratch(8, device)
    for R, V, dt in cases:
        for _ in range(rounds):
            x = fresh(R, V, dt, g, device)
            out = torch.full((R,), -1, dtype=torch.int64, device=device)
            also = torch.full((R,), -1, dtype=torch.int64, pin_memory=device == "cuda")  # host, as the graphs'
            row_argmax(x, out, sc, also if R > 1 else None)
            assert torch.equal(out, x.argmax(-1)), (R, V, dt, out.tolist(), x.argmax(-1).tolist())
            if R > 1:
                assert also.tolist() == out.tolist()
            assert (sc[1] == 0).all() and (sc[0] == torch.iinfo(torch.int64).min).all(), "scratch not put back"
    x = torch.full((2, 300), float("-inf"), device=device)
    out = torch.empty(2, dtype=torch.int64, device=device)
    assert row_argmax(x, out, sc).tolist() == [0, 0]
"""


def test_argmax_matches_torch_interpreted():
    check_interpreted(_CHECKS + """
check([(1, 5000, torch.bfloat16), (3, 70001, torch.bfloat16), (2, 100, torch.float32), (2, 31, torch.float16)], "cpu")
print("ok")
""")


def test_argmax_rejects_bad_buffers():
    from gptoss.kernels.argmax import argmax_scratch, row_argmax
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="int64"):
        row_argmax(x, torch.empty(3, dtype=torch.int32), argmax_scratch(3, "cpu"))
    with pytest.raises(ValueError, match=">= 3 rows"):
        row_argmax(x, torch.empty(3, dtype=torch.int64), argmax_scratch(2, "cpu"))
    with pytest.raises(ValueError, match="also must be int64"):
        row_argmax(x, torch.empty(3, dtype=torch.int64), argmax_scratch(3, "cpu"), torch.empty(2, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_argmax_matches_torch_gpu():
    ns = {}
    exec(_CHECKS, ns)
    ns["check"]([(1, 201088, torch.bfloat16), (8, 201088, torch.bfloat16), (3, 1000, torch.float32)], "cuda", 3)
    # in a graph, replayed on fresh logits: the scratch resets itself between replays
    from gptoss.kernels.argmax import argmax_scratch, row_argmax
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 201088, generator=g).bfloat16().cuda()
    out = torch.empty(4, dtype=torch.int64, device="cuda")
    sc = argmax_scratch(4, "cuda")
    row_argmax(x, out, sc)
    graph = torch.cuda.CUDAGraph()
    host = torch.full((4,), -1, dtype=torch.int64, pin_memory=True)
    with torch.cuda.graph(graph):
        row_argmax(x, out, sc, host)
    for _ in range(3):
        x.copy_(ns["fresh"](4, 201088, torch.bfloat16, g, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, x.argmax(-1)) and host.tolist() == out.tolist()
