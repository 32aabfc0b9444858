"""What every MoE backend is given and must do.

A backend gets the experts of its rank (a contiguous slice of the experts for expert parallelism)
and, for tensor parallelism, a slice of each expert's intermediate dimension. Its forward takes the
hidden states and the router logits of ALL experts and returns this rank's partial output; the
caller all-reduces across ranks. So TP/EP need no new kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True, slots=True)
class MoESpec:
    num_experts: int            # experts in the whole model (router width)
    top_k: int
    hidden_size: int
    intermediate_size: int      # this rank's slice of the per-expert intermediate dimension
    expert_start: int = 0       # global index of this rank's first expert
    num_local_experts: int | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    add_down_bias: bool = True  # only one TP rank adds the down bias, so the all-reduce sums it once

    @property
    def local_experts(self) -> int:
        return self.num_experts if self.num_local_experts is None else self.num_local_experts


@dataclass(slots=True)
class MoEWeights:
    """This rank's expert weights, MXFP4 as in the checkpoint (gate_up rows interleaved gate/up)."""
    gate_up_blocks: torch.Tensor  # [E_local, 2I, H/32, 16] uint8
    gate_up_scales: torch.Tensor  # [E_local, 2I, H/32] uint8 (e8m0)
    gate_up_bias: torch.Tensor    # [E_local, 2I]
    down_blocks: torch.Tensor     # [E_local, H, I/32, 16] uint8
    down_scales: torch.Tensor     # [E_local, H, I/32] uint8
    down_bias: torch.Tensor       # [E_local, H]

    def check(self, spec: MoESpec) -> None:
        e, i2, h = spec.local_experts, 2 * spec.intermediate_size, spec.hidden_size
        want = {
            "gate_up_blocks": (e, i2, h // 32, 16), "gate_up_scales": (e, i2, h // 32),
            "gate_up_bias": (e, i2), "down_blocks": (e, h, i2 // 64, 16),
            "down_scales": (e, h, i2 // 64), "down_bias": (e, h),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"MoE weight {name} has shape {got}, expected {shape}")

    def to(self, device) -> "MoEWeights":
        return MoEWeights(*(getattr(self, n).to(device) for n in self.__slots__))


class MoEBackend:
    """Base class: subclasses set `name` (by the registry), implement is_supported and forward."""
    name: ClassVar[str] = ""
    # forward has no host sync and no data-dependent shapes, so a CUDA graph can capture it
    graph_safe: ClassVar[bool] = False

    @classmethod
    def is_supported(cls, device: torch.device, config) -> tuple[bool, str]:
        return True, ""

    def __init__(self, weights: MoEWeights, spec: MoESpec, dtype: torch.dtype):
        weights.check(spec)
        self.spec = spec
        self.dtype = dtype

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, num_experts] -> [T, H] in x.dtype (this rank's partial sum)."""
        raise NotImplementedError

    def forward_sum(self, x: torch.Tensor, router_logits: torch.Tensor | None, x_chunk_order: bool = False,
                    router_partials=None) -> torch.Tensor:
        """forward's result before its cast to x.dtype: a backend that sums in float32 may return that
        (the model folds it into the residual stream in the next norm). Default: forward.
        x_chunk_order: x comes in gptoss.kernels.moe_token's chunk order, which only a backend whose
        takes_chunk_order says so is given. router_partials (router_logits None): the router folded
        into the o projection (gptoss.kernels.router_partials.RouterPartials), x = u, not yet scaled by
        the norm's rstd; only for a backend whose takes_router_partials says so."""
        if router_partials is not None:
            raise ValueError(f"{type(self).__name__} routes by logits (takes_router_partials is False)")
        if x_chunk_order:
            raise ValueError(f"{type(self).__name__} takes x in its natural order (takes_chunk_order is False)")
        return self.forward(x, router_logits)

    def takes_chunk_order(self, num_tokens: int) -> bool:
        """Whether forward_sum of num_tokens tokens reads x faster in moe_token's chunk order, which the
        model's norm + router kernel can write at no cost (then it passes x_chunk_order=True)."""
        return False

    def takes_router_partials(self, num_tokens: int) -> bool:
        """Whether forward_sum of num_tokens tokens can finish the router itself from the o projection's
        partial sums (then the model runs no router kernel)."""
        return False


def route_torch(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token; the softmax runs over the k chosen logits only."""
    vals, ids = torch.topk(router_logits, top_k, dim=-1, sorted=True)  # [T, k]
    return torch.softmax(vals.float(), dim=-1), ids


def swiglu_torch(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """h [T, 2I] with gate on even columns and up on odd -> [T, I]: the clamped SwiGLU of gpt-oss."""
    gate = h[..., 0::2].clamp(max=limit)
    up = h[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)
