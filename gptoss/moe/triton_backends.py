"""The Triton MoE backends: "triton" (bf16 x MXFP4, the Hopper default), "triton_fp8" (e4m3 with
per-token dynamic scales x MXFP4 on fp8 tensor cores), "triton_mxfp8" (mxfp8 x MXFP4 through
tl.dot_scaled: native on Blackwell, emulated by Triton elsewhere).

One forward: routing (gptoss.kernels.moe_routing: top-k and the rows grouped per local expert on the
GPU, no host sync) -> gate_up GEMM with bias + SwiGLU -> down GEMM with bias, routing weight and the
top-k combine (gptoss.kernels.moe_gemm); one token on "fragments" weights runs no routing kernel and
gptoss.kernels.moe_token's two mma.sync GEMMs instead (gate_up routes the token). The spec's expert
slice (expert_start, num_local_experts), intermediate slice and add_down_bias make the same kernels
serve tensor and expert parallelism.
Tile configs per token count are in `fragments_config` ("triton"'s default weight layout, see
gptoss.kernels.moe_weights.swizzle_fragments) and `default_config` (the others), measured on H100
(benchmarks/bench_moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..kernels import moe_token
from ..kernels.moe_gemm import INTERPRETED, GemmOptions, gate_up_workspace_size, moe_down, moe_gate_up, row_absmax
from ..kernels.moe_weights import prepare_mxfp4_weight
from ..kernels.moe_routing import RoutingOptions, inline_routing, moe_routing, partial_routing
from ..profiling import stage
from .base import MoEBackend, MoESpec, MoEWeights
from .registry import register_moe_backend

# one token (batch-1 decode): no routing kernel, moe_gate_up routes the token itself (H100, 20b:
# the routing kernel cost 2-3 us a layer in the decode step)
INLINE_ROUTING = True
# one token on "fragments" weights: gptoss.kernels.moe_token's mma.sync GEMMs instead of moe_gemm's
TOKEN_KERNELS = True


@dataclass(frozen=True)
class MoEKernelConfig:
    """Everything the kernels of one forward are launched with."""
    block_m: int = 16
    gate_up: GemmOptions = GemmOptions()
    down: GemmOptions = GemmOptions()
    fused_combine: bool = False


def default_config(num_tokens: int, spec: MoESpec, act: str, block_k: int = 0) -> MoEKernelConfig:
    """Tiles by rows per local expert (num_tokens * top_k / experts), the fastest of the sweeps in
    benchmarks/bench_moe.py on H100 (gpt-oss-20b layer). block_k: the weights' k-blocked layout
    (0: the checkpoint's row layout, any block_k)."""
    rows = num_tokens * spec.top_k / spec.local_experts
    if rows <= 16:  # decode: the weights stream once, over many small programs
        if act == "bf16":  # the asm upcast ("bf16x2" weights) cannot take swap_ab
            # split-K gives the GEMMs more programs (the partial sums meet in fp32 atomics): below one
            # row per expert both GEMMs (H100, 1 token: 52.0 us a layer, 56.3 with gate_up unsplit),
            # below four the down GEMM (8 tokens: 171 us); from four rows (32+ tokens) wider down tiles
            # (64 tokens: 266 us, 289 with the tiles of 8)
            if rows < 1:
                bk = block_k or 128
                return MoEKernelConfig(block_m=16, gate_up=GemmOptions(64, bk, 4, 3, split_k=4),
                                       down=GemmOptions(64, bk, 4, 3, split_k=4), fused_combine=True)
            bk = block_k or 64
            down = GemmOptions(64, bk, 4, 3, split_k=2) if rows < 4 else GemmOptions(128, block_k or 128, 4, 3)
            return MoEKernelConfig(block_m=16, gate_up=GemmOptions(64, bk, 4, 3), down=down, fused_combine=True)
        bk = block_k or 128
        return MoEKernelConfig(
            block_m=16,
            gate_up=GemmOptions(block_n=128, block_k=bk, num_warps=4, num_stages=4, swap_ab=True),
            down=GemmOptions(block_n=128, block_k=bk, num_warps=4, num_stages=4, swap_ab=True, split_k=2),
            fused_combine=True)
    bk = block_k or 64
    if rows <= 96:  # batch 128-768 decode (256 tokens: 368 us a layer, 392 with 128-wide gate_up tiles)
        gate_up = GemmOptions(256, bk, 8, 3) if act == "bf16" else GemmOptions(128, bk, 4, 4)
        return MoEKernelConfig(block_m=64, gate_up=gate_up, down=GemmOptions(128, bk, 8, 3), fused_combine=True)
    return MoEKernelConfig(
        block_m=128,
        gate_up=GemmOptions(block_n=128, block_k=bk, num_warps=8, num_stages=3),
        down=GemmOptions(block_n=128, block_k=bk, num_warps=4, num_stages=4))


def fragments_config(num_tokens: int, spec: MoESpec) -> MoEKernelConfig:
    """Tiles for the "fragments" weight layout (always swap_ab: the token rows are the MMA's N side),
    the fastest of `benchmarks/bench_moe.py --sweep --upcasts fragments` on H100 (20b layer, gate_up +
    down us: 1 token 26.3 + 16.5, 8: 93.6 + 54.6, 64: 137.3 + 77.2, 256: 187.9 + 113.9, 2048: 681.2
    + 399.8)."""
    rows = num_tokens * spec.top_k / spec.local_experts
    if rows <= 16:  # decode: split-K below one row per expert (both GEMMs) and below four (down)
        split_up, split_down = (4, 4) if rows < 1 else (1, 2) if rows < 4 else (1, 1)
        # below one row per expert down takes 128-row tiles (H100, 4 layers a call, one token: 10.8 vs
        # 11.6 us with 64-row tiles capped at 80 registers; in the whole decode step 1.3 us a layer less)
        down = GemmOptions(128 if rows < 1 else 64, 128, 4, 3, swap_ab=True, split_k=split_down)
        return MoEKernelConfig(block_m=16, gate_up=GemmOptions(64, 128, 4, 3, swap_ab=True, split_k=split_up),
                               down=down, fused_combine=True)
    if rows <= 96:  # batch 128-768 decode
        return MoEKernelConfig(block_m=64, gate_up=GemmOptions(128, 64, 4, 4, swap_ab=True),
                               down=GemmOptions(128, 64, 4, 4, swap_ab=True))
    return MoEKernelConfig(block_m=128, gate_up=GemmOptions(128, 64, 8, 3, swap_ab=True),
                           down=GemmOptions(128, 64, 4, 4, swap_ab=True))


def _supported(device: torch.device, min_cc: tuple[int, int], what: str) -> tuple[bool, str]:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        cc = torch.cuda.get_device_capability(device)
        if cc < min_cc:
            return False, (f"{what} needs compute capability >= {min_cc[0]}.{min_cc[1]}, "
                           f"this GPU has {cc[0]}.{cc[1]}")
        return True, ""
    if device.type == "cpu":
        if INTERPRETED:
            return True, ""
        return False, ("Triton kernels need a CUDA GPU; on CPU they run only under Triton's interpreter "
                       "(TRITON_INTERPRET=1 before gptoss is imported; slow, for tests)")
    return False, f"device type {device.type!r} is not supported (CUDA GPUs)"


class _TritonMoE(MoEBackend):
    # routing and both GEMMs launch with host-known grids and never sync (tests/test_moe_backends.py
    # captures and replays a forward), so decode steps can run as CUDA graphs
    graph_safe = True
    act: ClassVar[str] = "bf16"
    min_cc: ClassVar[tuple[int, int]] = (8, 0)
    what: ClassVar[str] = ""
    upcasts: ClassVar[tuple[str, ...]] = ("dot_scaled",)
    default_upcast: ClassVar[str] = "dot_scaled"

    @classmethod
    def is_supported(cls, device, config):
        return _supported(torch.device(device), cls.min_cc, cls.what)

    def __init__(self, weights: MoEWeights, spec: MoESpec, dtype: torch.dtype, *,
                 config: MoEKernelConfig | Callable[[int], MoEKernelConfig] | None = None,
                 layout_block_k: int = 0, upcast: str | None = None):
        """config: one MoEKernelConfig, or tokens -> config; None: default_config. layout_block_k:
        0 keeps the checkpoint's row layout; a power of two re-lays the weights k-blocked (each tile
        one contiguous run) and every config must then use that block_k. upcast ("triton" only):
        "asm" re-packs the codes once ("bf16x2" encoding) for our inline-asm upcast + tl.dot,
        "fragments" also stores each MMA lane's bytes together (swizzle_fragments; swap_ab configs),
        "dot_scaled" keeps the checkpoint codes for tl.dot_scaled."""
        super().__init__(weights, spec, dtype)
        if upcast is None:
            upcast = self.default_upcast
            if upcast == "fragments" and (layout_block_k or weights.gate_up_blocks.shape[1] % 16
                                          or weights.down_blocks.shape[1] % 16):
                upcast = "asm"  # the fragments layout takes weight rows in groups of 16, not k-blocked
        if upcast not in self.upcasts:
            raise ValueError(f"{self.name}: upcast={upcast!r}; choose one of {self.upcasts}")
        fp8 = self.act == "fp8"
        enc = "bf16x2" if upcast in ("asm", "fragments") else "e2m1"
        frag = upcast == "fragments"
        self.layout_block_k = layout_block_k
        self.upcast = upcast
        self.w1 = prepare_mxfp4_weight(weights.gate_up_blocks, weights.gate_up_scales, layout_block_k, fp8, enc, frag)
        self.w2 = prepare_mxfp4_weight(weights.down_blocks, weights.down_scales, layout_block_k, fp8, enc, frag)
        self.b1 = weights.gate_up_bias.float().contiguous()
        self.b2 = weights.down_bias.float().contiguous() if spec.add_down_bias else None
        self._config = config
        self._token = (self.act == "bf16" and dtype == torch.bfloat16 and moe_token.supported(self.w1)
                       and moe_token.supported(self.w2))

    @property
    def _token_kernels(self) -> bool:
        """One token goes to gptoss.kernels.moe_token (unless a config was given, or switched off)."""
        return TOKEN_KERNELS and self._token and self._config is None

    # split-K gate_up workspaces (zero between calls: the kernel clears what it used), one per device,
    # shared by the layers, which run one after another on the device's stream. One outgrown stays
    # allocated: CUDA graphs captured with it keep its address.
    _workspaces: ClassVar[dict[torch.device, torch.Tensor]] = {}
    _outgrown: ClassVar[list[torch.Tensor]] = []

    @classmethod
    def _workspace(cls, n: int, device: torch.device) -> torch.Tensor | None:
        """A zeroed float32 workspace of at least n elements. It grows in eager steps (a CUDA graph's
        warm-up step runs first, and a short prompt's prefill may need more than the graphs did), so
        no memset lands in a captured graph; it at least doubles when it grows."""
        if n == 0:
            return None
        ws = cls._workspaces.get(device)
        if ws is None or ws.numel() < n:
            if ws is not None:
                cls._outgrown.append(ws)
            size = max(n, 1 << 16, 2 * ws.numel() if ws is not None else 0)
            ws = cls._workspaces[device] = torch.zeros(size, dtype=torch.float32, device=device)
        return ws

    def config_for(self, num_tokens: int) -> MoEKernelConfig:
        if isinstance(self._config, MoEKernelConfig):
            return self._config
        if self._config is not None:
            return self._config(num_tokens)
        if self.upcast == "fragments":
            return fragments_config(num_tokens, self.spec)
        return default_config(num_tokens, self.spec, self.act, self.layout_block_k)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_sum(x, router_logits).to(x.dtype)

    def takes_chunk_order(self, num_tokens: int) -> bool:
        """One token through moe_token: its gate_up reads a lane's x words as two 16-byte loads."""
        return num_tokens == 1 and INLINE_ROUTING and self._token_kernels

    def takes_router_partials(self, num_tokens: int) -> bool:
        """One token through moe_token, of a router one warp's keys rank (moe_token.PARTIALS_MAX_EXPERTS):
        its gate_up and down finish the router's partial sums."""
        return self.takes_chunk_order(num_tokens) and self.spec.num_experts <= moe_token.PARTIALS_MAX_EXPERTS

    def forward_sum(self, x: torch.Tensor, router_logits: torch.Tensor | None, x_chunk_order: bool = False,
                    router_partials=None) -> torch.Tensor:
        """With fused_combine the float32 sum the down GEMM's atomics built (no cast kernel), else x.dtype.
        x_chunk_order: one token's x [1, chunk_width(H)] in moe_token's chunk order. router_partials:
        see MoEBackend.forward_sum (x in the chunk order)."""
        spec = self.spec
        if router_partials is not None and not (x_chunk_order and self.takes_router_partials(x.shape[0])):
            raise ValueError(f"{self.name}: router partial sums take one token in the chunk order through "
                             f"the token kernels (got {x.shape[0]} tokens, x_chunk_order={x_chunk_order})")
        if x_chunk_order and not self.takes_chunk_order(x.shape[0]):
            x, x_chunk_order = moe_token.natural_order(x, spec.hidden_size), False
        cfg = self.config_for(x.shape[0])
        if x.stride(-1) != 1:
            x = x.contiguous()
        with stage("moe.route"):
            opts = RoutingOptions(block_m=cfg.block_m)
            if router_partials is not None:
                routing = partial_routing(router_partials, spec.top_k, spec.expert_start, spec.local_experts, opts)
            else:
                route = inline_routing if INLINE_ROUTING and x.shape[0] == 1 else moe_routing
                routing = route(router_logits, spec.top_k, spec.expert_start, spec.local_experts, opts)
        if (routing.logits is not None or routing.partials is not None) and self._token_kernels:
            out = torch.empty(1, self.w2.n, dtype=torch.float32, device=x.device)
            with stage("moe.w1"):
                a = moe_token.token_gate_up(x, routing, self.w1, self.b1, spec.swiglu_alpha, spec.swiglu_limit,
                                            zero=out, x_chunk_order=x_chunk_order)
            with stage("moe.w2"):
                return moe_token.token_down(a, routing, self.w2, self.b2, out)
        # no memset between the kernels: gate_up's split-K workspace is kept zero by the kernel itself,
        # and gate_up zeroes the fused combine's output on its way
        workspace = self._workspace(gate_up_workspace_size(routing, self.w1, cfg.gate_up), x.device)
        out = torch.empty(x.shape[0], self.w2.n, dtype=torch.float32, device=x.device) if cfg.fused_combine else None
        x_amax = row_absmax(x) if self.act == "fp8" else None
        with stage("moe.w1"):
            a, a_amax = moe_gate_up(x, routing, self.w1, self.b1, self.act, spec.swiglu_alpha,
                                    spec.swiglu_limit, cfg.gate_up, x_amax, workspace, out)
        with stage("moe.w2"):
            return moe_down(a, a_amax, routing, self.w2, self.b2, self.act, cfg.down, spec.expert_start,
                            spec.local_experts, cfg.fused_combine,
                            torch.float32 if cfg.fused_combine else x.dtype, out)


@register_moe_backend("triton")
class TritonMoE(_TritonMoE):
    """bf16 activations x MXFP4 weights."""
    act = "bf16"
    min_cc = (9, 0)  # mul.bf16x2 in the asm upcast
    upcasts = ("asm", "fragments", "dot_scaled")
    default_upcast = "fragments"
    what = "the triton MoE backend (bf16 x MXFP4; its upcast uses mul.bf16x2)"


@register_moe_backend("triton_fp8")
class TritonFp8MoE(_TritonMoE):
    """e4m3 activations (dynamic per-token scales) x MXFP4 weights on fp8 tensor cores."""
    act = "fp8"
    upcasts = ("fp8",)
    default_upcast = "fp8"
    min_cc = (8, 9)
    what = "fp8 tensor cores (triton_fp8)"


@register_moe_backend("triton_mxfp8")
class TritonMxfp8MoE(_TritonMoE):
    """mxfp8 activations x MXFP4 weights through tl.dot_scaled (native on sm_100, emulated before)."""
    act = "mxfp8"
    min_cc = (8, 0)
    what = "the triton_mxfp8 MoE backend (tl.dot_scaled, emulated below sm_100)"
