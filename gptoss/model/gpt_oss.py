"""The gpt-oss transformer, named after the checkpoint's parts.

Tokens of all sequences in a step are packed into one [T, H] batch; the per-step attention metadata
(block tables, slot mapping, sequence lengths) comes from the forward context, so the signature stays
forward(input_ids, positions).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..engine.forward_context import get_forward_context
from ..kernels.attention import rope_kv_attention
from ..kernels import gemv as gemv_module  # (its switches, read at call time)
from ..kernels.gemv import GemvOptions, embed_norm_linear_rows, linear_rows, linear_rows_route, rms_norm_linear_rows
from ..kernels.router_partials import RouterPartials, new_sums
from ..kernels.rmsnorm import rms_norm
from ..moe import MoESpec, MoEWeights
from ..distributed import ParallelState
from ..profiling import stage
from .rope import RotaryEmbedding

# one-row steps (batch-1 decode) run the attention output projection and the router through
# gemv.linear_rows instead of cuBLAS; switches so that scripts/ab_decode.py can compare in one process
GEMV_O_PROJ = True
GEMV_ROUTER = True
GEMV_QKV = True
NORM_ROUTER = True  # one-row steps: the MLP's norm inside the router GEMV (one kernel less a layer)
NORM_QKV = True     # one-row steps: the attention's norm inside the qkv GEMV (one kernel less a layer)
# one-token steps: the embedding's row gathered by the first layer's qkv GEMV, with its norm (two
# kernels less a step, and the qkv weights stream under PDL while the graph's first kernel reads the step)
EMBED_QKV = True
CHUNK_ORDER_T = True  # one-row steps: the router kernel writes the MoE's input in moe_token's chunk order
# one-row steps through moe_token: the router folded into the o projection (gptoss.kernels.router_partials),
# no router kernel; gate_up and down finish its partial sums
ROUTER_IN_O = True
# the router's [32, 2880] weight: one output column a program, all of K in one step over 8 warps (H100,
# batch-1 step: 1.887 vs 1.904 ms a token with K in two 2048-wide steps over 4 warps)
ROUTER_GEMV = GemvOptions(block_n=1, block_k=4096, num_warps=8)
# qkv [5120, 2880]: two columns a program (H100, one-row kernel, PDL graphs: 11.5 us; four columns on
# a persistent grid 13.3, cuBLAS 13.3; ours takes part in PDL, cuBLAS does not)
QKV_GEMV = GemvOptions()
# qkv with the norm: every program normalises the row itself (K values from L2), so it takes eight
# columns, where the redone norm costs a quarter of its weights' time (H100, batch-1 step: 1.887 vs
# 1.904 ms a token with the norm kernel; at two columns, 2.082 vs 2.015 in the third session)
QKV_NORM_GEMV = GemvOptions(block_n=8)
# o [2880, 4096]: two columns a program, all four K steps loaded before the PDL wait, so that they stream
# while attention runs (it lets o launch before its own wait: attention.TRIGGER_EARLY). Wider K steps
# measured slower in the step
O_GEMV = GemvOptions(preload=4)
# the first layer's qkv with the embedding gathered in (EMBED_QKV): as qkv with its norm
EMBED_QKV_GEMV = QKV_NORM_GEMV
# one-row logits: the unembedding [201088, 2880] through linear_rows, two columns a program: 367 us
# against cuBLAS's 410 (F.linear and addmv alike; H100, `benchmarks/bench_gemv.py --shapes unembed
# --layers 1`: 3.16 TB/s of weights, where a copy moves 2.85), and it takes part in PDL
GEMV_UNEMBED = True
UNEMBED_GEMV = GemvOptions()


def _gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.shape[0] == 1 and x.is_cuda and x.dtype == w.dtype


def _covering(opts: GemvOptions, k: int) -> GemvOptions:
    """opts, or without its preload where its steps would not cover K (a config wider than gpt-oss's)."""
    return opts if opts.covers(k) else dataclasses.replace(opts, preload=1)


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with residual: (norm(x + residual), x + residual), in one kernel."""
        return rms_norm(x, self.weight, self.eps, residual)


class AttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rope: RotaryEmbedding, par: ParallelState,
                 dtype, device):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        # tensor parallelism splits the heads; each rank keeps whole kv heads
        self.num_heads = config.num_attention_heads // par.tp_size
        self.num_kv_heads = max(1, config.num_key_value_heads // par.tp_size)
        # every other layer uses a 128-token sliding window
        self.window = config.sliding_window if config.is_sliding[layer_idx] else None
        self.sm_scale = config.head_dim ** -0.5
        self.rope = rope
        self.par = par
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q, kv
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        # q, k and v fused into one projection, filled row-slice by row-slice by the loader
        self.qkv_weight = _param(q + 2 * kv, config.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = _param(q + 2 * kv, dtype=dtype, device=device)
        self.sinks = _param(self.num_heads, dtype=torch.float32, device=device)
        self.out_weight = _param(config.hidden_size, q, dtype=dtype, device=device)
        self.out_bias = _param(config.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor | None, delta: torch.Tensor | None, positions: torch.Tensor, route=None,
                embed=None):
        """(residual stream, the previous block's output not yet added, in any float dtype) -> the
        same pair after this block: the add is folded into this block's norm. route (one row, no TP:
        MLPBlock.route_args): the o projection also adds the residual and starts the MLP's router,
        and returns (h, u) (linear_rows_route). embed (x None: Transformer.embeds): (ids, table), the
        one token's embedding row gathered by the qkv GEMV itself."""
        ctx = get_forward_context()
        gemv = embed is not None or GEMV_QKV and _gemv_ok(x, self.qkv_weight)
        with stage("attn.qkv"):
            if embed is not None:
                _, x, qkv = embed_norm_linear_rows(*embed, self.norm.weight, self.norm.eps, self.qkv_weight,
                                                   self.qkv_bias, _covering(EMBED_QKV_GEMV, self.qkv_weight.shape[1]))
            elif gemv and NORM_QKV and delta is not None:
                _, x, qkv = rms_norm_linear_rows(x, delta, self.norm.weight, self.norm.eps, self.qkv_weight,
                                                 self.qkv_bias, QKV_NORM_GEMV)
            else:
                t, x = self.norm(x, delta) if delta is not None else (self.norm(x), x)
                if gemv:
                    qkv = linear_rows(t, self.qkv_weight, self.qkv_bias, QKV_GEMV)
                else:
                    qkv = F.linear(t, self.qkv_weight, self.qkv_bias)  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # [T, Hq, D]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [T, Hkv, D]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        cache = ctx.kv_caches[self.layer_idx]
        # sliding layers may keep their blocks in a group of their own (only the window is held)
        own = self.window is not None and ctx.swa_block_tables is not None
        tables = ctx.swa_block_tables if own else ctx.block_tables
        slots = ctx.swa_slot_mapping if own else ctx.slot_mapping
        with stage("attn.core"):  # rope + KV write + attention (one kernel at decode)
            o = rope_kv_attention(q, k, v, positions, self.rope.cos, self.rope.sin, cache.k, cache.v, slots,
                                  tables, ctx.query_start_loc, ctx.seq_lens, ctx.max_query_len, ctx.max_seq_len,
                                  self.sinks, self.sm_scale, self.window, cache.k_scale, cache.v_scale)
        with stage("attn.out"):
            # only rank 0 adds the bias, so the all-reduce sums it once
            bias = self.out_bias if self.par.tp_rank == 0 else None
            o = o.flatten(1)
            if route is not None:
                return linear_rows_route(o, self.out_weight, bias, x, *route, opts=_covering(O_GEMV, o.shape[1]))
            if GEMV_O_PROJ and _gemv_ok(o, self.out_weight):
                # batch-1 decode: 9.3 us vs cuBLAS 14.2 (20b, H100)
                o = linear_rows(o, self.out_weight, bias, _covering(O_GEMV, o.shape[1]))
            else:
                o = F.linear(o, self.out_weight, bias)
        return x, self.par.all_reduce(o)


def _tensors_of(obj, depth: int = 2) -> list[torch.Tensor]:
    """The tensors an object holds in its attributes, and in theirs (dataclasses, lists), depth levels down."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth < 0:
        return []
    if isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ()))
        items = [getattr(obj, n, None) for n in names]
    else:
        return []
    return [t for x in items for t in _tensors_of(x, depth - 1)]


class MLPBlock(nn.Module):
    def __init__(self, config: ModelConfig, spec: MoESpec, par: ParallelState, dtype, device):
        super().__init__()
        self.spec = spec
        self.par = par
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.router_weight = _param(config.num_local_experts, config.hidden_size, dtype=dtype, device=device)
        self.router_bias = _param(config.num_local_experts, dtype=dtype, device=device)
        E, I2, H = spec.local_experts, 2 * spec.intermediate_size, config.hidden_size
        u8 = torch.uint8
        # MXFP4 experts stay packed as in the checkpoint; the backend may re-lay them out once
        self.gate_up_blocks = _param(E, I2, H // 32, 16, dtype=u8, device=device)
        self.gate_up_scales = _param(E, I2, H // 32, dtype=u8, device=device)
        self.gate_up_bias = _param(E, I2, dtype=dtype, device=device)
        self.down_blocks = _param(E, H, I2 // 64, 16, dtype=u8, device=device)
        self.down_scales = _param(E, H, I2 // 64, dtype=u8, device=device)
        self.down_bias = _param(E, H, dtype=dtype, device=device)
        self.experts = None  # the MoE backend, built by bind_moe_backend after loading
        # the router's partial sums of this layer and the next (Transformer.bind_moe_backend; ROUTER_IN_O)
        self.router_sums: torch.Tensor | None = None
        self.router_sums_next: torch.Tensor | None = None

    def bind_moe_backend(self, backend_cls, dtype) -> None:
        w = MoEWeights(self.gate_up_blocks.data, self.gate_up_scales.data, self.gate_up_bias.data,
                       self.down_blocks.data, self.down_scales.data, self.down_bias.data)
        self.experts = backend_cls(w, self.spec, dtype)
        # a backend that re-laid the MXFP4 tensors (the Triton ones) holds its own copy: free the
        # checkpoint's, which would otherwise double the experts' memory (60 GB for the 120b)
        held = {t.untyped_storage().data_ptr() for t in _tensors_of(self.experts)}
        for p in (self.gate_up_blocks, self.gate_up_scales, self.down_blocks, self.down_scales):
            if p.data.untyped_storage().data_ptr() not in held:
                p.data = p.data.new_empty(0)

    def route_args(self, x: torch.Tensor):
        """What the o projection takes to start this block's router (AttentionBlock.forward's route),
        or None where the router runs here: a one-row step on one GPU through the token kernels."""
        if not (ROUTER_IN_O and GEMV_O_PROJ and self.router_sums is not None and self.par.tp_size == 1
                and _gemv_ok(x, self.router_weight) and self.experts.takes_router_partials(1)):
            return None
        return self.norm.weight, self.router_weight, self.router_sums, self.router_sums_next

    def forward_routed(self, h: torch.Tensor, u: torch.Tensor):
        """forward after an o projection that took route_args: h the residual stream, u = norm weight * h
        in the chunk order."""
        with stage("moe.experts"):
            p = RouterPartials(self.router_sums, self.router_bias, self.norm.eps, h.shape[1], self.router_weight.shape[0])
            return h, self.experts.forward_sum(u, None, x_chunk_order=True, router_partials=p)

    def forward(self, x: torch.Tensor, delta: torch.Tensor):
        chunked = False
        with stage("moe.router"):
            if GEMV_ROUTER and NORM_ROUTER and _gemv_ok(x, self.router_weight):
                # one token through moe_token: t written in the chunk order its gate_up loads fastest
                chunked = CHUNK_ORDER_T and self.experts.takes_chunk_order(1)  # (a MoEBackend: registry checks)
                t, x, logits = rms_norm_linear_rows(x, delta, self.norm.weight, self.norm.eps, self.router_weight,
                                                    self.router_bias, ROUTER_GEMV, t_chunk_order=chunked)
            else:
                t, x = self.norm(x, delta)
                if GEMV_ROUTER and _gemv_ok(t, self.router_weight):
                    logits = linear_rows(t, self.router_weight, self.router_bias, ROUTER_GEMV)
                else:
                    logits = F.linear(t, self.router_weight, self.router_bias)  # [T, E]
        with stage("moe.experts"):
            # the backend's own sum (float32 from Triton's fused combine): the next norm adds it to the
            # residual stream without a cast kernel between; ranks all-reduce in the model dtype
            y = (self.experts.forward_sum(t, logits, x_chunk_order=True) if chunked
                 else self.experts.forward_sum(t, logits))
        if self.par.tp_size > 1:
            y = y.to(x.dtype)
        return x, self.par.all_reduce(y)


class TransformerBlock(nn.Module):
    def __init__(self, config, layer_idx, rope, spec, par, dtype, device):
        super().__init__()
        self.attn = AttentionBlock(config, layer_idx, rope, par, dtype, device)
        self.mlp = MLPBlock(config, spec, par, dtype, device)

    def forward(self, x: torch.Tensor | None, delta: torch.Tensor | None, positions: torch.Tensor, embed=None):
        """embed (the first block of a one-token step, x None): (ids, table), gathered by the qkv GEMV."""
        route = self.mlp.route_args(x if embed is None else embed[1][:1])  # (a table row: one row's shape)
        if route is not None:
            return self.mlp.forward_routed(*self.attn(x, delta, positions, route, embed))
        return self.mlp(*self.attn(x, delta, positions, embed=embed))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, max_positions: int,
                 par: ParallelState | None = None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.par = par = par or ParallelState()
        self.moe_spec = par.moe_spec(config)
        rope = RotaryEmbedding(config, max_positions, device)
        self.embedding = _param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(TransformerBlock(config, i, rope, self.moe_spec, par, dtype, device)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.unembedding = _param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)

    def bind_moe_backend(self, backend_cls) -> None:
        for layer in self.layers:
            layer.mlp.bind_moe_backend(backend_cls, self.dtype)
        # ROUTER_IN_O: a buffer of router sums a layer, each o projection zeroing the next layer's
        # (router_partials), which takes two layers or more
        n = len(self.layers)
        if n >= 2:
            sums = [new_sums(self.config.num_local_experts, self.embedding.device) for _ in range(n)]
            for i, layer in enumerate(self.layers):
                layer.mlp.router_sums, layer.mlp.router_sums_next = sums[i], sums[(i + 1) % n]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """-> the hidden states [T, H], or with logits every row's logits [T, vocab]: the decode graphs,
        whose rows all sample, so the last block's residual add runs inside the final norm's kernel
        (eager steps unembed only their sampling rows, through compute_logits)."""
        embed = (input_ids, self.embedding) if self.embeds(input_ids) else None
        x, delta = None if embed else F.embedding(input_ids, self.embedding), None  # [T, H]
        for layer in self.layers:
            x, delta = layer(x, delta, positions, embed)
            embed = None
        if logits:
            return self.compute_logits(x, delta)
        return (x + delta).to(x.dtype)  # delta may be a float32 MoE sum

    def embeds(self, input_ids: torch.Tensor) -> bool:
        """Whether the first block's qkv GEMV gathers the embedding row itself: one token on the GPU,
        through the GEMV with the norm (EMBED_QKV)."""
        w = self.layers[0].attn.qkv_weight if self.layers else None
        return (EMBED_QKV and GEMV_QKV and NORM_QKV and gemv_module.ONE_ROW_PATH and w is not None
                and input_ids.shape == (1,) and input_ids.dtype == torch.int64 and _gemv_ok(self.embedding[:1], w))

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [S, H] (the rows that sample; with residual, hidden + residual, summed inside the norm's
        kernel) -> logits [S, vocab] in the model dtype: the sampler takes the argmax of greedy rows as
        they are and makes an fp32 copy only when it edits them."""
        with stage("unembed"):
            t = self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]
            if GEMV_UNEMBED and _gemv_ok(t, self.unembedding):
                return linear_rows(t, self.unembedding, None, UNEMBED_GEMV)
            return F.linear(t, self.unembedding)
