"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of small decode steps.

A decode step at batch 1 is ~300 short kernels in a row, and each kernel's programs normally reach
the SMs only after the kernel before it has ended. With PDL the next kernel is launched while this
one runs; its programs wait on the SM for this one to finish. Each of our kernels that takes the PDL
constexpr opens with `pdl_enter(PDL)`:

    griddepcontrol.wait              # the grid before has ended and its writes are visible: this
                                     # kernel may read its outputs and overwrite what it read
    griddepcontrol.launch_dependents # the next grid may launch now

Waiting first, in every program, keeps the chain transitive (a kernel that has ended implies that the
kernel before it had ended) and keeps a kernel from writing a buffer the previous one still reads.
`pdl_trigger` lets the next grid launch earlier still, before this one's wait, where that grid reads
nothing but weights until its own wait (batch-1 attention, so that the o projection's weights stream
while it runs): the chain stays transitive, since every kernel still waits for the one before it.
Kernels launched without PDL (cuBLAS, torch's) keep the plain stream order.

PDL is off unless a caller turns it on (`enabled(True)`): the decode CUDA graphs do for small
batches (engine.cuda_graphs.PDL_MAX_BATCH), whose kernels fill the GPU at most once or twice. A probe
on H100 (`scripts/pdl_probe.py`: a chain of 200 kernels in a graph) saved 0.3 us a kernel for tiny
ones and 0.55 us for 4 MB reads, but cost 2.9 us a kernel for 16 MB reads over 1,024 programs.

    with pdl.enabled(True):
        kernel[grid](..., **pdl.args())     # PDL=True, launch_pdl=True; else PDL=False
"""

from __future__ import annotations

import contextlib

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_on = False


@contextlib.contextmanager
def enabled(on: bool):
    """Launch our kernels with PDL (on) or without within the block."""
    global _on
    prev, _on = _on, bool(on)
    try:
        yield
    finally:
        _on = prev


def args() -> dict:
    """The launch keywords of a kernel that opens with pdl_enter(PDL)."""
    return {"PDL": True, "launch_pdl": True} if _on else {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next grid launch now, before this one's wait: the next kernel may then be resident two
    kernels ahead and load what does not depend on either (its weights) while both run. Only for a
    next kernel that reads nothing of the kernels before it until its own wait (pdl_enter still
    follows: a repeated launch_dependents does nothing)."""
    if PDL:
        gdc_launch_dependents()
