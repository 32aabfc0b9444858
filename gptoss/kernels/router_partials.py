"""The MoE router of one token folded into the attention's output projection (batch-1 decode): no
router kernel between o and the MoE's gate_up.

The router's logits are W_r @ t + b with t = rms_norm(h) * g = rstd * (g * h), h the residual stream
after attention and rstd = 1 / sqrt(mean(h^2) + eps): a linear map of g * h, times a scalar. So each
program of the o GEMV, which owns a few columns n of h, adds W_r[:, n] @ (g * h)[n] and sum(h[n]^2)
into float32 sums (`gemv.linear_rows_route`), and whoever routes finishes them: rstd from the sum of
squares, logits = rstd * sums + b rounded to the logits' bf16 as the router GEMV stores them
(`_finish_logits`). The MoE's input is u = g * h (bf16, moe_token's chunk order), and gate_up
multiplies its rows' sums by rstd, so no kernel writes t itself. H100, 20b batch-1 step (graph
replays, `scripts/ab_decode.py --replay --switch ROUTER_IN_O`): 1.676 ms against 1.725 with the
router kernel; what decides it is how cheaply the MoE kernels finish the sums (moe_token._key_topk),
so the triton backend takes the fold only for routers of up to moe_token.PARTIALS_MAX_EXPERTS (32)
experts: the 120b's 128, ranked on a tile, lost by half a step.

    sums [SLOTS, width(E)] float32, zero before the o GEMV: row s takes the atomics of the o programs
        p with p % SLOTS == s (fewer atomics a cell, so they do not queue at the end of o); column e < E
        the router row e, column E the sum of squares.

Numerics against HF (t = bf16(g * h * rstd), logits = bf16(W_r @ t + b)): here u = bf16(g * h) and the
rstd multiplies fp32 sums, one rounding each way, the same size of error; the atomics add in any
order (as down's output already does).

Who zeroes the sums: the model keeps one buffer a layer and each layer's o GEMV zeroes the next
layer's (the last layer's, the first's), after its PDL wait: by then every kernel of earlier
layers has ended, the next layer's o runs only after this one has, and the buffer's last readers
(gate_up and down of that layer, one step back) are long done. This needs two layers or more, and
every step to run all layers: a forward stopped by an error between layers leaves the first layer's
sums unzeroed, and the next step routes that layer wrong once.
`finish_logits_torch` is the twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SLOTS = 16


def width(num_experts: int) -> int:
    """A slot's floats: the experts' sums and the sum of squares, padded to a power of two."""
    return triton.next_power_of_2(num_experts + 1)


def new_sums(num_experts: int, device) -> torch.Tensor:
    return torch.zeros(SLOTS, width(num_experts), dtype=torch.float32, device=device)


@dataclass(frozen=True)
class RouterPartials:
    """One token's router as the o GEMV left it: what the MoE kernels route by instead of logits."""
    sums: torch.Tensor   # [SLOTS, width(num_experts)] float32
    bias: torch.Tensor   # [num_experts], the router's
    eps: float           # the norm's
    hidden: int          # the norm's width (the mean's divisor)
    num_experts: int


@triton.jit
def _finish_logits(sums_ptr, rb_ptr, E, hidden, eps, SLOTS_: tl.constexpr, W: tl.constexpr, E_PAD: tl.constexpr):
    """(logits [E_PAD] float32 as bf16 values, -inf past E; rstd) from the slots' sums (rows of W).
    A slot at a time, the sum of squares as a scalar: no 2-D tile whose reduction would cross warps
    (with 32 experts the vector sits in one warp; every program of the MoE kernels runs this before
    it can load a weight)."""
    e = tl.arange(0, E_PAD)
    tot = tl.zeros((E_PAD,), tl.float32)
    ss = 0.0
    for s in tl.static_range(SLOTS_):
        tot += tl.load(sums_ptr + s * W + e, mask=e < E, other=0.0)
        ss += tl.load(sums_ptr + s * W + E)
    rstd = 1.0 / tl.sqrt(ss / hidden + eps)
    lg = tot * rstd + tl.load(rb_ptr + e, mask=e < E, other=0.0).to(tl.float32)
    return tl.where(e < E, lg.to(rb_ptr.dtype.element_ty).to(tl.float32), float("-inf")), rstd


def finish_logits_torch(p: RouterPartials) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [1, E] in the bias's dtype, rstd [1] float32): _finish_logits in torch."""
    tot = p.sums.sum(0)
    rstd = torch.rsqrt(tot[p.num_experts:p.num_experts + 1] / p.hidden + p.eps)
    return (tot[:p.num_experts] * rstd + p.bias.float()).to(p.bias.dtype)[None], rstd


def route_torch(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, router_weight: torch.Tensor,
                sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The o GEMV's epilogue in torch, for x [1, H] the projection's output (bias added) in the model
    dtype: h = residual + x, u = norm_weight * h (natural order), sums[0] += (W_r @ u, sum(h^2))."""
    h = (residual.float() + x.float()).to(x.dtype)
    u = (norm_weight.float() * h.float()).to(x.dtype)
    E = router_weight.shape[0]
    sums[0, :E] += router_weight.float() @ u[0].float()
    sums[0, E] += (h.float() ** 2).sum()
    return h, u
