"""Turns a scheduled batch into tensors once, runs the model, and samples."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..model.gpt_oss import Transformer
from .forward_context import ForwardContext, set_forward_context
from .kv_cache import LayerKVCache
from .request import Request
from .sampler import SamplerOutput, sample
from .scheduler import SchedulerOutput


HEADER = 7  # T, B, table width, rows to unembed, max query len, max seq len, has sliding tables


def _tables_of(r: Request) -> tuple[np.ndarray, np.ndarray]:
    """r's block lists as int64 arrays, rebuilt only when the KV cache manager changed them (every
    block_size tokens in decode), so a step copies arrays instead of converting long lists."""
    c = r.kv_tables
    if c is None or c[0] != r.kv_version:
        c = r.kv_tables = (r.kv_version, np.array(r.block_ids, dtype=np.int64),
                           np.array(r.swa_block_ids, dtype=np.int64))
    return c[1], c[2]


class ModelRunner:
    def __init__(self, model: Transformer, kv_caches: list[LayerKVCache], block_size: int, device,
                 seed: int = 0, group=None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.group = group  # tensor-parallel worker group (rank 0 only), or None
        self.graphs = None  # DecodeGraphs once captured
        self.pack_seconds = 0.0  # host time spent packing steps, over the runner's life (gptoss bench)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _pack(self, out: SchedulerOutput) -> tuple[list[int], torch.Tensor, list[Request]]:
        """The whole step as one int64 tensor: one host-to-device copy, and one broadcast under TP.
        Filled with numpy slice by slice: at 256 sequences of 2k tokens the block tables alone are
        64k entries, which Python lists and torch.tensor(list) turned into ~8 ms of host time per step."""
        bs, reqs = self.block_size, out.requests
        swa = bool(reqs[0].swa_block_ids)  # the sliding layers have their own block group
        B = len(reqs)
        ns = [out.num_scheduled_tokens[r.request_id] for r in reqs]
        starts = [r.num_computed_tokens for r in reqs]
        T = sum(ns)
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(ns, out=qsl[1:])
        ends = [s + n for s, n in zip(starts, ns)]
        # a request caught up with its tokens samples its next one this step
        samplers = [r for r, e in zip(reqs, ends) if e == r.num_tokens]
        rows = [int(qsl[i + 1]) - 1 for i, (r, e) in enumerate(zip(reqs, ends)) if e == r.num_tokens]
        S = len(rows)
        width = max(len(r.block_ids) for r in reqs)
        header = [T, B, width, S, max(ns), max(ends), int(swa)]
        sizes = [HEADER, T, T, T, B + 1, B, S, B * width * (2 if swa else 1), T if swa else 0]
        flat = np.zeros(sum(sizes), dtype=np.int64)
        _, ids, pos, slots, qsl_out, seq_lens, rows_out, tables, swa_slots = np.split(flat, np.cumsum(sizes)[:-1])
        flat[:HEADER] = header
        qsl_out[:] = qsl
        seq_lens[:] = ends
        rows_out[:] = rows
        tables = tables.reshape(-1, B, width)
        for i, r in enumerate(reqs):
            full, sliding = _tables_of(r)
            tables[0, i, :len(full)] = full
            if swa:
                tables[1, i, :len(sliding)] = sliding
        ids[:] = [t for r, a, e in zip(reqs, starts, ends) for t in r.token_ids_between(a, e)]
        seq = np.repeat(np.arange(B), ns)  # each token's sequence
        pos[:] = np.arange(T) - np.repeat(qsl[:-1], ns) + np.repeat(starts, ns)
        blk, off = pos // bs, pos % bs
        slots[:] = tables[0, seq, blk] * bs + off
        if swa:
            swa_slots[:] = tables[1, seq, blk] * bs + off
        return header, torch.from_numpy(flat).to(self.device, non_blocking=True), samplers

    def unpack(self, header: list[int], flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        T, B, W, S, max_q, max_s, swa = header
        sizes = [HEADER, T, T, T, B + 1, B, S, B * W * (2 if swa else 1), T if swa else 0]
        _, ids, pos, slots, qsl, seq_lens, rows, tables, swa_slots = flat.split(sizes)
        i32 = torch.int32
        tables = tables.view(-1, B, W).to(i32)
        ctx = ForwardContext(
            query_start_loc=qsl.to(i32), seq_lens=seq_lens.to(i32), block_tables=tables[0],
            slot_mapping=slots, max_query_len=max_q, max_seq_len=max_s, logits_indices=rows,
            kv_caches=self.kv_caches, swa_block_tables=tables[1] if swa else None,
            swa_slot_mapping=swa_slots if swa else None)
        return ids, pos, ctx

    def _replays(self, header: list[int]) -> bool:
        """A pure decode step (one token per sequence, every sequence samples) that a captured graph
        fits. Every rank decides from the same header, so under TP all ranks replay or none does."""
        T, B, _, S, max_q = header[:5]
        return self.graphs is not None and max_q == 1 and S == B == T and self.graphs.fits(B)

    @torch.inference_mode()
    def forward(self, header: list[int], flat: torch.Tensor) -> tuple[torch.Tensor, ForwardContext, bool]:
        """The step's forward -> (logits [S, vocab] when a graph replayed it, else hidden [T, H], ctx,
        whether a graph replayed it). TP worker ranks run exactly this for every step rank 0 broadcasts."""
        input_ids, positions, ctx = self.unpack(header, flat)
        if self._replays(header):
            return self.graphs.run(ctx, input_ids, positions), ctx, True
        with set_forward_context(ctx):
            return self.model(input_ids, positions), ctx, False

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Request], SamplerOutput | None]:
        t0 = time.perf_counter()
        header, flat, samplers = self._pack(out)
        self.pack_seconds += time.perf_counter() - t0
        if self.group is not None:
            self.group.send_step(header, flat)
        result, ctx, replayed = self.forward(header, flat)
        if not samplers:
            return samplers, None
        # a replayed graph already gave the logits (rank 0's graphs include the unembedding)
        logits = result if replayed else self.model.compute_logits(result[ctx.logits_indices])
        return samplers, sample(logits, samplers, self.generator)

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int, swa: bool, with_logits: bool = True) -> None:
        """Under TP every rank captures the same buckets in the same order (the all-reduces inside
        pair up); only rank 0 needs the unembedding in its graphs."""
        from .cuda_graphs import DecodeGraphs
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch, max_model_len, self.block_size, swa,
                                   self.device, with_logits)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One forward at the largest batch, so the caller can measure peak activation memory. All
        tokens read the null block and write nowhere."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        per = num_tokens // num_seqs
        qlens = [per] * num_seqs
        qlens[-1] += num_tokens - per * num_seqs
        nblk = -(-max(qlens) // self.block_size)
        dev = self.device
        qsl = [0]
        for q in qlens:
            qsl.append(qsl[-1] + q)
        ctx = ForwardContext(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(qlens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(num_seqs, nblk, dtype=torch.int32, device=dev),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
            max_query_len=max(qlens), max_seq_len=max(qlens),
            logits_indices=torch.tensor(qsl[1:], device=dev) - 1,
            kv_caches=self.kv_caches)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(q, device=dev) for q in qlens])
        with set_forward_context(ctx):
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[ctx.logits_indices])
