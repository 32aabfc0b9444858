"""The number of SMs a grid is sized by (programs per SM x SMs), read once per device."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs' worth, so that grid-sizing paths get exercised
    return torch.cuda.get_device_properties(device).multi_processor_count
