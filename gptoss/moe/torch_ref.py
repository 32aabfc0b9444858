"""The "torch" MoE backend: the reference. Dequantizes one expert at a time and multiplies."""

from __future__ import annotations

import torch

from ..quant.mxfp4 import dequantize_mxfp4
from .base import MoEBackend, route_torch, swiglu_torch
from .registry import register_moe_backend

# a layer whose dequantized experts fit in this many bytes keeps them (tiny test models on CPU, where
# re-dequantizing every step dominates the time); real models dequantize per expert, per call
KEEP_DEQUANTIZED_BYTES = 16 << 20


@register_moe_backend("torch")
class TorchMoE(MoEBackend):
    @classmethod
    def is_supported(cls, device, config):
        return True, ""

    def __init__(self, weights, spec, dtype):
        super().__init__(weights, spec, dtype)
        self.w = weights
        n = spec.local_experts * 3 * spec.intermediate_size * spec.hidden_size * dtype.itemsize
        self._kept = [self._dequantize(e) for e in range(spec.local_experts)] if n <= KEEP_DEQUANTIZED_BYTES else None

    def _dequantize(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.w
        return (dequantize_mxfp4(w.gate_up_blocks[e], w.gate_up_scales[e], self.dtype),  # [2I, H]
                dequantize_mxfp4(w.down_blocks[e], w.down_scales[e], self.dtype))         # [H, I]

    def forward(self, x, router_logits):
        spec = self.spec
        weights, ids = route_torch(router_logits, spec.top_k)  # [T, k]
        out = torch.zeros(x.shape[0], spec.hidden_size, dtype=torch.float32, device=x.device)
        local = ids - spec.expert_start
        for e in torch.unique(local).tolist():
            if not 0 <= e < spec.local_experts:
                continue  # another rank's expert
            tok, slot = (local == e).nonzero(as_tuple=True)
            w1, w2 = self._kept[e] if self._kept is not None else self._dequantize(e)
            h = x[tok] @ w1.T + self.w.gate_up_bias[e].to(self.dtype)  # [n, 2I]
            a = swiglu_torch(h, spec.swiglu_alpha, spec.swiglu_limit)  # [n, I]
            y = a @ w2.T  # [n, H]
            if spec.add_down_bias:
                y = y + self.w.down_bias[e].to(self.dtype)
            # a token picks an expert at most once, so `tok` has no repeats
            out.index_put_((tok,), y.float() * weights[tok, slot].unsqueeze(-1), accumulate=True)
        return out.to(x.dtype)
