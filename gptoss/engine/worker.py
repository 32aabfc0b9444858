"""One rank's share of the model: its weights (a slice of heads and experts), its KV cache, its runner.

Rank 0 lives in the engine's process; with tensor parallelism the other ranks build the same Worker
in their own processes (engine/tp.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import EngineConfig, ModelConfig
from ..distributed import ParallelState
from ..model.gpt_oss import Transformer
from ..model.weights import load_weights
from ..moe import get_moe_backend
from .kv_cache import KVLayout, allocate_kv_caches, kv_storage_dtype
from .model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, root: Path, mc: ModelConfig, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, par: ParallelState, progress: bool):
        backend_cls = get_moe_backend(config.moe_backend, device, mc)
        self.moe_backend = backend_cls.name
        self.graph_safe = backend_cls.graph_safe
        self.device, self.dtype, self.mc = device, dtype, mc
        self.model = Transformer(mc, dtype, device, max_model_len, par)
        load_weights(self.model, root, progress=progress and par.tp_rank == 0)
        self.model.bind_moe_backend(backend_cls)
        self.num_kv_heads = self.model.layers[0].attn.num_kv_heads

    def kv_budget_that_fits(self, config: EngineConfig) -> int:
        """KV bytes that fit beside the weights under gpu_memory_utilization, with the activations of
        the largest step estimated (used where a profiling forward cannot run alone: TP ranks)."""
        mc = self.mc
        tokens = config.max_num_batched_tokens or 8192
        # residual stream, qkv, attention out, MoE gather/intermediate (top-k rows), fp32 logits
        act = tokens * mc.hidden_size * 4 * (8 + 4 * mc.num_experts_per_tok) + config.max_num_seqs * mc.vocab_size * 12
        free, total = torch.cuda.mem_get_info(self.device)
        return max(0, int(total * config.gpu_memory_utilization) - (total - free) - act)

    def uses_cuda_graphs(self, config: EngineConfig) -> bool:
        """The same answer on every rank (same config, same backend), so TP ranks capture together."""
        return self.device.type == "cuda" and not config.enforce_eager and self.graph_safe

    def init_runner(self, layout: KVLayout, config: EngineConfig, group=None) -> ModelRunner:
        kv = allocate_kv_caches(layout, self.mc.is_sliding, config.block_size, self.num_kv_heads, self.mc.head_dim,
                                kv_storage_dtype(config.kv_cache_dtype, self.dtype), config.kv_cache_dtype == "fp8",
                                self.device)
        return ModelRunner(self.model, kv, config.block_size, self.device, config.seed, group)
