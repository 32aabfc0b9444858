"""Turns a scheduled batch into tensors once, runs the model, and samples."""

from __future__ import annotations

import torch

from ..model.gpt_oss import Transformer
from .forward_context import ForwardContext, set_forward_context
from .kv_cache import LayerKVCache
from .request import Request
from .sampler import SamplerOutput, sample
from .scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: Transformer, kv_caches: list[LayerKVCache], block_size: int, device,
                 seed: int = 0):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, ForwardContext, list[Request]]:
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens, qlens, logits_rows, samplers = [], [], [], [0], [], [], [], []
        for r in out.requests:
            n = out.num_scheduled_tokens[r.request_id]
            start = r.num_computed_tokens
            tokens = r.all_token_ids[start:start + n]
            ids.extend(tokens)
            p = range(start, start + n)
            pos.extend(p)
            slots.extend(r.block_ids[i // bs] * bs + i % bs for i in p)
            qsl.append(qsl[-1] + n)
            qlens.append(n)
            seq_lens.append(start + n)
            if start + n == r.num_tokens:  # caught up with its tokens: this step samples its next one
                logits_rows.append(qsl[-1] - 1)
                samplers.append(r)
        width = max(len(r.block_ids) for r in out.requests)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in out.requests]
        dev = self.device

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        ctx = ForwardContext(
            query_start_loc=t(qsl, torch.int32), seq_lens=t(seq_lens, torch.int32),
            block_tables=t(tables, torch.int32), slot_mapping=t(slots, torch.int64),
            max_query_len=max(qlens), max_seq_len=max(seq_lens), logits_indices=t(logits_rows, torch.int64),
            query_lens_cpu=qlens, seq_lens_cpu=seq_lens, kv_caches=self.kv_caches)
        return t(ids, torch.int64), t(pos, torch.int64), ctx, samplers

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Request], SamplerOutput | None]:
        input_ids, positions, ctx, samplers = self._prepare(out)
        with set_forward_context(ctx):
            hidden = self.model(input_ids, positions)
        if not samplers:
            return samplers, None
        logits = self.model.compute_logits(hidden[ctx.logits_indices])
        return samplers, sample(logits, samplers, self.generator)

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
            query_lens_cpu=qlens, seq_lens_cpu=qlens, kv_caches=self.kv_caches)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(q, device=dev) for q in qlens])
        with set_forward_context(ctx):
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[ctx.logits_indices])
