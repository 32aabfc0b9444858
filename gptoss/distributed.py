"""Tensor / expert parallel state: which slice of the heads and experts this rank holds.

With one process (the default) every slice is the whole and all_reduce does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moe import MoESpec


@dataclass(slots=True)
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    expert_parallel: bool = False
    group: object = None  # a torch.distributed process group when tp_size > 1

    def moe_spec(self, config) -> MoESpec:
        """Expert parallelism gives each rank whole experts; otherwise each rank takes a slice of
        every expert's intermediate dimension."""
        E, I = config.num_local_experts, config.intermediate_size
        common = dict(num_experts=E, top_k=config.num_experts_per_tok, hidden_size=config.hidden_size,
                      swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)
        if self.tp_size == 1:
            return MoESpec(intermediate_size=I, **common)
        if self.expert_parallel:
            if E % self.tp_size:
                raise ValueError(f"{E} experts do not split evenly over {self.tp_size} ranks")
            n = E // self.tp_size
            return MoESpec(intermediate_size=I, expert_start=self.tp_rank * n, num_local_experts=n, **common)
        if I % (32 * self.tp_size):
            raise ValueError(f"intermediate_size {I} does not split into {self.tp_size} slices of 32-blocks")
        return MoESpec(intermediate_size=I // self.tp_size, add_down_bias=self.tp_rank == 0, **common)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        import torch.distributed as dist
        dist.all_reduce(x, group=self.group)
        return x


def check_parallel_sizes(config, tp_size: int, expert_parallel: bool) -> None:
    """Fail before any process starts if the model does not split over tp_size ranks."""
    h, kv = config.num_attention_heads, config.num_key_value_heads
    if h % tp_size:
        raise ValueError(f"{h} attention heads do not split evenly over tensor_parallel_size={tp_size}")
    if kv % tp_size and tp_size % kv:
        raise ValueError(f"{kv} kv heads and tensor_parallel_size={tp_size}: one must divide the other")
    ParallelState(tp_size, 0, expert_parallel).moe_spec(config)  # raises on an uneven expert split
