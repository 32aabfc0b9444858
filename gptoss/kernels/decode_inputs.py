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

from . import pdl
from .pdl import pdl_enter

HEADER = 8
BLOCK_W = 256   # table entries a step
BLOCK_P = 512   # pending entries searched at once (P <= B <= the largest graph bucket)
BLOCK_F = 512   # the step's first entries, read in one load (at most the buffer's size, a power of 2)


def step_sizes(header: list[int]) -> list[int]:
    """The lengths of the packed step's parts, in order (the layout above)."""
    T, B, W, S, _, _, swa, P = header
    return [HEADER, T, T, T, B + 1, B, S, B * W * (2 if swa else 1), T if swa else 0, 2 * P]


@triton.jit
def _pick(blk, idx, at):
    """blk[at] of a block held in registers (at a scalar; 0 past it)."""
    return tl.sum(tl.where(idx == at, blk, 0), axis=0)


@triton.jit
def _store_table(dst_ptr, blk, idx, at, W):
    """The W table entries that start at blk[at], stored as int32 at dst_ptr[0:W]."""
    tl.store(dst_ptr + (idx - at), blk.to(tl.int32), mask=(idx >= at) & (idx < at + W))


@triton.jit
def _store_row(tokens_ptr, ids_ptr, pos_ptr, slots_ptr, seq_lens_ptr, i, tok, hit, pos, slot, seq_len):
    """Row i's token (the step before's at row hit - 1 when hit > 0: a pending one), position, slot
    and length into the graph's buffers."""
    if hit > 0:
        tok = tl.load(tokens_ptr + hit - 1)
    tl.store(ids_ptr + i, tok)
    tl.store(pos_ptr + i, pos)
    tl.store(slots_ptr + i, slot)
    tl.store(seq_lens_ptr + i, seq_len.to(tl.int32))


@triton.jit
def _decode_inputs_kernel(flat_ptr, tokens_ptr, ids_ptr, pos_ptr, slots_ptr, seq_lens_ptr, tables_ptr,
                          swa_slots_ptr, swa_tables_ptr, stride_t, stride_st, HAS_SWA: tl.constexpr,
                          HEADER: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_F: tl.constexpr, PDL: tl.constexpr):
    # the graph's first kernel: under PDL the next one (the first qkv GEMV) launches at once and streams
    # its weights while this one reads the step, across PCIe from the small buckets' pinned buffers,
    # where a trip costs microseconds: the step's first BLOCK_F entries come in one load, and a step
    # that fits in them (batch 1 up to ~4k tokens of context) is unpacked from registers; a longer one
    # reads the rest with every load before the first store (a store may alias the step's buffer as far
    # as the compiler knows, so a load after one waits for it: 13 us a batch-1 step, interleaved).
    pdl_enter(PDL)
    i = tl.program_id(0)
    f = tl.arange(0, BLOCK_F)
    blk = tl.load(flat_ptr + f)  # (the buffer holds at least BLOCK_F entries: decode_inputs checks)
    T = _pick(blk, f, 0)
    B = _pick(blk, f, 1)
    W = _pick(blk, f, 2)
    S = _pick(blk, f, 3)
    swa = _pick(blk, f, 6)
    P = _pick(blk, f, 7)
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
        if o_pend + 2 * P <= BLOCK_F:  # the whole step is in blk
            tok = _pick(blk, f, o_ids + i)
            pos = _pick(blk, f, o_pos + i)
            slot = _pick(blk, f, o_slots + i)
            seq_len = _pick(blk, f, o_lens + i)
            # position i's index among the pending ones, plus 1 (0: not pending), then its row there
            j = tl.sum(tl.where((f >= o_pend) & (f < o_pend + P) & (blk == i), f - o_pend + 1, 0), axis=0)
            hit = tl.where(j > 0, _pick(blk, f, o_pend + P + j - 1) + 1, 0)
            _store_row(tokens_ptr, ids_ptr, pos_ptr, slots_ptr, seq_lens_ptr, i, tok, hit, pos, slot, seq_len)
            _store_table(tables_ptr + i64 * stride_t, blk, f, o_tables + i * W, W)
            if HAS_SWA:
                if swa != 0:
                    tl.store(swa_slots_ptr + i, _pick(blk, f, o_swa_slots + i))
                    _store_table(swa_tables_ptr + i64 * stride_st, blk, f, o_tables + (B + i) * W, W)
        else:
            tok = tl.load(flat_ptr + o_ids + i)
            p = tl.arange(0, BLOCK_P)
            at = tl.load(flat_ptr + o_pend + p, mask=p < P, other=-1)
            row = tl.load(flat_ptr + o_pend + P + p, mask=p < P, other=0)
            pos = tl.load(flat_ptr + o_pos + i)
            slot = tl.load(flat_ptr + o_slots + i)
            seq_len = tl.load(flat_ptr + o_lens + i)
            m0 = w < W
            table0 = tl.load(flat_ptr + o_tables + i * W + w, mask=m0)
            if HAS_SWA:
                on = (w * 0 + swa) != 0  # block-shaped: the interpreter rejects scalar bools in masks
                swa_slot = tl.load(flat_ptr + o_swa_slots + i + w, mask=on & (w == 0), other=0)
                swa0 = tl.load(flat_ptr + o_tables + (B + i) * W + w, mask=on & m0)
            hit = tl.sum(tl.where(at == i, row + 1, 0), axis=0)  # 1 + the pending row of position i, or 0
            _store_row(tokens_ptr, ids_ptr, pos_ptr, slots_ptr, seq_lens_ptr, i, tok, hit, pos, slot, seq_len)
            tl.store(tables_ptr + i64 * stride_t + w, table0.to(tl.int32), mask=m0)
            for c in range(BLOCK_W, W, BLOCK_W):  # tables wider than a block (contexts past BLOCK_W blocks)
                m = c + w < W
                tl.store(tables_ptr + i64 * stride_t + c + w,
                         tl.load(flat_ptr + o_tables + i * W + c + w, mask=m).to(tl.int32), mask=m)
            if HAS_SWA:
                if swa != 0:
                    tl.store(swa_slots_ptr + i + w, swa_slot, mask=w == 0)
                    tl.store(swa_tables_ptr + i64 * stride_st + w, swa0.to(tl.int32), mask=m0)
                    for c in range(BLOCK_W, W, BLOCK_W):
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
    sequences. tokens: int64, the step before's sampled tokens, which pending positions take. flat may
    be pinned host memory (the small buckets' graphs read their steps in place, across PCIe)."""
    rows = ids.shape[0]
    if flat.dtype != torch.int64 or tables.dtype != torch.int32 or tables.stride(1) != 1:
        raise ValueError("decode_inputs: flat int64 and int32 tables with contiguous rows")
    if flat.numel() < HEADER:
        raise ValueError(f"decode_inputs: flat holds {flat.numel()} entries, fewer than the header's {HEADER}")
    has_swa = swa_tables is not None
    _decode_inputs_kernel[(rows,)](
        flat, tokens, ids, pos, slots, seq_lens, tables, swa_slots if has_swa else slots,
        swa_tables if has_swa else tables, tables.stride(0), (swa_tables if has_swa else tables).stride(0),
        HAS_SWA=has_swa, HEADER=HEADER, BLOCK_W=BLOCK_W, BLOCK_P=BLOCK_P,
        BLOCK_F=min(BLOCK_F, 1 << (flat.numel().bit_length() - 1)), num_warps=1, **pdl.args())
