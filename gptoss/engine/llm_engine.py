"""The engine: loads the model, sizes the KV cache, and steps scheduler -> runner -> stop checks."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from ..config import EngineConfig, ModelConfig
from ..distributed import ParallelState, check_parallel_sizes
from ..model.weights import CheckpointError, resolve_model_path
from ..outputs import CompletionOutput, Logprob, RequestOutput, TokenPrefix
from ..sampling_params import SamplingParams
from ..tokenizer import decode
from .kv_cache import (KVCacheManager, KVLayout, allocate_kv_caches, kv_bytes_per_token, kv_storage_dtype,
                       plan_kv_layout)
from .model_runner import ModelRunner, PendingTokens
from .worker import Worker
from .request import Request
from .scheduler import Scheduler

log = logging.getLogger("gptoss")

FIRST_SPECIAL_TOKEN = 199998  # o200k_harmony: ids from here up are special tokens
CPU_KV_BYTES = 256 << 20
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device(name)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        self.device = _pick_device(config.device)
        root = resolve_model_path(config.model, config.revision)
        if not (root / "config.json").exists():
            raise CheckpointError(f"{root} has no config.json")
        self.model_config = mc = ModelConfig.from_json(root / "config.json")
        self.eos_token_ids = tuple(_generation_eos(root, mc))
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[config.dtype]
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={mc.max_position_embeddings}")
        self.kv_fp8 = config.kv_cache_dtype == "fp8"
        self.kv_dtype = kv_storage_dtype(config.kv_cache_dtype, self.dtype)  # of a non-fp8 cache
        self.block_size = config.block_size
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        # ranks 1.. of a tensor-parallel group run in their own processes; this process is rank 0
        self.workers = None
        par = ParallelState()
        if config.tensor_parallel_size > 1:
            from .tp import WorkerGroup
            check_parallel_sizes(mc, config.tensor_parallel_size, config.enable_expert_parallel)
            self.workers = WorkerGroup(config, self.device)
            par = self.workers.parallel_state
        try:
            self.worker = Worker(config, root, mc, self.device, self.dtype, self.max_model_len, par, progress)
            self.moe_backend = self.worker.moe_backend
            self.model = self.worker.model
            budget = self._kv_budget()
            if self.workers is not None:  # every rank must agree on the cache size: take the smallest
                budget = self.workers.agree_min(budget)
            self.kv_layout = layout = self.plan_layout(budget)
            if self.workers is not None:
                self.workers.send_layout(layout)
            self.max_num_batched_tokens = layout.max_chunk
            self.pool = KVCacheManager(layout.num_blocks, self.block_size, config.enable_prefix_caching,
                                       layout.window, layout.num_swa_blocks)
            self.runner = self.worker.init_runner(layout, config, self.workers)
            self.cuda_graphs = self.worker.uses_cuda_graphs(config)
            if self.cuda_graphs:  # under TP the worker ranks capture the same graphs at the same time
                self.runner.capture_cuda_graphs(config.max_num_seqs, self.max_model_len, layout.window is not None)
        except BaseException:
            if self.workers is not None:
                self.workers.shutdown()
            raise
        self.num_computed_tokens_total = 0  # tokens run through the model, over the engine's life
        self.step_times = {"schedule": 0.0, "execute": 0.0, "update": 0.0, "steps": 0}
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, self.max_num_batched_tokens)
        # async scheduling: step N+1 is scheduled and launched before step N's tokens reach the host,
        # so the host's scheduling, packing and bookkeeping hide behind the GPU's work (TP ranks too)
        self.async_scheduling = config.async_scheduling
        self._inflight: tuple[list[Request], PendingTokens] | None = None
        self._ids = itertools.count()
        self.driven_by_async = False  # set while an AsyncLLM steps this engine in its thread
        self._last_update = 0.0  # host time of the last read-back's appends (step_times' "update")
        # A full garbage collection pauses for as long as it takes to walk every object alive: 146 ms
        # with the 20b loaded and its graphs captured (~200k objects, H100 host), landing on whichever
        # request trips it (a 2k prompt's TTFT went from 35 to 120 ms). What exists now lives as long as
        # the engine, so it moves to the permanent generation, which collections skip; a dropped
        # engine is still freed by reference counts (its model holds no cycle).
        gc.collect()
        gc.freeze()

    # --- setup -----------------------------------------------------------------------------------
    def _kv_budget(self) -> int:
        mc, cfg = self.model_config, self.config
        if cfg.kv_cache_memory_bytes is not None:
            return cfg.kv_cache_memory_bytes
        if self.device.type == "cuda":
            return self.worker.kv_budget_that_fits(cfg) if self.workers else self._profile_free_memory()
        # a modest fixed size on CPU, no more than the longest batch could use
        per_token = kv_bytes_per_token(mc.num_hidden_layers, self.worker.num_kv_heads, mc.head_dim,
                                       self.kv_fp8, self.kv_dtype.itemsize)
        return min(CPU_KV_BYTES, per_token * cfg.max_num_seqs * (self.max_model_len + self.block_size))

    def plan_layout(self, budget: int) -> KVLayout:
        mc = self.model_config
        return plan_kv_layout(budget, mc.is_sliding, mc.sliding_window, self.worker.num_kv_heads, mc.head_dim,
                              self.kv_fp8, self.kv_dtype.itemsize, self.block_size, self.config.max_num_seqs,
                              self.max_num_batched_tokens)

    def _profile_free_memory(self) -> int:
        """What gpu_memory_utilization leaves after the weights and the activations of the largest
        step (measured with one forward on a 2-block cache)."""
        mc = self.model_config
        kv = allocate_kv_caches(KVLayout(2, 2, None, 0), mc.is_sliding, self.block_size, self.worker.num_kv_heads,
                                mc.head_dim, self.kv_dtype, self.kv_fp8, self.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        ModelRunner(self.model, kv, self.block_size, self.device).profile_run(
            self.max_num_batched_tokens, self.config.max_num_seqs, self.max_model_len)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline  # the largest step's activations
        del kv
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        # in use now: our weights, anything else of this process (another LLM) and other processes
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) - peak
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization={self.config.gpu_memory_utilization} leaves no room for "
                             f"the KV cache ({(total - free) / 2**30:.1f} GiB in use and {peak / 2**30:.1f} GiB "
                             f"of activations, of {total / 2**30:.1f} GiB)")
        return budget

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> list[Request]:
        """Queue one prompt; returns its n Requests (one per sample)."""
        rid = request_id if request_id is not None else str(next(self._ids))
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        capacity = self.pool.num_usable_blocks * self.block_size
        limit = min(self.max_model_len, capacity)
        if n_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {n_prompt} tokens; max_model_len={self.max_model_len} leaves "
                             f"no room to generate (prompt + output must fit in max_model_len)")
        if n_prompt >= capacity:
            raise ValueError(f"the prompt has {n_prompt} tokens but the KV cache holds only {capacity}; "
                             f"give the engine more KV memory")
        spec = params.structured
        if spec is None and params.json_schema is not None:
            from .structured import StructuredSpec
            spec = StructuredSpec(json_schema=params.json_schema, harmony=False)
        # compiled before anything is queued, so a bad schema fails this request alone
        grammars = [spec.new_matcher() if spec is not None else None for _ in range(params.n)]
        reqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed((params.seed + i) % 2**64)
            req = Request(f"{rid}-{i}" if params.n > 1 else rid, list(prompt_token_ids), params, parent_id=rid,
                          index=i, eos_token_ids=self.eos_token_ids, max_total_tokens=limit, generator=gen,
                          logprobs=[] if params.logprobs is not None else None,
                          grammar=grammars[i])
            self.scheduler.add(req)
            reqs.append(req)
        return reqs

    def abort(self, request_ids) -> None:
        for rid in request_ids:
            req = self.scheduler.requests.get(rid)
            if req is not None:
                self.scheduler.finish(req, "abort")

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (no-op with one process)."""
        if self.workers is not None:
            self.workers.shutdown()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def _overlaps(self) -> bool:
        """Whether the next step may be scheduled before the one in flight is read back: no queued
        request's next step depends on its newest token's value."""
        sch = self.scheduler
        return self.async_scheduling and not any(r.needs_sync for q in (sch.running, sch.waiting) for r in q)

    def step(self) -> list[Request]:
        """Run one batch; returns the requests that produced a token (finished ones included).

        Under async scheduling a call launches step N and then reads back step N-1, so the tokens
        it returns are one step behind the GPU; the last call launches nothing and reads back the last."""
        overlap = self._overlaps()
        if self._inflight is not None and not overlap:
            return self._drain()  # a synchronous step must see every token first
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.requests:
            if self._inflight is not None:
                return self._drain()
            if self.scheduler.running or self.scheduler.waiting:
                raise RuntimeError("the scheduler could not schedule any request (KV cache too small?)")
            return []
        t1 = time.perf_counter()
        if overlap:
            samplers, pending = self.runner.launch(out, self._inflight[1] if self._inflight else None)
            for i, req in enumerate(samplers):
                req.num_pending += 1
                req.pending_row = i
            done = self._read_back() if self._inflight is not None else []
            self._inflight = (samplers, pending) if samplers else None
            t3 = time.perf_counter()
            self._computed(out)
        else:
            samplers, sampled = self.runner.execute(out)
            t3 = time.perf_counter()
            self._computed(out)
            for i, req in enumerate(samplers):
                self._append_token(req, sampled.token_ids[i], sampled.logprobs[i])
            done = samplers
        # host time around the model: scheduling before it, bookkeeping and stop checks after it
        # (the read-back's wait for the step before is neither: it counts as execute)
        t4 = time.perf_counter()
        st = self.step_times
        st["schedule"] += t1 - t0
        st["execute"] += t3 - t1 - self._last_update
        st["update"] += t4 - t3 + self._last_update
        st["steps"] += 1
        self._last_update = 0.0
        return done

    def _computed(self, out) -> None:
        """After a step is launched: its tokens count as computed (the KV writes are queued) and the
        blocks it completed are cached; sliding blocks out of the window go back."""
        for req in out.requests:
            n = out.num_scheduled_tokens[req.request_id]
            req.num_computed_tokens += n
            self.num_computed_tokens_total += n
            if not req.finished:
                self.pool.cache_full_blocks(req)
                self.pool.release_out_of_window(req)

    def _drain(self) -> list[Request]:
        """Read back the step in flight, launching nothing (not counted in step_times)."""
        got = self._read_back()
        self._last_update = 0.0
        return got

    def _read_back(self) -> list[Request]:
        """Wait for the step in flight's tokens and append them; a request that finished (or was
        aborted) meanwhile drops its token. Returns the requests that got one."""
        samplers, pending = self._inflight
        self._inflight = None
        tokens = pending.tolist()
        t0 = time.perf_counter()
        got = []
        for req, token in zip(samplers, tokens):
            req.num_pending -= 1
            if not req.finished:
                self._append_token(req, token, None)
                got.append(req)
        self._last_update = time.perf_counter() - t0
        return got

    # --- stop checks -----------------------------------------------------------------------------
    def _append_token(self, req: Request, token: int, logprobs) -> None:
        p = req.params
        req.output_token_ids.append(token)
        if req.grammar is not None and not req.grammar.is_terminated():
            if not req.grammar.accept_token(token):  # cannot happen when the mask was applied
                log.warning("request %s: token %d rejected by its grammar", req.request_id, token)
        if req.logprobs is not None and logprobs is not None:
            req.logprobs.append({t: Logprob(lp, rank, decode([t])) for t, (lp, rank) in logprobs.items()})
        new_text = ""
        if token < FIRST_SPECIAL_TOKEN or not p.skip_special_tokens:
            new_text = req.detok.add([token])
            if new_text:
                req.text_parts.append(new_text)
        n_out = len(req.output_token_ids)
        may_stop = n_out >= p.min_tokens
        if may_stop and token in req.eos_token_ids and not p.ignore_eos:
            return self.scheduler.finish(req, "stop", None)
        if may_stop and token in p.stop_token_ids:
            return self.scheduler.finish(req, "stop", token)
        if may_stop and p.stop and new_text:
            # a stop string may straddle the previous text: search the tail it could start in
            longest = max(len(s) for s in p.stop)
            tail = req.text_tail(len(new_text) + longest - 1)
            hits = [(tail.find(s), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, s = min(hits)
                text = req.text
                req.text = text[:len(text) - len(tail) + idx]  # the stop string is not part of the output
                return self.scheduler.finish(req, "stop", s)
        if req.grammar is not None and req.grammar.is_terminated():
            return self.scheduler.finish(req, "stop", None)  # the constrained output is complete
        if n_out >= req.max_output_tokens:
            return self.scheduler.finish(req, "length", None)

    # --- outputs ---------------------------------------------------------------------------------
    @staticmethod
    def completion(req: Request, shared: bool = False) -> CompletionOutput:
        """shared: the token ids as a TokenPrefix of the request's own list (no copy) instead of a list."""
        ids = req.output_token_ids
        return CompletionOutput(req.index, req.text, TokenPrefix(ids) if shared else list(ids), req.finish_reason,
                                req.stop_reason, req.logprobs)

    def request_output(self, reqs: list[Request], prompt: str | None, shared: bool = False) -> RequestOutput:
        first = reqs[0]
        if first.output_prompt is None:  # one copy a request, not one a streamed token (a 32k prompt: ~0.1 ms)
            first.output_prompt = list(first.prompt_token_ids)
        return RequestOutput(first.parent_id, prompt, first.output_prompt,
                             [self.completion(r, shared) for r in reqs], all(r.finished for r in reqs),
                             first.num_cached_tokens)


def _generation_eos(root: Path, mc: ModelConfig) -> list[int]:
    """EOS ids: the config's, plus generation_config.json's when present (<|return|>, <|call|>, ...)."""
    ids = list(mc.eos_token_ids)
    gen = root / "generation_config.json"
    if gen.exists():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids += e if isinstance(e, list) else ([e] if e is not None else [])
        except ValueError:
            log.warning("ignoring unreadable %s", gen)
    return sorted(set(ids))
