"""Per-step attention metadata, set once per forward so the model keeps forward(input_ids, positions)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardContext:
    query_start_loc: torch.Tensor   # int32 [B+1]: where each sequence's new tokens start in the batch
    seq_lens: torch.Tensor          # int32 [B]: context length after this step (cached + new)
    block_tables: torch.Tensor      # int32 [B, max_blocks]: KV block ids of each sequence
    slot_mapping: torch.Tensor      # int64 [T]: cache slot (block * block_size + offset) of each new token
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor    # int64 [S]: rows of the hidden states that get unembedded
    kv_caches: list | None = None   # per layer LayerKVCache
    # the sliding-window layers' own block group (None: they share the tables above)
    swa_block_tables: torch.Tensor | None = None
    swa_slot_mapping: torch.Tensor | None = None


_CTX: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CTX is None:
        raise RuntimeError("no forward context: the model runs inside set_forward_context(...)")
    return _CTX


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext):
    global _CTX
    prev, _CTX = _CTX, ctx
    try:
        yield ctx
    finally:
        _CTX = prev
