"""Paged attention: write K/V into the cache, attend over it. Triton on CUDA, the torch twin on CPU.

Cache layout per layer (the engine allocates it): k_cache / v_cache [num_blocks, block_size,
num_kv_heads, head_dim] in the model dtype or torch.float8_e4m3fn; an fp8 cache also carries
k_scale / v_scale float32 [num_blocks, block_size, num_kv_heads] (one scale per token and head,
amax / 448, set when the token is written). docs/kv_cache.md has the design and the measured errors.

`paged_attention` takes a prefill kernel (query tiles over variable-length sequences that may start
after a cached prefix: prefill and chunked prefill alike) when any sequence brings more than one
token, else a decode kernel that splits long contexts over several programs and merges them.
Nothing here syncs with the device: seq_lens etc. stay on it, max_* are host ints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import attention_triton as _k
from . import pdl
from .sm_count import sm_count
from .attention_torch import paged_attention_torch, rope_write_kv_torch, write_kv_torch

# the interpreter (TRITON_INTERPRET=1 before this module was imported) runs the kernels on CPU tensors
INTERPRETED = type(_k._decode_kernel).__name__ == "InterpretedFunction"
# batch-1 decode under PDL (a grid of at most one program an SM): the kernels after attention (the
# split combine, then the o GEMV) may launch before attention's wait, while the qkv GEMV still runs,
# so that o's weights already stream while attention works (o loads all of them before its own wait:
# gemv.GemvOptions.preload). H100, batch 1, with o's preload, 8 rounds alternated: 1.754 against
# 1.774 ms a token with o's preload alone, 1.786 neither
TRIGGER_EARLY = True
EARLY_DECODE = True  # small decode grids under PDL read the cache's keys before their wait (attention_triton)
FUSED_DECODE_KV = True  # rope_kv_attention: decode steps rotate and write K/V in the decode kernel


@dataclass(frozen=True)
class AttentionOptions:
    """Kernel tiles and launch options. The defaults (DEFAULT_OPTIONS for bf16/fp16 caches,
    DEFAULT_FP8_OPTIONS for fp8) come from sweeps on an H100: benchmarks/bench_attention.py --tune
    and --sweep-splits, numbers in docs/kv_cache.md."""
    prefill_block_m: int = 128
    prefill_block_n: int = 64
    prefill_num_warps: int = 8
    prefill_num_stages: int = 3
    decode_block_n: int = 128
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    decode_num_splits: int | None = None   # None: split until about programs_per_sm programs per SM
    decode_programs_per_sm: int = 4
    decode_min_split: int = 256            # fewest keys worth a split of their own
    decode_small_grid_num_warps: int = 8   # warps of a decode grid with no more programs than SMs (0: as
                                           # decode_num_warps); batch-1 decode of the 20b on H100, 8 vs 4:
                                           # 2.021 vs 2.059 ms a token, batch 64 (a full grid) 6.624 vs 6.559
    fp8_dot: str = "fp16"                  # fp8 caches: tl.dot operands in "fp16" or "bf16"


DEFAULT_OPTIONS = AttentionOptions()
# fp8 decode: one-warp programs of 64-key tiles, about 8 per SM (a program's softmax then needs no
# cross-warp reductions: 64 x 32k, H100, 916 us against 1,046 with the bf16 tiles); the prefill
# kernel converts K/V tiles in registers and does better with 4 warps
DEFAULT_FP8_OPTIONS = AttentionOptions(prefill_num_warps=4, prefill_num_stages=4, decode_block_n=64,
                                       decode_num_warps=1, decode_num_stages=3, decode_programs_per_sm=8,
                                       decode_small_grid_num_warps=0)


def _uses_triton(t: torch.Tensor) -> bool:
    # float32 on a GPU is for reference checks: the torch twin keeps it exact (Triton's fp32 dots
    # would run in tf32)
    return (t.is_cuda and t.dtype != torch.float32) or INTERPRETED


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> bool:
    """Validates the cache pair; returns whether it is fp8 (and then has its scales)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)}: expected the "
                         "same [num_blocks, block_size, num_kv_heads, head_dim] layout")
    if k_cache.dtype != v_cache.dtype or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need one dtype and a contiguous head_dim")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("an fp8 cache needs k_scale and v_scale; a bf16/fp16 cache takes neither")
    if fp8:
        want = tuple(k_cache.shape[:3])
        for s in (k_scale, v_scale):
            if tuple(s.shape) != want or s.dtype != torch.float32 or s.stride(-1) != 1:
                raise ValueError(f"fp8 scales must be float32 {want} with a contiguous last dim")
        if k_scale.stride() != v_scale.stride():
            raise ValueError("k_scale and v_scale need the same strides")
    d = k_cache.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    return fp8


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """k, v [T, Hkv, D] into the cache at slot_mapping [T] (block * block_size + offset; < 0 skips).

    fp8 caches: each token-head row gets the scale s = amax(|row|) / 448, stored in k_scale / v_scale,
    and codes = fp8(x / s), rounded to nearest even (bit-exact with write_kv_torch).
    """
    fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
    T, H, D = k.shape
    if v.shape != k.shape or tuple(k_cache.shape[2:]) != (H, D) or slot_mapping.shape != (T,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping {tuple(slot_mapping.shape)} "
                         f"do not fit the cache {tuple(k_cache.shape)}")
    if not _uses_triton(k):
        write_kv_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    _launch_write_kv(None, k, v, None, k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding on q [T, Hq, D] and k [T, Hkv, D] at positions [T] (cos / sin: fp32 tables
    [max_pos, D/2]), then write_kv of the rotated k and v: one kernel per step instead of ~20 small
    ones per layer. Returns the rotated q (a new tensor); the rotated k only lives in the cache."""
    fp8 = _check_rope_kv(q, k, v, positions, cos, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if not _uses_triton(k):
        return rope_write_kv_torch(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_write_kv(q, k, v, (q_out, positions, cos, sin), k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8)
    return q_out


def _check_rope_kv(q, k, v, positions, cos, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> bool:
    """rope_write_kv's arguments checked against the cache; returns whether it is fp8."""
    fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
    T, H, D = k.shape
    if (v.shape != k.shape or q.shape[0] != T or q.shape[2] != D or tuple(k_cache.shape[2:]) != (H, D)
            or slot_mapping.shape != (T,) or positions.shape != (T,) or cos.shape[1:] != (D // 2,)):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, positions "
                         f"{tuple(positions.shape)}, cos {tuple(cos.shape)} do not fit the cache {tuple(k_cache.shape)}")
    return fp8


def rope_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, max_query_len: int, max_seq_len: int, sinks: torch.Tensor,
                      sm_scale: float, window: int | None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None, options: AttentionOptions | None = None) -> torch.Tensor:
    """rope_write_kv, then paged_attention of the rotated q: the same results. A decode step (one
    token per sequence) on the GPU does both in the decode kernel, which rotates q and writes each
    token's K/V itself: one kernel a layer less (FUSED_DECODE_KV)."""
    if max_query_len > 1 or not FUSED_DECODE_KV or not _uses_triton(q):
        q = rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len,
                               max_seq_len, sinks, sm_scale, window, k_scale, v_scale, options)
    _check_rope_kv(q, k, v, positions, cos, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous head_dim")
    return paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len,
                           max_seq_len, sinks, sm_scale, window, k_scale, v_scale, options,
                           _new_kv=(k, v, positions, cos, sin, slot_mapping))


