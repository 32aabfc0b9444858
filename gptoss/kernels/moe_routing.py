"""MoE routing on the GPU: top-k experts per token, softmax over the k, and the token rows grouped
per local expert, all without a host sync.

    routing = moe_routing(router_logits, top_k, expert_start, num_local_experts, opts)

The grouped GEMMs read `routing`:
  topk_ids [T, k] int32 (global expert ids), topk_weights [T, k] float32;
  sorted_assign [T*k] int32: assignment index a = token * k + slot at each row of the grouped order
      (rows of expert e are expert_offsets[e] .. expert_offsets[e+1]-1, in token order);
  assign_pos [T*k] int32: the grouped row of each assignment, -1 where its expert is not local;
  expert_offsets [E_local + 1] int32;
  tile_expert / tile_row [max_tiles] int32: GEMM row tile t covers rows tile_row[t] ..
      + block_m - 1 of expert tile_expert[t] (-1: no tile; the GEMM program returns at once).
max_tiles = cdiv(T*k, block_m) + min(E_local, T*k) bounds the tiles for every routing, so the
GEMM grid is known on the host.

One token (batch-1 decode) can skip the routing kernel: `inline_routing` launches nothing, and
moe_gate_up takes the token's top-k from the logits itself (its M tile j is the token's j-th expert,
with the one row j) and writes topk_ids / topk_weights for moe_down.

Ties among logits go to the lower expert index (torch.topk leaves them unspecified).
One token block (T <= block_t) runs as one fused program; more run three kernels: top-k with a
histogram per token block, one program for the offsets and the tile map, then the scatter.
`moe_routing_torch` is the plain-torch twin with the same signature and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import pdl_enter
from .router_partials import RouterPartials


@dataclass(frozen=True)
class RoutingOptions:
    block_m: int = 16      # GEMM row tile the tile map is built for
    block_t: int = 0       # tokens per routing program; 0 picks so a program holds <= 16K one-hot cells
    num_warps: int = 4


@dataclass
class Routing:
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    sorted_assign: torch.Tensor
    assign_pos: torch.Tensor
    expert_offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_row: torch.Tensor
    num_tokens: int
    top_k: int
    block_m: int
    # inline_routing: the logits the GEMMs route by, and the local experts' range
    logits: torch.Tensor | None = None
    expert_start: int = 0
    num_local_experts: int = 0
    # partial_routing (moe_token's kernels only): the router's sums they finish into logits
    partials: RouterPartials | None = None

    @property
    def num_experts(self) -> int:
        """The router's width (one-token routing: by logits or partial sums)."""
        return self.partials.num_experts if self.partials is not None else self.logits.shape[1]

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()


def max_tiles(num_tokens: int, top_k: int, num_local_experts: int, block_m: int) -> int:
    a = num_tokens * top_k
    return triton.cdiv(a, block_m) + min(num_local_experts, a)


