"""The paged KV cache: a pool of fixed-size blocks, and the tensors that hold them.

Block 0 is a reserved null block: unused block-table entries point at it, so a kernel that reads a
padded table never touches memory outside the cache.
"""

from __future__ import annotations

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


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, fp8: bool, device) -> list[LayerKVCache]:
    caches = []
    for _ in range(num_layers):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
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
    """Hands out KV blocks to requests and takes them back, sharing full blocks by prefix.

    Prefix caching: a full block is named by a hash of its tokens and of every token before it (the
    parent block's hash), so two requests that start alike share the blocks they have in common.
    Blocks are reference counted; a block nobody holds goes to the back of the free queue and keeps
    its contents until it is reused, so the least recently freed cached block is evicted first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}: give it more memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks   # (hash, tokens) of a cached block
        self.cached: dict[int, int] = {}                            # hash -> block id
        # insertion-ordered: the front is the least recently freed block (0 is the null block)
        self._free: dict[int, None] = dict.fromkeys(range(1, num_blocks))
        self.num_cache_hits = 0      # prompt tokens served from the cache, over the pool's life
        self.num_cache_queries = 0   # prompt tokens looked up

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def _pop_free(self) -> int:
        bid = next(iter(self._free))
        del self._free[bid]
        key = self.block_key[bid]
        if key is not None:  # evict its cached contents
            del self.cached[key[0]]
            self.block_key[bid] = None
        self.ref_cnt[bid] = 1
        return bid

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req's block list to hold num_new_tokens more tokens; False if the pool is short."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            return False
        req.block_ids.extend(self._pop_free() for _ in range(need))
        return True

    def free(self, req: Request) -> None:
        # the tail first, so a request's later (less shared) blocks are evicted before its prefix
        for bid in reversed(req.block_ids):
            self.ref_cnt[bid] -= 1
            if self.ref_cnt[bid] == 0:
                self._free[bid] = None
        req.block_ids = []  # block_hashes stay: they depend on the tokens only

    # --- prefix caching ----------------------------------------------------------------------------
    def _chain(self, req: Request, upto_blocks: int) -> list[tuple[int, tuple]]:
        """(hash, tokens) of req's first `upto_blocks` full blocks, extending req.block_hashes."""
        bs, tokens = self.block_size, req.all_token_ids
        keys = req.block_hashes
        while len(keys) < upto_blocks:
            i = len(keys)
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            parent = keys[-1][0] if keys else 0
            keys.append((hash((parent, chunk)), chunk))
        return keys[:upto_blocks]

    def match_prefix(self, req: Request) -> int:
        """Give a request with no blocks the cached blocks of its longest cached prefix. At least one
        token is left to compute, so the step still produces logits. Returns the tokens matched."""
        if not self.enable_prefix_caching or req.block_ids:
            return 0
        bs = self.block_size
        hits = []
        for h, chunk in self._chain(req, (req.num_tokens - 1) // bs):
            bid = self.cached.get(h)
            if bid is None or self.block_key[bid][1] != chunk:  # a miss, or a hash collision
                break
            hits.append(bid)
        for bid in hits:
            if self.ref_cnt[bid] == 0:
                del self._free[bid]
            self.ref_cnt[bid] += 1
        req.block_ids = hits
        req.num_computed_tokens = len(hits) * bs
        return req.num_computed_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that req has completely computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        n_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        for i, (h, chunk) in enumerate(self._chain(req, n_full)):
            bid = req.block_ids[i]
            if self.block_key[bid] is None and h not in self.cached:
                self.block_key[bid] = (h, chunk)
                self.cached[h] = bid