def _launch_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8: bool) -> None:
    T, H, D = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or (q is not None and q.stride(-1) != 1):
        raise ValueError("q, k and v need a contiguous head_dim")
    ks = k_scale if fp8 else k_cache  # placeholders; FP8=False never touches them
    vs = v_scale if fp8 else v_cache
    ss = k_scale.stride() if fp8 else (0, 0, 0)
    if rope is None:  # placeholders again: ROPE=False never reads q, positions or the tables
        q, (q_out, pos, cos, sin) = k, (k, slot_mapping, k, k)
    else:
        q_out, pos, cos, sin = rope
    _k._write_kv_kernel[(T,)](
        q, k, v, q_out, pos, cos, sin, k_cache, v_cache, ks, vs, slot_mapping,
        q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), ss[0], ss[1],
        k_cache.shape[1],
        HQ=q.shape[1], H=H, D=D, BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_H=triton.next_power_of_2(H),
        ROPE=rope is not None, FP8=fp8, num_warps=1 if rope is None else 4, **pdl.args())


def _num_splits(batch: int, num_kv_heads: int, span: int, device: torch.device, opts: AttentionOptions) -> int:
    """Splits of the context per (sequence, KV head): about programs_per_sm programs per SM (never
    rounding up past it: a second partial wave costs more than it brings), each >= min_split keys."""
    if opts.decode_num_splits is not None:
        return max(1, opts.decode_num_splits)
    want = opts.decode_programs_per_sm * sm_count(device) // (batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(span, opts.decode_min_split)))


