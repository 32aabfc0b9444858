"""Named ranges for torch.profiler traces (scripts/profile_step.py, profile_batch.py) that cost nothing
when no profiler runs: an eager forward enters ~200 of them (8 a layer), and torch's record_function
goes through the dispatcher even then (~6 us each on a 2-core host: about 1 ms of a 2k prefill's
launch time, which the GPU waits for when the host is slow)."""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

_NOTHING = contextlib.nullcontext()


def stage(name: str):
    """`with stage("moe.w1"):` a record_function range while a profiler runs, else nothing."""
    return record_function(name) if torch.autograd._profiler_enabled() else _NOTHING
