"""YaRN rotary embedding as gpt-oss uses it (rotate halves, cos/sin scaled by the attention factor)."""

from __future__ import annotations

import math

import torch


def yarn_inv_freq(head_dim: int, base: float, factor: float, beta_fast: float, beta_slow: float,
                  original_max_position: int, truncate: bool) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention factor (0.1 ln(factor) + 1), per the YaRN paper."""

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return head_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """The cos / sin tables (a module so that they move with the model). The rotation itself is fused
    into the KV-cache write: kernels.attention.rope_write_kv, twin attention_torch.apply_rope_torch."""

    def __init__(self, config, max_positions: int, device=None):
        super().__init__()
        inv_freq, scale = yarn_inv_freq(config.head_dim, config.rope_theta, config.rope_factor,
                                        config.rope_beta_fast, config.rope_beta_slow,
                                        config.rope_original_max_position, config.rope_truncate)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_positions, head_dim/2] each, fp32: the table is small and fp32 keeps long positions exact
        self.register_buffer("cos", (freqs.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).to(device), persistent=False)
