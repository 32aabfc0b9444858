"""Turns a scheduled batch into tensors once, runs the model, and samples."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..kernels.decode_inputs import HEADER, step_sizes
from ..model.gpt_oss import Transformer
from .forward_context import ForwardContext, set_forward_context
from .kv_cache import LayerKVCache
from .request import TABLES_CLEAN, Request
from .sampler import SamplerOutput, greedy_only, sample, sample_on_device
from .scheduler import SchedulerOutput


class PendingTokens:
    """A step's sampled tokens on their way to the host: the copy is queued behind the step and
    read when the engine gets to it, so the host can schedule and launch the next step meanwhile."""

    def __init__(self, tokens: torch.Tensor, host: torch.Tensor, written: bool = False):
        """written: the step writes its tokens into `host` itself (an in-place replay's argmax): no copy."""
        self.tokens = tokens  # int64 [S] on the device: the next step's inputs gather from it
        self.host = host[:tokens.shape[0]]
        if not written:
            self.host.copy_(tokens, non_blocking=True)
        self.event = None
        if tokens.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class _HostBuffers:
    """Two host int64 buffers taken in turn, pinned on CUDA so that copies between them and the device
    run asynchronously (a copy from pageable memory holds the host until the stream reaches it), both
    grown when a step needs more. A buffer is handed out again only after the event recorded after its
    last copy (`copied`), in practice long passed: the engine reads every step back before it packs
    the one after next."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bufs: list[list] = []  # [buffer, event after its last copy]

    def take(self, n: int) -> torch.Tensor:
        if not self.bufs or self.bufs[0][0].numel() < n:
            if self.bufs and self.cuda:
                torch.cuda.current_stream().synchronize()  # the old buffers' copies are done
            size = max(256, 1 << (n - 1).bit_length())
            self.bufs = [[torch.empty(size, dtype=torch.int64, pin_memory=self.cuda),
                          torch.cuda.Event() if self.cuda else None] for _ in range(2)]
        self.bufs.reverse()
        if self.bufs[0][1] is not None:
            self.bufs[0][1].synchronize()  # (an event never recorded returns at once)
        return self.bufs[0][0][:n]

    def copied(self) -> None:
        """The copies queued so far use the buffer last taken."""
        if self.cuda:
            self.bufs[0][1].record()


def _int64s(ids: list[int]) -> np.ndarray:
    return np.fromiter(ids, dtype=np.int64, count=len(ids))  # about half np.array's time on a list


def _synced(buf: np.ndarray | None, ids: list[int], start: int) -> np.ndarray:
    """buf (grown when ids outgrew it) with entries start.. of ids copied in."""
    n = len(ids)
    if buf is None or buf.shape[0] < n:
        grown = np.empty(max(64, 2 * n), dtype=np.int64)
        if buf is not None:
            grown[:start] = buf[:start]
        buf = grown
    if n > start:
        buf[start:n] = _int64s(ids[start:])
    return buf


def _tables_of(r: Request) -> tuple[np.ndarray, np.ndarray]:
    """r's block lists as int64 arrays, kept with the request and brought up to date from the first
    index the KV cache manager changed (kv_dirty_from): in decode a sequence gains a block every
    block_size tokens and its sliding list zeroes one, so the step copies a few entries instead of
    converting both lists (64 x 32k: 64 x 2 x 2,048 entries, 3.7-7.5 ms every 16th step on a 2-core
    machine, against 0.3 ms)."""
    c, d = r.kv_tables, r.kv_dirty_from
    if c is None:
        c, d = (None, None), 0
    if d != TABLES_CLEAN:
        c = r.kv_tables = (_synced(c[0], r.block_ids, d), _synced(c[1], r.swa_block_ids, d))
        r.kv_dirty_from = TABLES_CLEAN
    return c[0][:len(r.block_ids)], c[1][:len(r.swa_block_ids)]


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
        self._host_tokens = _HostBuffers(self.device)  # sampled tokens: one being read, one filling
        self._host_steps = _HostBuffers(self.device)  # packed steps: one being copied, one filling

    def _pack(self, out: SchedulerOutput) -> tuple[list[int], torch.Tensor, list[Request]]:
        """The whole step as one int64 tensor: one host-to-device copy, and one broadcast under TP.
        Filled with numpy slice by slice: at 256 sequences of 2k tokens the block tables alone are
        64k entries, which Python lists and torch.tensor(list) turned into ~8 ms of host time per step.
        A request's pending token (sampled by the step before, not read back yet) gets a placeholder
        and a (position, row) pair: forward fills it from that step's tokens on the device."""
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
        # the newest token of a request is pending when its step has not been read back: it is the
        # last of the request's tokens this step (a pending token is never cut off by the budget)
        pend = [(int(qsl[i + 1]) - 1, r.pending_row) for i, (r, e) in enumerate(zip(reqs, ends))
                if r.num_pending and e == r.num_tokens]
        P = len(pend)
        width = max(len(r.block_ids) for r in reqs)
        # T, B, table width, rows to unembed, max query len, max seq len, has sliding tables, pending tokens
        header = [T, B, width, S, max(ns), max(ends), int(swa), P]
        sizes = step_sizes(header)
        n = sum(sizes)  # on CPU, _upload hands on this tensor itself: a fresh one, never refilled
        # a replay of a small bucket reads the step where it is packed (DecodeGraphs.staging)
        host = self.graphs.staging(B, n) if self._replays(header) else None
        if host is None:
            host = self._host_steps.take(n) if self.device.type == "cuda" else torch.empty(n, dtype=torch.int64)
        flat = host.numpy()
        flat.fill(0)
        _, ids, pos, slots, qsl_out, seq_lens, rows_out, tables, swa_slots, pending = \
            np.split(flat, np.cumsum(sizes)[:-1])
        flat[:HEADER] = header
        qsl_out[:] = qsl
        seq_lens[:] = ends
        rows_out[:] = rows
        if P:
            pending[:] = np.array(pend, dtype=np.int64).T.reshape(-1)
        tables = tables.reshape(-1, B, width)
        for i, r in enumerate(reqs):
            full, sliding = _tables_of(r)
            tables[0, i, :len(full)] = full
            if swa:
                tables[1, i, :len(sliding)] = sliding
        ids[:] = [t for r, a, e in zip(reqs, starts, ends) for t in r.token_ids_between(a, e)
                  + [0] * (r.num_pending and e == r.num_tokens)]
        seq = np.repeat(np.arange(B), ns)  # each token's sequence
        pos[:] = np.arange(T) - np.repeat(qsl[:-1], ns) + np.repeat(starts, ns)
        blk, off = pos // bs, pos % bs
        slots[:] = tables[0, seq, blk] * bs + off
        if swa:
            swa_slots[:] = tables[1, seq, blk] * bs + off
        return header, host, samplers

    def _upload(self, header: list[int], host: torch.Tensor) -> torch.Tensor:
        """The packed step where the forward reads it: where the decode graphs read it when one replays
        it (their own device buffer, or the pinned half it was packed in), else on the device."""
        dev = self.graphs.upload(host) if self._replays(header) else host.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and dev.data_ptr() != host.data_ptr():
            self._host_steps.copied()
        return dev

    def unpack(self, header: list[int], flat: torch.Tensor, prev: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """prev: the sampled tokens of the step before, for the pending placeholders."""
        T, B, W, S, max_q, max_s, swa, P = header
        _, ids, pos, slots, qsl, seq_lens, rows, tables, swa_slots, pending = flat.split(step_sizes(header))
        if P:
            ids.index_copy_(0, pending[:P], prev.index_select(0, pending[P:]))
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
    def forward(self, header: list[int], flat: torch.Tensor, prev: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ForwardContext, bool]:
        """The step's forward -> (logits [S, vocab] when a graph replayed it, else hidden [T, H], ctx (None
        for a replay, which unpacks on the device), whether a graph replayed it). TP worker ranks run
        exactly this for every step rank 0 broadcasts."""
        if self._replays(header):
            return self.graphs.run(header, flat, prev), None, True
        input_ids, positions, ctx = self.unpack(header, flat, prev)
        with set_forward_context(ctx):
            return self.model(input_ids, positions), ctx, False

    def _logits(self, out: SchedulerOutput, prev: PendingTokens | None
                ) -> tuple[list[Request], torch.Tensor | None, torch.Tensor | None]:
        """-> (the rows that sample, their logits, their argmax when a graph replayed the step, else None;
        the replay's host copy of it, if it wrote one, in self.graphs.written)."""
        t0 = time.perf_counter()
        header, host, samplers = self._pack(out)
        self.pack_seconds += time.perf_counter() - t0
        flat = self._upload(header, host)
        if self.group is not None:
            self.group.send_step(header, flat, prev.tokens if prev is not None else None)
        result, ctx, replayed = self.forward(header, flat, prev.tokens if prev is not None else None)
        if not samplers:
            return samplers, None, None
        if replayed:  # rank 0's graphs include the unembedding and the argmax
            return samplers, result, self.graphs.tokens[:len(samplers)]
        return samplers, self.model.compute_logits(result[ctx.logits_indices]), None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Request], SamplerOutput | None]:
        """Run the step and wait for its tokens (and logprobs)."""
        samplers, logits, _ = self._logits(out, None)
        return samplers, sample(logits, samplers, self.generator) if samplers else None

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: PendingTokens | None) -> tuple[list[Request], PendingTokens | None]:
        """Queue the step and return at once: its tokens come back as PendingTokens. prev: the
        step before, whose tokens this step's pending inputs gather on the device."""
        samplers, logits, argmax = self._logits(out, prev)
        if not samplers:
            return samplers, None
        # a replay's argmax stays where the next replay reads its pending tokens (DecodeGraphs.holds)
        use_argmax = argmax is not None and greedy_only(samplers)
        tokens = argmax if use_argmax else sample_on_device(logits, samplers, self.generator)
        written = self.graphs.written if use_argmax else None  # an in-place replay's tokens, already on the host
        if written is not None:
            return samplers, PendingTokens(tokens, written, written=True)
        pending = PendingTokens(tokens, self._host_tokens.take(tokens.numel()))
        self._host_tokens.copied()
        return samplers, pending

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int, swa: bool, with_logits: bool = True) -> None:
        """Under TP every rank captures the same buckets in the same order (the all-reduces inside
        pair up); only rank 0 needs the unembedding in its graphs."""
        from .cuda_graphs import DecodeGraphs
        # rank 0 of a TP group broadcasts each step from the device: no steps read in place there
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch, max_model_len, self.block_size, swa,
                                   self.device, with_logits, in_place=self.group is None)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int, max_len: int) -> None:
        """One forward at the largest batch, so the caller can measure peak activation memory. All
        tokens read the null block and write nowhere. No sequence is longer than max_len (the model's
        rope table ends there, and the scheduler never schedules more: at most num_seqs x max_len tokens)."""
        num_tokens = min(num_tokens, num_seqs * max_len)
        num_seqs = max(1, min(num_seqs, num_tokens))
        per, extra = divmod(num_tokens, num_seqs)
        qlens = [per + (i < extra) for i in range(num_seqs)]
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
