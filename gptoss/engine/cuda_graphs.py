"""CUDA graphs for decode steps: one graph per batch-size bucket. A step's packed tensor is copied to a
static buffer, and the graph unpacks it itself (kernels.decode_inputs), runs the model and, with
logits, takes their argmax (kernels.argmax) for greedy rows. Padding rows decode one token against
the null block and write nowhere.

Small buckets (IN_PLACE_MAX_BATCH) skip the copies: their graph's first kernel reads the packed step
from pinned host memory and its argmax writes the tokens there too, across PCIe. Each has two graphs,
one for each half of the pinned buffers, replayed in turn, so that the host packs the next step into
one half while the step before may still read the other."""

from __future__ import annotations

import torch

from ..kernels import pdl
from ..kernels.argmax import argmax_scratch, row_argmax
from ..kernels.decode_inputs import BLOCK_P, HEADER, decode_inputs, step_sizes
from .forward_context import ForwardContext, set_forward_context

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
# graphs of up to PDL_MAX_BATCH rows launch our kernels with programmatic dependent launch (Hopper+;
# gptoss.kernels.pdl); H100, 20b, ms a step with / without: batch 1 2.30 / 2.44, 8 4.36 / 4.46,
# 16 5.08 / 5.27, 64 6.64 / 6.70 (larger batches' kernels span several waves: not tried)
PDL = True
PDL_MAX_BATCH = 64
# buckets that read their step and write their tokens in pinned host memory. H100, batch 1: the copy
# up before a replay and the one down after it cost 16 us of GPU time a step (1.705 ms against 1.689
# for the graph replayed alone), where reading and writing in place costs 8 (1.697;
# scripts/step_io_probe.py); the engine's generate 1.654 ms a token against 1.665 (scripts/ab_decode.py)
IN_PLACE_MAX_BATCH = 8


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_model_len: int, block_size: int,
                 swa: bool, device: torch.device, with_logits: bool = True, in_place: bool = True):
        """in_place: small buckets read their steps and write their tokens in pinned host memory (only
        with logits: TP ranks broadcast the step from the device)."""
        self.model = model
        self.with_logits = with_logits  # TP worker ranks stop at the hidden states
        self.sizes = [b for b in BUCKETS if b <= max_batch] or [1]
        n, w = self.sizes[-1], -(-max_model_len // block_size)
        assert n <= BLOCK_P, "decode_inputs searches the pending tokens in one block"
        self.max_model_len = max_model_len
        z = dict(dtype=torch.int64, device=device)
        # the packed step of the largest bucket at the longest tables, every part present
        self.flat = torch.zeros(sum(step_sizes([n, n, w, n, 1, max_model_len, 1, n])), **z)
        self.in_place = [b for b in self.sizes if b <= IN_PLACE_MAX_BATCH] if in_place and with_logits else []
        if self.in_place:
            m = self.in_place[-1]
            pinned = dict(dtype=torch.int64, pin_memory=True)
            self.host_flat = torch.zeros(2, sum(step_sizes([m, m, w, m, 1, max_model_len, 1, m])), **pinned)
            self.host_flat[:, :HEADER] = torch.tensor([0, 0, 1, 0, 1, 1, int(swa), 0])  # padding-only steps
            self.host_tokens = torch.zeros(2, m, **pinned)
            self.half_done = [torch.cuda.Event(), torch.cuda.Event()]  # after the replay that last read a half
        self.turn = 0  # the half the next in-place replay reads
        self.written: torch.Tensor | None = None  # the host tokens the last replay wrote in place, or None
        # the argmax of the last replay, where pending tokens are read: as long as a step's sampled rows
        # can be (an eager step before a replay may sample up to max_batch rows, past the largest bucket)
        self.tokens = torch.zeros(max(n, max_batch), **z)
        self.argmax_scratch = argmax_scratch(n, device)
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
        # a bucket's graphs: one, or one for each host half (in place)
        self.graphs: dict[int, list[tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}
        # a step that unpacks as a padding-only one (B = 0) until the first real step arrives
        self.flat[:HEADER] = torch.tensor([0, 0, 1, 0, 1, 1, int(swa), 0])
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.graphs[b] = [self._capture(b, pool, half) for half in ((0, 1) if b in self.in_place else (None,))]

    def _ctx(self, b: int) -> ForwardContext:
        return ForwardContext(
            query_start_loc=self.qsl[:b + 1], seq_lens=self.seq_lens[:b], block_tables=self.tables[:b],
            slot_mapping=self.slots[:b], max_query_len=1, max_seq_len=self.max_model_len,
            logits_indices=self.rows[:b], kv_caches=self.kv_caches,
            swa_block_tables=None if self.swa_tables is None else self.swa_tables[:b],
            swa_slot_mapping=None if self.swa_slots is None else self.swa_slots[:b])

    @torch.inference_mode()
    def _capture(self, b: int, pool, half: int | None):
        ctx = self._ctx(b)
        use_pdl = PDL and b <= PDL_MAX_BATCH and torch.cuda.get_device_capability(self.ids.device) >= (9, 0)
        with set_forward_context(ctx), pdl.enabled(use_pdl):
            self._step(b, half)  # warm up: compile, autotune (and, under TP, the first collectives)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._step(b, half)
        return g, out

    def _step(self, b: int, half: int | None) -> torch.Tensor:
        """half: the host half the step is read from and its tokens written to, or None (self.flat)."""
        decode_inputs(self.flat if half is None else self.host_flat[half], self.tokens, self.ids[:b], self.pos[:b],
                      self.slots[:b], self.seq_lens[:b], self.tables[:b],
                      None if self.swa_slots is None else self.swa_slots[:b],
                      None if self.swa_tables is None else self.swa_tables[:b])
        if not self.with_logits:
            return self.model(self.ids[:b], self.pos[:b])
        logits = self.model(self.ids[:b], self.pos[:b], logits=True)
        row_argmax(logits, self.tokens[:b], self.argmax_scratch,
                   None if half is None else self.host_tokens[half, :b])
        return logits

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def _bucket(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def staging(self, num_seqs: int, n: int) -> torch.Tensor | None:
        """Where to pack a step of num_seqs sequences (n entries) that a replay reads in place: the host
        half of the next in-place replay, once the replay that last read it has ended (in practice long
        since); None when the bucket reads its steps from self.flat (upload copies them there)."""
        if self._bucket(num_seqs) not in self.in_place:
            return None
        self.half_done[self.turn].synchronize()
        return self.host_flat[self.turn, :n]

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """The packed step where its replay reads it: a staging half as it is, else copied into self.flat
        (non_blocking: from pinned memory the copy is queued, and the host goes on)."""
        if self.in_place and host.data_ptr() == self.host_flat[self.turn].data_ptr():
            return host
        dev = self.flat[:host.numel()]
        dev.copy_(host, non_blocking=True)
        return dev

    def holds(self, tokens: torch.Tensor | None) -> bool:
        """Whether tokens are this object's own (a replay's argmax), which the next replay reads in place."""
        return tokens is not None and tokens.data_ptr() == self.tokens.data_ptr()

    @torch.inference_mode()
    def run(self, header: list[int], flat: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """A pure decode step of B = header[1] sequences, packed in flat (model_runner's layout; the copy
        is skipped when flat is where the replay reads it: upload's result) -> logits [B, vocab] in the
        model dtype, their argmax in self.tokens[:B] and, for an in-place bucket, in self.written (or
        the hidden states [B, H] without logits). prev: the tokens of the step before, which pending
        positions take."""
        B = header[1]
        b = self._bucket(B)
        half = self.turn if b in self.in_place else None
        src = self.flat if half is None else self.host_flat[half]
        if flat.data_ptr() != src.data_ptr():
            if half is not None:
                self.half_done[half].synchronize()
            src[:flat.numel()].copy_(flat, non_blocking=half is None)
        if header[7] and not self.holds(prev):
            self.tokens[:prev.numel()].copy_(prev)
        g, out = self.graphs[b][half or 0]
        g.replay()
        self.written = None
        if half is not None:
            self.half_done[half].record()
            self.written = self.host_tokens[half, :B]
            self.turn ^= 1
        return out[:B]
