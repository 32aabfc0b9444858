"""Mixture-of-experts backends, selectable by name (`LLM(..., moe_backend=...)`)."""

from .base import MoEBackend, MoESpec, MoEWeights, route_torch, swiglu_torch
from .registry import (get_moe_backend, list_moe_backends, normalize_name, register_moe_backend,
                       unregister_moe_backend)

__all__ = ["MoEBackend", "MoESpec", "MoEWeights", "route_torch", "swiglu_torch", "get_moe_backend",
           "list_moe_backends", "normalize_name", "register_moe_backend", "unregister_moe_backend"]
