"""A packed decode step (engine.model_runner's one int64 tensor) unpacked into a decode CUDA graph's
static inputs by the graph's first kernel.

    decode_inputs(flat, tokens, ids, pos, slots, seq_lens, tables, swa_slots, swa_tables)  # the graph's buffers

Unpacked on the host side of the graph, a batch-1 step took a gather and a scatter for its pending
token, three int32 casts and seven copies into the static buffers: ~12 launches outside the graph
between two replays. The kernel reads the step's header from the device, so one captured launch
serves every step of a bucket, whatever its table width. The layout:

    header [T, B, W, S, max_q, max_s, swa, P], ids [T], pos [T], slots [T], query starts [B + 1],
    seq_lens [B], sampled rows [S], tables [B, W] (then the sliding group's [B, W] when swa),
    sliding slots [T if swa], pending [P positions, then P rows of the step before]

`step_sizes` gives these sizes; model_runner packs and unpacks by it, and the kernel computes the
same offsets on the device. A replayed step is pure decode (T == B == S, one token a sequence); a
pending position takes the step before's token at its row in `tokens`. Rows B .. rows - 1 are
padding: they write nowhere (slot -1), read the null block (table entry 0) and see one key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HEADER = 8
BLOCK_W = 256   # table entries a step
BLOCK_P = 512   # pending entries searched at once (P <= B <= the largest graph bucket)


def step_sizes(header: list[int]) -> list[int]:
    """The lengths of the packed step's parts, in order (the layout above)."""
    T, B, W, S, _, _, swa, P = header
    return [HEADER, T, T, T, B + 1, B, S, B * W * (2 if swa else 1), T if swa else 0, 2 * P]


@triton.jit
def _decode_inputs_kernel(flat_ptr, tokens_ptr, ids_ptr, pos_ptr, slots_ptr, seq_lens_ptr, tables_ptr,
                          swa_slots_ptr, swa_tables_ptr, stride_t, stride_st, HAS_SWA: tl.constexpr,
                          HEADER: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr):
    i = tl.program_id(0)
    T = tl.load(flat_ptr)
    B = tl.load(flat_ptr + 1)
    W = tl.load(flat_ptr + 2)
    S = tl.load(flat_ptr + 3)
    swa = tl.load(flat_ptr + 6)
    P = tl.load(flat_ptr + 7)
    o_ids = HEADER
    o_pos = o_ids + T
    o_slots = o_pos + T
    o_lens = o_slots + T + B + 1  # past the query starts (the graph keeps its own arange)
    o_tables = o_lens + B + S     # past the sampled rows (likewise)
    o_swa_slots = o_tables + B * W * (1 + swa)
    o_pend = o_swa_slots + T * swa
    i64 = i.to(tl.int64)
    w = tl.arange(0, BLOCK_W)
    if i < B:
        tok = tl.load(flat_ptr + o_ids + i)
        p = tl.arange(0, BLOCK_P)
        at = tl.load(flat_ptr + o_pend + p, mask=p < P, other=-1)
        row = tl.load(flat_ptr + o_pend + P + p, mask=p < P, other=0)
        hit = tl.sum(tl.where(at == i, row + 1, 0), axis=0)  # 1 + the pending row of position i, or 0
        if hit > 0:
            tok = tl.load(tokens_ptr + hit - 1)
        tl.store(ids_ptr + i, tok)
        tl.store(pos_ptr + i, tl.load(flat_ptr + o_pos + i))
        tl.store(slots_ptr + i, tl.load(flat_ptr + o_slots + i))
        tl.store(seq_lens_ptr + i, tl.load(flat_ptr + o_lens + i).to(tl.int32))
        for c in range(0, W, BLOCK_W):
            m = c + w < W
            tl.store(tables_ptr + i64 * stride_t + c + w,
                     tl.load(flat_ptr + o_tables + i * W + c + w, mask=m).to(tl.int32), mask=m)
        if HAS_SWA:
            if swa != 0:
                tl.store(swa_slots_ptr + i, tl.load(flat_ptr + o_swa_slots + i))
                for c in range(0, W, BLOCK_W):
                    m = c + w < W
                    tl.store(swa_tables_ptr + i64 * stride_st + c + w,
                             tl.load(flat_ptr + o_tables + (B + i) * W + c + w, mask=m).to(tl.int32), mask=m)
    else:
        tl.store(ids_ptr + i, 0)
        tl.store(pos_ptr + i, 0)
        tl.store(slots_ptr + i, -1)
        tl.store(seq_lens_ptr + i, 1)
        tl.store(tables_ptr + i64 * stride_t, 0)
        if HAS_SWA:
            tl.store(swa_slots_ptr + i, -1)
            tl.store(swa_tables_ptr + i64 * stride_st, 0)


def decode_inputs(flat: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                  slots: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor, swa_slots: torch.Tensor | None,
                  swa_tables: torch.Tensor | None) -> None:
    """Fill the first len(ids) rows of the static buffers (ids, pos, slots int64; seq_lens int32; tables
    int32 [rows, >= W]; the sliding group's, or None) from flat, a pure decode step of B <= rows
    sequences. tokens: int64, the step before's sampled tokens, which pending positions take."""
    rows = ids.shape[0]
    if flat.dtype != torch.int64 or tables.dtype != torch.int32 or tables.stride(1) != 1:
        raise ValueError("decode_inputs: flat int64 and int32 tables with contiguous rows")
    has_swa = swa_tables is not None
    _decode_inputs_kernel[(rows,)](
        flat, tokens, ids, pos, slots, seq_lens, tables, swa_slots if has_swa else slots,
        swa_tables if has_swa else tables, tables.stride(0), (swa_tables if has_swa else tables).stride(0),
        HAS_SWA=has_swa, HEADER=HEADER, BLOCK_W=BLOCK_W, BLOCK_P=BLOCK_P, num_warps=1)
