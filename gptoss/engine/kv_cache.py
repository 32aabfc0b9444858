"""The paged KV cache: a pool of fixed-size blocks, and the tensors that hold them.

Block 0 is a reserved null block: unused block-table entries point at it, so a kernel that reads a
padded table never touches memory outside the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .request import Request

FP8 = torch.float8_e4m3fn


@dataclass(slots=True)
class LayerKVCache:
    k: torch.Tensor                     # [num_blocks, block_size, Hkv, D]
    v: torch.Tensor
    k_scale: torch.Tensor | None = None  # fp8 only: [num_blocks, block_size, Hkv] fp32
    v_scale: torch.Tensor | None = None


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, fp8: bool, dtype_bytes: int) -> int:
    per_head = head_dim * (1 if fp8 else dtype_bytes) + (4 if fp8 else 0)  # fp8 adds one fp32 scale
    return 2 * num_layers * num_kv_heads * per_head


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How a KV budget splits between the full-attention group and the sliding-window group."""
    num_blocks: int          # full-attention layers' pool (with the null block)
    num_swa_blocks: int      # sliding layers' pool (0: no separate group)
    window: int | None       # the sliding window, when the sliding layers have their own group
    max_chunk: int           # most tokens one request may compute in a step (fits the sliding pool)


def plan_kv_layout(budget: int, is_sliding: list[bool], window: int, num_kv_heads: int, head_dim: int,
                   fp8: bool, dtype_bytes: int, block_size: int, max_num_seqs: int,
                   max_num_batched_tokens: int) -> KVLayout:
    """Split `budget` bytes: the sliding group gets what its windows can use (each running request
    holds at most window + one step's tokens), or its proportional share if that is smaller; the
    full-attention group takes the rest."""
    n_swa = sum(is_sliding)
    n_full = len(is_sliding) - n_swa
    layer_block = kv_bytes_per_token(1, num_kv_heads, head_dim, fp8, dtype_bytes) * block_size
    too_small = (f"the KV cache budget of {budget} bytes is too small for this model "
                 f"({layer_block * len(is_sliding)} bytes per {block_size}-token block); raise "
                 f"gpu_memory_utilization or kv_cache_memory_bytes")
    if n_swa == 0 or n_full == 0:  # one group: every layer keeps every block
        n = budget // (layer_block * len(is_sliding))
        if n < 1:
            raise ValueError(too_small)
        return KVLayout(int(n) + 1, 0, None, max_num_batched_tokens)
    per_seq = -(-(window - 1) // block_size) + 2
    want = max_num_seqs * per_seq + -(-max_num_batched_tokens // block_size)
    share = budget * n_swa // len(is_sliding) // (layer_block * n_swa)
    swa = min(want, share)
    full = (budget - swa * layer_block * n_swa) // (layer_block * n_full)
    # a request's step must fit the sliding pool: cap the chunk at what `swa` blocks can hold
    max_chunk = min(max_num_batched_tokens, (swa - 2) * block_size - (window - 1))
    if full < 1 or max_chunk < 1:
        raise ValueError(too_small)
    return KVLayout(int(full) + 1, int(swa) + 1, window, int(max_chunk))


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of a non-fp8 cache: "bfloat16" asks for bf16 whatever the model's dtype
    (half the memory of a float32 model's cache); "auto" follows the model."""
    return torch.bfloat16 if kv_cache_dtype == "bfloat16" else model_dtype


def allocate_kv_caches(layout: KVLayout, is_sliding: list[bool], block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, fp8: bool, device) -> list[LayerKVCache]:
    caches = []
    for sliding in is_sliding:
        n = layout.num_swa_blocks if sliding and layout.window else layout.num_blocks
        shape = (n, block_size, num_kv_heads, head_dim)
        if fp8:
            # scales start at 1 so the (zeroed) null block dequantizes to zeros
            caches.append(LayerKVCache(
                torch.zeros(shape, dtype=FP8, device=device), torch.zeros(shape, dtype=FP8, device=device),
                torch.ones(shape[:3], dtype=torch.float32, device=device),
                torch.ones(shape[:3], dtype=torch.float32, device=device)))
        else:
            caches.append(LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                                       torch.zeros(shape, dtype=dtype, device=device)))
    return caches


class BlockPool:
    """A pool of KV blocks: hands them out, counts references, and keeps freed blocks' contents
    findable by their prefix hash until the block is reused (least recently freed first)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks   # (hash, tokens) of a cached block
        self.cached: dict[int, int] = {}                            # hash -> block id
        # the front is the least recently freed block (0 is the null block). An OrderedDict: taking from
        # a plain dict's front scans the slots its earlier deletions left (quadratic: a 64 x 32k
        # allocation took 36 s once the pool had been through a few such runs)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            key = self.block_key[bid]
            if key is not None:  # evict its cached contents
                del self.cached[key[0]]
                self.block_key[bid] = None
            self.ref_cnt[bid] = 1
            out.append(bid)
        return out

    def release(self, bids) -> None:
        # callers pass a request's blocks tail first, so its later (less shared) blocks go first
        for bid in bids:
            if bid == 0:
                continue
            self.ref_cnt[bid] -= 1
            if self.ref_cnt[bid] == 0:
                self._free[bid] = None

    def lookup(self, key: tuple[int, tuple]) -> int | None:
        bid = self.cached.get(key[0])
        return bid if bid is not None and self.block_key[bid][1] == key[1] else None  # guard collisions

    def share(self, bid: int) -> None:
        if self.ref_cnt[bid] == 0:
            del self._free[bid]
        self.ref_cnt[bid] += 1

    def register(self, bid: int, key: tuple[int, tuple]) -> None:
        if bid and self.block_key[bid] is None and key[0] not in self.cached:
            self.block_key[bid] = key
            self.cached[key[0]] = bid


class KVCacheManager:
    """The blocks of every request, in two groups: full-attention layers keep every block, while the
    sliding-window layers give back each block once it falls out of the window of every query still to
    come, so their memory does not grow with the context.

    Prefix caching: a full block is named by a hash of its tokens and of every token before it, so two
    requests that start alike share the blocks they have in common. A cached prefix counts only as far
    as the sliding group still holds the window before its end.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, num_swa_blocks: int = 0):
        if num_blocks < 2 or (window and num_swa_blocks < 2):
            raise ValueError(f"the KV cache needs at least 2 blocks per group, got {num_blocks} and "
                             f"{num_swa_blocks}: give it more memory")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.full = BlockPool(num_blocks)
        self.window = window
        self.swa = BlockPool(num_swa_blocks) if window else None
        self.num_cache_hits = 0      # prompt tokens served from the cache, over the pool's life
        self.num_cache_queries = 0   # prompt tokens looked up

    # --- capacity ------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.full.num_usable_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.full.num_free_blocks / self.full.num_usable_blocks

    @property
    def all_free(self) -> bool:
        pools = [self.full] + ([self.swa] if self.swa else [])
        return all(p.num_free_blocks == p.num_usable_blocks and not any(p.ref_cnt) for p in pools)

    def _swa_blocks_needed(self, tokens: int) -> int:
        """Most sliding-group blocks one request holds while computing `tokens` tokens in one step."""
        return -(-(self.window - 1 + tokens) // self.block_size) + 1

    # --- per request ---------------------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req's tables to hold num_new_tokens more tokens; False if either group is short."""
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        need = total - len(req.block_ids)
        need_swa = total - len(req.swa_block_ids) if self.swa else 0
        if need > self.full.num_free_blocks or (self.swa and need_swa > self.swa.num_free_blocks):
            return False
        if need > 0 or need_swa > 0:
            old = min(len(req.block_ids), len(req.swa_block_ids)) if self.swa else len(req.block_ids)
            req.block_ids.extend(self.full.take(max(0, need)))
            if self.swa:
                req.swa_block_ids.extend(self.swa.take(max(0, need_swa)))
            req.kv_dirty_from = min(req.kv_dirty_from, old)
        return True

    def free(self, req: Request) -> None:
        self.full.release(reversed(req.block_ids))
        req.block_ids = []  # block_hashes stay: they depend on the tokens only
        req.num_registered_blocks = 0
        if self.swa:
            self.swa.release(reversed(req.swa_block_ids))
            req.swa_block_ids = []
        req.kv_dirty_from = 0

    def _window_start_block(self, next_pos: int) -> int:
        """First block a query at next_pos (or later) can still see on a sliding layer."""
        return max(0, (next_pos - self.window + 1) // self.block_size)

    def release_out_of_window(self, req: Request) -> None:
        """Give the sliding group back the blocks no future query of req can see."""
        if not self.swa:
            return
        end = min(self._window_start_block(req.num_computed_tokens), len(req.swa_block_ids))
        table = req.swa_block_ids
        for i in range(end - 1, -1, -1):
            if table[i] == 0:
                break  # everything before was released earlier
            self.swa.release([table[i]])
            table[i] = 0
            req.kv_dirty_from = min(req.kv_dirty_from, i)

    # --- prefix caching ------------------------------------------------------------------------------
    def _chain(self, req: Request, upto_blocks: int) -> list[tuple[int, tuple]]:
        """req.block_hashes, extended to hold the (hash, tokens) of req's first `upto_blocks` full blocks
        (it may hold more; callers index it, so a long context is not copied every step)."""
        bs, keys = self.block_size, req.block_hashes
        while len(keys) < upto_blocks:  # most steps complete no block: nothing to build
            i = len(keys)
            chunk = tuple(req.token_ids_between(i * bs, (i + 1) * bs))
            parent = keys[-1][0] if keys else 0
            keys.append((hash((parent, chunk)), chunk))
        return keys

    def match_prefix(self, req: Request) -> int:
        """Give a request with no blocks the cached blocks of its longest usable cached prefix. At
        least one token is left to compute, so the step still produces logits. Returns tokens matched."""
        if not self.enable_prefix_caching or req.block_ids:
            return 0
        bs = self.block_size
        upto = (req.num_tokens - 1) // bs
        keys = self._chain(req, upto)
        full = []
        for key in keys[:upto]:
            bid = self.full.lookup(key)
            if bid is None:
                break
            full.append(bid)
        n, swa = len(full), []
        while self.swa and n > 0:  # the sliding group must still hold the window before the cut
            start = self._window_start_block(n * bs)
            swa = [self.swa.lookup(keys[j]) for j in range(start, n)]
            if all(b is not None for b in swa):
                swa = [0] * start + swa
                break
            n -= 1
        for bid in full[:n]:
            self.full.share(bid)
        req.block_ids = full[:n]
        if self.swa:
            for bid in swa[:n]:
                if bid:
                    self.swa.share(bid)
            req.swa_block_ids = swa[:n] if n else []
        req.kv_dirty_from = 0
        req.num_registered_blocks = n  # shared blocks are cached already
        req.num_computed_tokens = n * bs
        return req.num_computed_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that req has completely computed since the last call, so later requests
        can share them. Only the new ones: walking every block of every request each step was ~17 ms of
        Python a step at 64 x 32k (2-core machine), beside a 17 ms fp8-KV step on the GPU."""
        if not self.enable_prefix_caching:
            return
        n_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        if n_full <= req.num_registered_blocks:
            return
        keys = self._chain(req, n_full)
        for i in range(req.num_registered_blocks, n_full):
            self.full.register(req.block_ids[i], keys[i])
            if self.swa:
                self.swa.register(req.swa_block_ids[i], keys[i])
        req.num_registered_blocks = n_full
