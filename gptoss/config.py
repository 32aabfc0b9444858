"""ModelConfig (what the checkpoint is) and EngineConfig (how we run it), both validated up front."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the value and what is allowed."""


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_position: int = 4096
    rope_truncate: bool = False
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    eos_token_id: int | list[int] = 200002
    pad_token_id: int = 199999
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if not self.layer_types:
            # every other layer uses a 128-token sliding window, layer 0 included
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise ConfigError(f"layer_types has {bad}; allowed: 'sliding_attention', 'full_attention'")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of 32 (MXFP4 blocks)")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                              f"[1, num_local_experts={self.num_local_experts}]")

    @property
    def is_sliding(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Reads a gpt-oss config.json as published (rope_scaling + rope_theta, or rope_parameters)."""
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise ConfigError(f"rope type {rope_type!r} is not supported; gpt-oss uses 'yarn'")
        layer_types = d.get("layer_types")
        n_layers = d["num_hidden_layers"]
        if not layer_types:
            # older configs: sliding_window with an alternating pattern starting at layer 0
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=n_layers,
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]),
            num_local_experts=d["num_local_experts"],
            num_experts_per_tok=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
            sliding_window=d.get("sliding_window") or 128, layer_types=list(layer_types),
            rope_theta=float(theta), rope_factor=float(rope.get("factor", 32.0)),
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings",
                                                    d.get("initial_context_length", 4096))),
            rope_truncate=bool(rope.get("truncate", False)),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            eos_token_id=d.get("eos_token_id", 200002), pad_token_id=d.get("pad_token_id", 199999),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """The config.json that HF transformers and the published checkpoints use."""
        return {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "yarn", "factor": self.rope_factor,
                             "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
                             "original_max_position_embeddings": self.rope_original_max_position,
                             "truncate": self.rope_truncate},
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": self.rope_original_max_position,
            "swiglu_limit": self.swiglu_limit, "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu",
            "output_router_logits": False, "router_aux_loss_coef": 0.9,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "torch_dtype": "bfloat16", "use_cache": True,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            },
        }


_CHOICES = {
    "kv_cache_dtype": ("auto", "bfloat16", "fp8"),
    "dtype": ("auto", "bfloat16", "float32"),
    "device": ("auto", "cuda", "cpu"),
}


@dataclass(slots=True)
class EngineConfig:
    """Every knob of LLM(...), checked once here; LLM(**kw) passes its kwargs straight in."""
    model: str
    moe_backend: str = "auto"
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.90
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    block_size: int = 16
    enforce_eager: bool = False
    async_scheduling: bool = True  # schedule step N+1 while step N runs
    seed: int = 0
    revision: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ConfigError(f"model={self.model!r}: give a local checkpoint directory or a hub repo id")
        self.model = str(self.model)
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
        if self.kv_cache_dtype == "fp8e4m3":
            self.kv_cache_dtype = "fp8"
        _check_int(self, "max_num_seqs", 1)
        _check_int(self, "tensor_parallel_size", 1)
        _check_int(self, "block_size", 1)
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two")
        if self.max_model_len is not None:
            _check_int(self, "max_model_len", 1)
        if self.max_num_batched_tokens is not None:
            _check_int(self, "max_num_batched_tokens", 1)
        if self.kv_cache_memory_bytes is not None:
            _check_int(self, "kv_cache_memory_bytes", 1)
        g = self.gpu_memory_utilization
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0 < g <= 1) or math.isnan(g):
            raise ConfigError(f"gpu_memory_utilization={g!r} must be a number in (0, 1]")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _check_int(cfg, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name}={v!r} must be an integer >= {minimum}")
