"""The "torch" MoE backend: the reference. Dequantizes one expert at a time and multiplies."""

from __future__ import annotations

import torch

from ..quant.mxfp4 import dequantize_mxfp4
from .base import MoEBackend, route_torch, swiglu_torch
from .registry import register_moe_backend


@register_moe_backend("torch")
class TorchMoE(MoEBackend):
    @classmethod
    def is_supported(cls, device, config):
        return True, ""

    def __init__(self, weights, spec, dtype):
        super().__init__(weights, spec, dtype)
        self.w = weights

    def forward(self, x, router_logits):
        spec = self.spec
        weights, ids = route_torch(router_logits, spec.top_k)  # [T, k]
        out = torch.zeros(x.shape[0], spec.hidden_size, dtype=torch.float32, device=x.device)
        local = ids - spec.expert_start
        for e in torch.unique(local).tolist():
            if not 0 <= e < spec.local_experts:
                continue  # another rank's expert
            tok, slot = (local == e).nonzero(as_tuple=True)
            w1 = dequantize_mxfp4(self.w.gate_up_blocks[e], self.w.gate_up_scales[e], self.dtype)
            w2 = dequantize_mxfp4(self.w.down_blocks[e], self.w.down_scales[e], self.dtype)
            h = x[tok] @ w1.T + self.w.gate_up_bias[e].to(self.dtype)  # [n, 2I]
            a = swiglu_torch(h, spec.swiglu_alpha, spec.swiglu_limit)  # [n, I]
            y = a @ w2.T  # [n, H]
            if spec.add_down_bias:
                y = y + self.w.down_bias[e].to(self.dtype)
            out.index_add_(0, tok, y.float() * weights[tok, slot].unsqueeze(-1))
        return out.to(x.dtype)