def _block_t(opts: RoutingOptions, k_pad: int, el_pad: int) -> int:
    if opts.block_t:
        return opts.block_t
    bt = 64
    while bt > 1 and bt * k_pad * el_pad > 16384:
        bt //= 2
    return bt


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _topk_softmax(logits_ptr, stride_t, T, E, t0,
                  BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr):
    """ids [BLOCK_T, K_PAD] int32 and weights [BLOCK_T, K_PAD] fp32 of tokens t0.. (pad columns: junk)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    mask = (offs_t[:, None] < T) & (offs_e[None, :] < E)
    lg = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :], mask=mask,
                 other=float("-inf")).to(tl.float32)
    kcol = tl.arange(0, K_PAD)[None, :]
    vals = tl.full((BLOCK_T, K_PAD), float("-inf"), tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    for j in tl.static_range(TOP_K):
        m = tl.max(lg, axis=1)
        idx = tl.min(tl.where(lg == m[:, None], offs_e[None, :], E_PAD), axis=1)  # lowest index wins ties
        vals = tl.where(kcol == j, m[:, None], vals)
        ids = tl.where(kcol == j, idx[:, None], ids)
        lg = tl.where(offs_e[None, :] == idx[:, None], float("-inf"), lg)
    return ids, _topk_weights(vals, TOP_K, K_PAD)


@triton.jit
def _topk_weights(vals, TOP_K: tl.constexpr, K_PAD: tl.constexpr):
    """The routing weights: softmax over each row's k chosen logits vals [rows, K_PAD] (columns past
    TOP_K: junk, weight 0)."""
    kcol = tl.arange(0, K_PAD)[None, :]
    first = tl.max(vals, axis=1)
    first = tl.where(first > float("-inf"), first, 0.0)  # padding rows: no -inf - -inf
    p = tl.where(kcol < TOP_K, tl.exp(vals - first[:, None]), 0.0)
    return p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]


@triton.jit
def _store_topk(ids, w, ids_ptr, w_ptr, T, t0, BLOCK_T: tl.constexpr, TOP_K: tl.constexpr,
                K_PAD: tl.constexpr):
    offs_t = t0 + tl.arange(0, BLOCK_T)
    kcol = tl.arange(0, K_PAD)
    off = offs_t[:, None] * TOP_K + kcol[None, :]
    mask = (offs_t[:, None] < T) & (kcol[None, :] < TOP_K)
    tl.store(ids_ptr + off, ids, mask=mask)
    tl.store(w_ptr + off, w, mask=mask)


@triton.jit
def _onehot(ids, T, t0, expert_start, E_LOCAL, BLOCK_T: tl.constexpr, TOP_K: tl.constexpr,
            K_PAD: tl.constexpr, EL_PAD: tl.constexpr):
    """Flattened assignments of a token block: assign index [A], local expert [A] (-1: another rank's or
    padding), one-hot [A, EL_PAD], valid [A] (a real token and slot)."""
    A: tl.constexpr = BLOCK_T * K_PAD
    offs_t = t0 + tl.arange(0, BLOCK_T)
    kcol = tl.arange(0, K_PAD)
    valid = (offs_t[:, None] < T) & (kcol[None, :] < TOP_K)
    assign = tl.reshape(offs_t[:, None] * TOP_K + kcol[None, :], (A,))
    loc = tl.reshape(tl.where(valid, ids - expert_start, -1), (A,))
    loc = tl.where((loc >= 0) & (loc < E_LOCAL), loc, -1)
    oh = tl.where(loc[:, None] == tl.arange(0, EL_PAD)[None, :], 1, 0)
    return assign, loc, oh, tl.reshape(valid, (A,))


@triton.jit
def _scatter(assign, loc, oh, valid, base, sorted_ptr, pos_ptr):
    """Writes the grouped row of each assignment; `base` [A] is where its expert's rows start for this block."""
    rank = tl.sum((tl.cumsum(oh, axis=0) - oh) * oh, axis=1)  # earlier assignments to the same expert
    local = loc >= 0
    pos = base + rank
    tl.store(sorted_ptr + pos, assign, mask=local)
    tl.store(pos_ptr + assign, tl.where(local, pos, -1), mask=valid)


@triton.jit
def _tile_map(counts, starts, tile_expert_ptr, tile_row_ptr, n_tiles_max,
              BLOCK_M: tl.constexpr, EL_PAD: tl.constexpr, TILE_CHUNK: tl.constexpr):
    ntiles = (counts + BLOCK_M - 1) // BLOCK_M
    tend = tl.cumsum(ntiles, axis=0)
    tstart = tend - ntiles
    total = tl.sum(ntiles, axis=0)
    col = tl.arange(0, EL_PAD)
    for t0 in range(0, n_tiles_max, TILE_CHUNK):
        t = t0 + tl.arange(0, TILE_CHUNK)
        e = tl.sum(tl.where(tend[None, :] <= t[:, None], 1, 0), axis=1)  # expert whose tiles hold t
        sel = col[None, :] == e[:, None]
        row = tl.sum(tl.where(sel, starts[None, :] + (t[:, None] - tstart[None, :]) * BLOCK_M, 0), axis=1)
        valid = t < total
        tl.store(tile_expert_ptr + t, tl.where(valid, e, -1), mask=t < n_tiles_max)
        tl.store(tile_row_ptr + t, tl.where(valid, row, 0), mask=t < n_tiles_max)


