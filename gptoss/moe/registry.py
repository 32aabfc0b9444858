"""MoE backends by name: register, list, pick ("auto"), and explain why one cannot run."""

from __future__ import annotations

from typing import Callable

import torch

from .base import MoEBackend

_REGISTRY: dict[str, type[MoEBackend]] = {}
# "auto" walks this list and takes the first backend that is registered and supported
AUTO_PRIORITY = ["triton", "triton_fp8", "torch"]


def normalize_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register_moe_backend(name: str) -> Callable[[type[MoEBackend]], type[MoEBackend]]:
    """Class decorator: `@register_moe_backend("mine") class Mine(MoEBackend): ...`."""
    key = normalize_name(name)
    if not key or key == "auto":
        raise ValueError(f"{name!r} cannot be a backend name")

    def deco(cls: type[MoEBackend]) -> type[MoEBackend]:
        if not (isinstance(cls, type) and issubclass(cls, MoEBackend)):
            raise TypeError(f"register_moe_backend({name!r}) expects a MoEBackend subclass, got {cls!r}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def unregister_moe_backend(name: str) -> None:
    _REGISTRY.pop(normalize_name(name), None)


def list_moe_backends() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_moe_backend(name: str, device: torch.device | str, config) -> type[MoEBackend]:
    """The backend class for `name` ("auto" included) on `device`, or a ValueError saying why not."""
    _load_builtin()
    device = torch.device(device)
    key = normalize_name(name)
    if key == "auto":
        reasons = []
        for cand in AUTO_PRIORITY:
            cls = _REGISTRY.get(cand)
            if cls is None:
                continue
            ok, why = cls.is_supported(device, config)
            if ok:
                return cls
            reasons.append(f"{cand}: {why}")
        raise ValueError("no MoE backend supports this device/config: " + "; ".join(reasons))
    if key not in _REGISTRY:
        raise ValueError(f"unknown moe_backend {name!r}; registered: {['auto'] + sorted(_REGISTRY)}")
    cls = _REGISTRY[key]
    ok, why = cls.is_supported(device, config)
    if not ok:
        raise ValueError(f"moe_backend {key!r} cannot run here: {why}")
    return cls


def _load_builtin() -> None:
    # importing the modules registers them; done lazily so `import gptoss` stays light
    from . import torch_ref  # noqa: F401
    try:
        from . import triton_backends  # noqa: F401
    except ImportError as e:  # triton missing: its backends are simply not registered
        if "triton" not in str(e):
            raise
