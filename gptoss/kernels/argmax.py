"""The argmax of each row of the logits (greedy decoding) inside the decode CUDA graph, in one kernel.

    row_argmax(logits, out, scratch)        # out[r] = the first index of row r's largest value
    row_argmax(logits, out, scratch, also)  # and also[r] (another int64 [R], e.g. pinned host memory)

torch's argmax of one 201,088-wide row is a memset and a reduction, 9 us of a batch-1 step on an H100,
outside the graph. Here up to one program per BLOCK values of a row (fewer as rows grow) each reduce
a slice from L2 and fold it into the row's key with an atomic max; the last program of a row to
arrive (a counter) writes the index and puts the key and the counter back, so the scratch needs no
reset between replays. Short slices keep the chain of dependent L2 trips short: at one row, 99
programs of one 2,048-value step each, 3.6 us of the step on an H100 (32 programs of four steps
took 6.1 us on an H200).

A key orders (value, index) as the argmax does: the value's fp32 bits made monotonic as a signed
integer in the high 32 bits, and 0xFFFFFFFF - index in the low ones (the lower index wins a tie).
-0.0 counts as +0.0. NaNs are not special-cased (torch's argmax returns a NaN's index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sm_count import sm_count

BLOCK = 2048  # values a program reads a step


@triton.jit
def _row_argmax_kernel(x_ptr, out_ptr, also_ptr, keys_ptr, counts_ptr, V, stride_x, per, splits,
                       BLOCK: tl.constexpr, ALSO: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    lo = s * per
    hi = tl.minimum(lo + per, V)
    offs = tl.arange(0, BLOCK)
    best = tl.full((), -float("inf"), tl.float32)
    best_i = lo
    for k0 in range(lo, hi, BLOCK):
        k = k0 + offs
        v = tl.load(x_ptr + r.to(tl.int64) * stride_x + k, mask=k < hi, other=-float("inf")).to(tl.float32)
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, k, 2147483647), axis=0)  # the first index of the step's max
        better = m > best
        best_i = tl.where(better, i, best_i)
        best = tl.where(better, m, best)
    best = best + 0.0  # -0.0 -> +0.0, so that signed zeros tie
    bits = best.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # fp32 order as signed integers
    key = (ordered.to(tl.int64) << 32) | (4294967295 - best_i.to(tl.int64))
    tl.atomic_max(keys_ptr + r, key, sem="relaxed")
    if tl.atomic_add(counts_ptr + r, 1, sem="acq_rel") == splits - 1:  # the row's last program
        final = tl.atomic_xchg(keys_ptr + r, -9223372036854775807 - 1, sem="relaxed")
        tl.atomic_xchg(counts_ptr + r, 0, sem="relaxed")
        index = 4294967295 - (final & 4294967295)
        tl.store(out_ptr + r, index)
        if ALSO:
            tl.store(also_ptr + r, index)


def argmax_scratch(rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and counters row_argmax keeps between calls (reset by the kernel itself)."""
    keys = torch.full((rows,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    return keys, torch.zeros(rows, dtype=torch.int32, device=device)


def row_argmax(x: torch.Tensor, out: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor],
               also: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V] (any float dtype, rows contiguous) -> out int64 [R]: the first index of each row's maximum.
    scratch: argmax_scratch(>= R rows), not used by another call at the same time. also: a second int64
    [R] the indices are written to (the decode graphs' pinned host tokens, read by the host in place)."""
    R, V = x.shape
    keys, counts = scratch
    if out.shape != (R,) or out.dtype != torch.int64 or x.stride(-1) != 1 or keys.numel() < R:
        raise ValueError(f"row_argmax: x {tuple(x.shape)} needs contiguous rows, out int64 [{R}] (got "
                         f"{tuple(out.shape)} {out.dtype}) and scratch of >= {R} rows (got {keys.numel()})")
    if also is not None and (also.shape != (R,) or also.dtype != torch.int64):
        raise ValueError(f"row_argmax: also must be int64 [{R}] like out, got {tuple(also.shape)} {also.dtype}")
    if R and V:
        splits = min(triton.cdiv(V, BLOCK), max(8, 4 * sm_count(x.device) // R))
        per = triton.cdiv(V, splits)
        splits = triton.cdiv(V, per)  # none empty
        _row_argmax_kernel[(R, splits)](x, out, out if also is None else also, keys, counts, V, x.stride(0), per,
                                        splits, BLOCK=BLOCK, ALSO=also is not None, num_warps=4)
    return out


def row_argmax_torch(x: torch.Tensor) -> torch.Tensor:
    """The twin: torch's argmax, which also takes the first index of a tied maximum."""
    return x.argmax(-1)