@triton.jit
def _store_offsets(counts, starts, offsets_ptr, E_LOCAL, EL_PAD: tl.constexpr):
    col = tl.arange(0, EL_PAD)
    tl.store(offsets_ptr + col, starts, mask=col < E_LOCAL)
    tl.store(offsets_ptr + E_LOCAL, tl.sum(counts, axis=0))


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _routing_fused_kernel(logits_ptr, stride_t, ids_ptr, w_ptr, sorted_ptr, pos_ptr, offsets_ptr,
                          tile_expert_ptr, tile_row_ptr, T, E, expert_start, E_LOCAL, n_tiles_max,
                          BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
                          K_PAD: tl.constexpr, EL_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          TILE_CHUNK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    # all tokens in one program: top-k, counts, offsets, scatter and tile map in one launch
    ids, w = _topk_softmax(logits_ptr, stride_t, T, E, 0, BLOCK_T, E_PAD, TOP_K, K_PAD)
    _store_topk(ids, w, ids_ptr, w_ptr, T, 0, BLOCK_T, TOP_K, K_PAD)
    assign, loc, oh, valid = _onehot(ids, T, 0, expert_start, E_LOCAL, BLOCK_T, TOP_K, K_PAD, EL_PAD)
    counts = tl.sum(oh, axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    base = tl.sum(oh * starts[None, :], axis=1)
    _scatter(assign, loc, oh, valid, base, sorted_ptr, pos_ptr)
    _store_offsets(counts, starts, offsets_ptr, E_LOCAL, EL_PAD)
    _tile_map(counts, starts, tile_expert_ptr, tile_row_ptr, n_tiles_max, BLOCK_M, EL_PAD, TILE_CHUNK)


@triton.jit
def _routing_topk_kernel(logits_ptr, stride_t, ids_ptr, w_ptr, hist_ptr, T, E, expert_start, E_LOCAL,
                         BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
                         K_PAD: tl.constexpr, EL_PAD: tl.constexpr):
    pid = tl.program_id(0)
    t0 = pid * BLOCK_T
    ids, w = _topk_softmax(logits_ptr, stride_t, T, E, t0, BLOCK_T, E_PAD, TOP_K, K_PAD)
    _store_topk(ids, w, ids_ptr, w_ptr, T, t0, BLOCK_T, TOP_K, K_PAD)
    _, _, oh, _ = _onehot(ids, T, t0, expert_start, E_LOCAL, BLOCK_T, TOP_K, K_PAD, EL_PAD)
    col = tl.arange(0, EL_PAD)
    tl.store(hist_ptr + pid * E_LOCAL + col, tl.sum(oh, axis=0), mask=col < E_LOCAL)


@triton.jit
def _routing_offsets_kernel(hist_ptr, block_base_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                            n_blocks, E_LOCAL, n_tiles_max, EL_PAD: tl.constexpr, NB_CHUNK: tl.constexpr,
                            BLOCK_M: tl.constexpr, TILE_CHUNK: tl.constexpr):
    col = tl.arange(0, EL_PAD)
    counts = tl.zeros((EL_PAD,), tl.int32)
    for b0 in range(0, n_blocks, NB_CHUNK):
        b = b0 + tl.arange(0, NB_CHUNK)
        m = (b[:, None] < n_blocks) & (col[None, :] < E_LOCAL)
        counts += tl.sum(tl.load(hist_ptr + b[:, None] * E_LOCAL + col[None, :], mask=m, other=0), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    running = starts
    for b0 in range(0, n_blocks, NB_CHUNK):
        b = b0 + tl.arange(0, NB_CHUNK)
        m = (b[:, None] < n_blocks) & (col[None, :] < E_LOCAL)
        h = tl.load(hist_ptr + b[:, None] * E_LOCAL + col[None, :], mask=m, other=0)
        tl.store(block_base_ptr + b[:, None] * E_LOCAL + col[None, :],
                 running[None, :] + tl.cumsum(h, axis=0) - h, mask=m)
        running += tl.sum(h, axis=0)
    _store_offsets(counts, starts, offsets_ptr, E_LOCAL, EL_PAD)
    _tile_map(counts, starts, tile_expert_ptr, tile_row_ptr, n_tiles_max, BLOCK_M, EL_PAD, TILE_CHUNK)


@triton.jit
def _routing_scatter_kernel(ids_ptr, block_base_ptr, sorted_ptr, pos_ptr, T, expert_start, E_LOCAL,
                            BLOCK_T: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                            EL_PAD: tl.constexpr):
    pid = tl.program_id(0)
    t0 = pid * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    kcol = tl.arange(0, K_PAD)
    mask = (offs_t[:, None] < T) & (kcol[None, :] < TOP_K)
    ids = tl.load(ids_ptr + offs_t[:, None] * TOP_K + kcol[None, :], mask=mask, other=0)
    assign, loc, oh, valid = _onehot(ids, T, t0, expert_start, E_LOCAL, BLOCK_T, TOP_K, K_PAD, EL_PAD)
    base = tl.load(block_base_ptr + pid * E_LOCAL + loc, mask=loc >= 0, other=0)
    _scatter(assign, loc, oh, valid, base, sorted_ptr, pos_ptr)


# ----------------------------------------------------------------------------- wrappers


def _alloc(router_logits: torch.Tensor, top_k: int, num_local_experts: int, block_m: int):
    T, dev = router_logits.shape[0], router_logits.device
    a = T * top_k
    nt = max_tiles(T, top_k, num_local_experts, block_m)
    return (torch.empty(T, top_k, dtype=torch.int32, device=dev),
            torch.empty(T, top_k, dtype=torch.float32, device=dev),
            torch.empty(a, dtype=torch.int32, device=dev),
            torch.empty(a, dtype=torch.int32, device=dev),
            torch.empty(num_local_experts + 1, dtype=torch.int32, device=dev),
            torch.empty(nt, dtype=torch.int32, device=dev),
            torch.empty(nt, dtype=torch.int32, device=dev))


def _check(router_logits, top_k, expert_start, num_local_experts, opts):
    if router_logits.dim() != 2 or router_logits.stride(-1) != 1:
        raise ValueError(f"router_logits must be [tokens, experts] with contiguous rows, got "
                         f"{tuple(router_logits.shape)} strides {router_logits.stride()}")
    _check_experts(router_logits.shape[1], top_k, expert_start, num_local_experts, opts)


def _check_experts(E, top_k, expert_start, num_local_experts, opts):
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={E}]")
    if not (0 <= expert_start and num_local_experts >= 1 and expert_start + num_local_experts <= E):
        raise ValueError(f"local experts [{expert_start}, {expert_start + num_local_experts}) are not "
                         f"within the {E} experts")
    if opts.block_m < 1 or opts.block_m & (opts.block_m - 1):
        raise ValueError(f"block_m={opts.block_m} must be a power of two (>= 16 for the MMA GEMMs)")


def moe_routing(router_logits: torch.Tensor, top_k: int, expert_start: int, num_local_experts: int,
                opts: RoutingOptions = RoutingOptions()) -> Routing:
    """router_logits [T, E] (any float dtype) -> Routing for the experts expert_start.. (+ num_local)."""
    _check(router_logits, top_k, expert_start, num_local_experts, opts)
    T, E = router_logits.shape
    ids, w, sorted_assign, assign_pos, offsets, tile_expert, tile_row = _alloc(
        router_logits, top_k, num_local_experts, opts.block_m)
    n_tiles = tile_expert.numel()
    e_pad = triton.next_power_of_2(E)
    k_pad = triton.next_power_of_2(top_k)
    el_pad = max(triton.next_power_of_2(num_local_experts), 2)
    tile_chunk = max(16, min(64, triton.next_power_of_2(n_tiles)))
    bt = _block_t(opts, k_pad, el_pad)
    if T == 0:
        offsets.zero_()
        tile_expert.fill_(-1)
        return Routing(ids, w, sorted_assign, assign_pos, offsets, tile_expert, tile_row, 0, top_k, opts.block_m)
    if T <= bt:
        bt = max(triton.next_power_of_2(T), 2)
        _routing_fused_kernel[(1,)](
            router_logits, router_logits.stride(0), ids, w, sorted_assign, assign_pos, offsets,
            tile_expert, tile_row, T, E, expert_start, num_local_experts, n_tiles,
            BLOCK_T=bt, E_PAD=e_pad, TOP_K=top_k, K_PAD=k_pad, EL_PAD=el_pad, BLOCK_M=opts.block_m,
            TILE_CHUNK=tile_chunk, num_warps=opts.num_warps, **pdl.args())
    else:
        n_blocks = triton.cdiv(T, bt)
        hist = torch.empty(n_blocks, num_local_experts, dtype=torch.int32, device=router_logits.device)
        block_base = torch.empty_like(hist)
        _routing_topk_kernel[(n_blocks,)](
            router_logits, router_logits.stride(0), ids, w, hist, T, E, expert_start, num_local_experts,
            BLOCK_T=bt, E_PAD=e_pad, TOP_K=top_k, K_PAD=k_pad, EL_PAD=el_pad, num_warps=opts.num_warps)
        nb_chunk = max(2, min(triton.next_power_of_2(n_blocks), max(2, 8192 // el_pad)))
        _routing_offsets_kernel[(1,)](
            hist, block_base, offsets, tile_expert, tile_row, n_blocks, num_local_experts, n_tiles,
            EL_PAD=el_pad, NB_CHUNK=nb_chunk, BLOCK_M=opts.block_m, TILE_CHUNK=tile_chunk,
            num_warps=opts.num_warps)
        _routing_scatter_kernel[(n_blocks,)](
            ids, block_base, sorted_assign, assign_pos, T, expert_start, num_local_experts,
            BLOCK_T=bt, TOP_K=top_k, K_PAD=k_pad, EL_PAD=el_pad, num_warps=opts.num_warps)
    return Routing(ids, w, sorted_assign, assign_pos, offsets, tile_expert, tile_row, T, top_k, opts.block_m)


_ARANGE: dict[tuple[torch.device, int], torch.Tensor] = {}


def inline_routing(router_logits: torch.Tensor, top_k: int, expert_start: int, num_local_experts: int,
                   opts: RoutingOptions = RoutingOptions()) -> Routing:
    """One token's Routing with nothing computed yet (no kernel, no host sync): moe_gate_up routes by
    `logits` and fills topk_ids / topk_weights, which moe_down (and moe_combine) then read. Tile j
    is the token's j-th expert with its one row j, so sorted_assign and assign_pos are 0..k-1 (the
    rows of another rank's experts are skipped, not marked -1). On H100 this saves the routing
    kernel's 2-3 us a layer in batch-1 decode."""
    _check(router_logits, top_k, expert_start, num_local_experts, opts)
    if router_logits.shape[0] != 1:
        raise ValueError(f"inline_routing takes one token, got {router_logits.shape[0]}")
    return _one_token(router_logits.device, top_k, expert_start, num_local_experts, opts, logits=router_logits)


def partial_routing(partials: RouterPartials, top_k: int, expert_start: int, num_local_experts: int,
                    opts: RoutingOptions = RoutingOptions()) -> Routing:
    """inline_routing's Routing for a router folded into the o projection (gptoss.kernels.router_partials):
    moe_token's gate_up and down finish the partial sums into the logits themselves."""
    _check_experts(partials.num_experts, top_k, expert_start, num_local_experts, opts)
    return _one_token(partials.sums.device, top_k, expert_start, num_local_experts, opts, partials=partials)


def _one_token(dev, top_k, expert_start, num_local_experts, opts, logits=None, partials=None) -> Routing:
    key = (dev, top_k)
    if key not in _ARANGE:  # a constant kept per device, so that captured decode graphs launch nothing for it
        _ARANGE[key] = torch.arange(top_k, dtype=torch.int32, device=dev)
    ar = _ARANGE[key]
    ids = torch.empty(1, top_k, dtype=torch.int32, device=dev)
    w = torch.empty(1, top_k, dtype=torch.float32, device=dev)
    # expert_offsets and tile_row are not read in this mode; tile_expert's length gives the k M tiles
    return Routing(ids, w, ar, ar, ar, ar, ar, 1, top_k, opts.block_m, logits, expert_start, num_local_experts,
                   partials)


def moe_routing_torch(router_logits: torch.Tensor, top_k: int, expert_start: int, num_local_experts: int,
                      opts: RoutingOptions = RoutingOptions()) -> Routing:
    """The twin of moe_routing in plain torch (syncs with the device; a reference, not a fast path)."""
    _check(router_logits, top_k, expert_start, num_local_experts, opts)
    T, E = router_logits.shape
    dev = router_logits.device
    ids, w, sorted_assign, assign_pos, offsets, tile_expert, tile_row = _alloc(
        router_logits, top_k, num_local_experts, opts.block_m)
    lg = router_logits.float()
    # top-k with ties to the lower index: sort by (value desc, index asc), which a stable sort gives
    order = torch.sort(lg, dim=-1, descending=True, stable=True).indices[:, :top_k]
    vals = torch.gather(lg, 1, order)
    ids.copy_(order.to(torch.int32))
    w.copy_(torch.softmax(vals, dim=-1))
    loc = (ids.long() - expert_start).flatten()
    local = (loc >= 0) & (loc < num_local_experts)
    key = torch.where(local, loc, torch.full_like(loc, num_local_experts))
    perm = torch.sort(key, stable=True).indices
    counts = torch.bincount(loc[local], minlength=num_local_experts)
    n_local = int(counts.sum())
    sorted_assign.fill_(-1)
    sorted_assign[:n_local] = perm[:n_local].to(torch.int32)
    assign_pos.fill_(-1)
    assign_pos[perm[:n_local]] = torch.arange(n_local, dtype=torch.int32, device=dev)
    offsets.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32))
    tile_expert.fill_(-1)
    tile_row.zero_()
    t = 0
    for e, c in enumerate(counts.tolist()):
        for r in range(0, c, opts.block_m):
            tile_expert[t] = e
            tile_row[t] = int(offsets[e]) + r
            t += 1
    return Routing(ids, w, sorted_assign, assign_pos, offsets, tile_expert, tile_row, T, top_k, opts.block_m)