def _decode_warps(programs: int, device: torch.device, opts: AttentionOptions) -> int:
    """A grid that leaves SMs idle (batch-1 decode: 8 programs on the sliding layers, 32 on the full
    ones) runs faster on more warps a program; a full one on opts.decode_num_warps."""
    if opts.decode_small_grid_num_warps and programs <= sm_count(device):
        return opts.decode_small_grid_num_warps
    return opts.decode_num_warps


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    max_query_len: int, max_seq_len: int, sinks: torch.Tensor, sm_scale: float,
                    window: int | None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None,
                    options: AttentionOptions | None = None, _new_kv: tuple | None = None) -> torch.Tensor:
    """q [T, Hq, D], the new tokens of B sequences packed -> out [T, Hq, D] in q's dtype.

    block_tables int32 [B, max_blocks]; query_start_loc int32 [B + 1]; seq_lens int32 [B] (cached +
    new); each sequence's new tokens are its last positions. Causal; `window` (None or <= 0: off)
    keeps the last `window` keys, the query's own included; sinks [Hq] join the softmax denominator.
    max_query_len / max_seq_len bound query_lens / seq_lens (host ints: no device sync here).
    """
    fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
    T, Hq, D = q.shape
    NB, BS, Hkv, Dc = k_cache.shape
    B = seq_lens.shape[0]
    if Dc != D or Hq % Hkv or sinks.shape != (Hq,) or query_start_loc.shape != (B + 1,):
        raise ValueError(f"q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, sinks {tuple(sinks.shape)}, "
                         f"query_start_loc {tuple(query_start_loc.shape)} for {B} sequences do not fit")
    window = int(window) if window is not None and window > 0 else 0
    if not _uses_triton(q):
        qsl = query_start_loc.tolist()
        return paged_attention_torch(q, k_cache, v_cache, block_tables, [b - a for a, b in zip(qsl, qsl[1:])],
                                     seq_lens.tolist(), sinks, sm_scale, window or None, k_scale, v_scale)
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q and block_tables need a contiguous last dim")
    opts = options or (DEFAULT_FP8_OPTIONS if fp8 else DEFAULT_OPTIONS)
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    group = Hq // Hkv
    ks = k_scale if fp8 else k_cache  # placeholders when FP8=False
    vs = v_scale if fp8 else v_cache
    ss = k_scale.stride() if fp8 else (0, 0, 0)
    qk_scale = float(sm_scale) * _k.LOG2E
    if opts.fp8_dot not in ("fp16", "bf16"):
        raise ValueError(f"fp8_dot={opts.fp8_dot!r}: expected 'fp16' or 'bf16'")
    if fp8 and opts.fp8_dot == "fp16":
        dot = _k.DOT_F16
    elif INTERPRETED and q.dtype == torch.bfloat16:
        dot = _k.DOT_F32  # the interpreter's tl.dot on bf16 returns garbage (fp16 and fp32 are right)
    else:
        dot = _k.DOT_Q
    cache_args = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), ss[0], ss[1])
    if max_query_len > 1:
        bm = opts.prefill_block_m
        num_m = triton.cdiv(max_query_len, bm)
        _k._prefill_kernel[(Hq, num_m, B)](
            q, k_cache, v_cache, ks, vs, block_tables, query_start_loc, seq_lens, sinks, out,
            qk_scale, window,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            *cache_args, num_m,
            BLOCK_SIZE=BS, GROUP=group, D=D, BLOCK_M=bm, BLOCK_N=opts.prefill_block_n, FP8=fp8,
            USE_WINDOW=window > 0, DOT=dot,
            num_warps=opts.prefill_num_warps, num_stages=opts.prefill_num_stages)
        return out
    span = min(max_seq_len, window) if window else max_seq_len
    splits = _num_splits(B, Hkv, span, q.device, opts)
    if splits > 1:
        part_m = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    # rope_kv_attention: the unrotated k, v and what rotates them (else placeholders, never read)
    k, v, pos, cos, sin, slots = _new_kv if _new_kv is not None else (q, q, seq_lens, q, q, seq_lens)
    # reading keys before the PDL wait pays where the grid leaves SMs idle (batch 1: 1.904 vs 1.928 ms a
    # token, H100); on a full grid (64 x 32k) its per-tile work cost 9% (2,033 vs 2,229 tok/s)
    small = Hkv * B * splits <= sm_count(q.device)  # a grid that leaves SMs idle (batch-1 decode)
    early = (EARLY_DECODE and _new_kv is not None and pdl.args()["PDL"] and not fp8 and k_cache.dtype == k.dtype
             and small)
    # the early launch only where it was measured and pays: one sequence, whose o projection is the GEMV
    # that preloads its weights (larger batches' is cuBLAS's, launched without PDL)
    trigger = TRIGGER_EARLY and small and B == 1
    _k._decode_kernel[(Hkv, B, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, query_start_loc, seq_lens, sinks, out,
        part_m, part_l, part_acc, qk_scale, window, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *cache_args, k, v, pos, cos, sin, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_SIZE=BS, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=D,
        BLOCK_N=opts.decode_block_n,
        FP8=fp8, USE_WINDOW=window > 0, SPLIT=splits > 1, DOT=dot, ROPE_KV=_new_kv is not None,
        EARLY=early, TRIGGER=trigger,
        num_warps=_decode_warps(Hkv * B * splits, q.device, opts), num_stages=opts.decode_num_stages,
        **pdl.args())
    if splits > 1:
        _k._decode_combine_kernel[(B, Hq)](
            part_m, part_l, part_acc, query_start_loc, sinks, out, splits, out.stride(0), out.stride(1),
            D=D, BLOCK_S=triton.next_power_of_2(splits), TRIGGER=trigger, num_warps=2, **pdl.args())
    return out
