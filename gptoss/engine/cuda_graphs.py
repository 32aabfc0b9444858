"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with the step's tensors
copied into static buffers. Padding rows decode one token against the null block and write nowhere."""

from __future__ import annotations

import torch

from ..kernels import pdl
from .forward_context import ForwardContext, set_forward_context

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
# graphs of up to PDL_MAX_BATCH rows launch our kernels with programmatic dependent launch (Hopper+;
# gptoss.kernels.pdl); H100, 20b, ms a step with / without: batch 1 2.30 / 2.44, 8 4.36 / 4.46,
# 16 5.08 / 5.27, 64 6.64 / 6.70 (larger batches' kernels span several waves: not tried)
PDL = True
PDL_MAX_BATCH = 64


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_model_len: int, block_size: int,
                 swa: bool, device: torch.device, with_logits: bool = True):
        self.model = model
        self.with_logits = with_logits  # TP worker ranks stop at the hidden states
        self.sizes = [b for b in BUCKETS if b <= max_batch] or [1]
        n, w = self.sizes[-1], -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        z = dict(dtype=torch.int64, device=device)
        self.ids = torch.zeros(n, **z)
        self.pos = torch.zeros(n, **z)
        self.slots = torch.full((n,), -1, **z)
        self.swa_slots = torch.full((n,), -1, **z) if swa else None
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.zeros(n, w, dtype=torch.int32, device=device)
        self.swa_tables = torch.zeros(n, w, dtype=torch.int32, device=device) if swa else None
        self.rows = torch.arange(n, **z)
        self.kv_caches = kv_caches
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.graphs[b] = self._capture(b, pool)

    def _ctx(self, b: int) -> ForwardContext:
        return ForwardContext(
            query_start_loc=self.qsl[:b + 1], seq_lens=self.seq_lens[:b], block_tables=self.tables[:b],
            slot_mapping=self.slots[:b], max_query_len=1, max_seq_len=self.max_model_len,
            logits_indices=self.rows[:b], kv_caches=self.kv_caches,
            swa_block_tables=None if self.swa_tables is None else self.swa_tables[:b],
            swa_slot_mapping=None if self.swa_slots is None else self.swa_slots[:b])

    @torch.inference_mode()
    def _capture(self, b: int, pool):
        ctx = self._ctx(b)
        use_pdl = PDL and b <= PDL_MAX_BATCH and torch.cuda.get_device_capability(self.ids.device) >= (9, 0)
        with set_forward_context(ctx), pdl.enabled(use_pdl):
            self._step(b)  # warm up: compile, autotune (and, under TP, the first collectives)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._step(b)
        return g, out

    def _step(self, b: int) -> torch.Tensor:
        hidden = self.model(self.ids[:b], self.pos[:b])
        return self.model.compute_logits(hidden) if self.with_logits else hidden

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, ctx: ForwardContext, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A decode step of B = len(ids) sequences (one token each) -> logits [B, vocab] in the model
        dtype (or the hidden states [B, H] without logits)."""
        B = ids.shape[0]
        b = next(s for s in self.sizes if s >= B)
        W = ctx.block_tables.shape[1]
        self.ids[:B].copy_(ids)
        self.pos[:B].copy_(pos)
        self.slots[:B].copy_(ctx.slot_mapping)
        self.slots[B:b].fill_(-1)  # padding rows must not write into the cache
        self.seq_lens[:B].copy_(ctx.seq_lens)
        self.seq_lens[B:b].fill_(1)
        self.tables[:B, :W].copy_(ctx.block_tables)
        self.tables[B:b, 0].fill_(0)  # padding rows read the null block
        if self.swa_tables is not None:
            self.swa_slots[:B].copy_(ctx.swa_slot_mapping)
            self.swa_slots[B:b].fill_(-1)
            self.swa_tables[:B, :W].copy_(ctx.swa_block_tables)
            self.swa_tables[B:b, 0].fill_(0)
        g, out = self.graphs[b]
        g.replay()
        return out[:B]
