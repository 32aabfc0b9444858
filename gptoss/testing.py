"""Random gpt-oss checkpoints in the exact HF layout: the fixture for every test and benchmark.

    from gptoss.testing import make_checkpoint
    path = make_checkpoint("/tmp/tiny", preset="tiny", seed=0)

Weights are drawn so that activations stay in a realistic range: every projection has std
1/sqrt(fan_in), so normalised inputs give unit-scale outputs and the logits have std about 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import ModelConfig
from .quant.mxfp4 import quantize_mxfp4

PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_local_experts=128),
    # tiny keeps the real vocabulary (so harmony's tokens exist) and shrinks everything else
    "tiny": ModelConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=8, max_position_embeddings=8192, rope_original_max_position=256),
}


def preset_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    cfg = replace(cfg, layer_types=[], **overrides)  # layer_types rebuilt for the layer count
    return cfg


def _tensors_for_layer(cfg: ModelConfig, i: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    nq, nkv, d = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    bf = torch.bfloat16

    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(bf)

    p = f"model.layers.{i}."
    t = {
        p + "input_layernorm.weight": (1 + 0.1 * torch.randn(H, generator=gen, device=device)).to(bf),
        p + "post_attention_layernorm.weight": (1 + 0.1 * torch.randn(H, generator=gen, device=device)).to(bf),
        p + "self_attn.q_proj.weight": normal(nq, H, std=H ** -0.5),
        p + "self_attn.q_proj.bias": normal(nq, std=0.1),
        p + "self_attn.k_proj.weight": normal(nkv, H, std=H ** -0.5),
        p + "self_attn.k_proj.bias": normal(nkv, std=0.1),
        p + "self_attn.v_proj.weight": normal(nkv, H, std=H ** -0.5),
        p + "self_attn.v_proj.bias": normal(nkv, std=0.1),
        p + "self_attn.o_proj.weight": normal(H, nq, std=nq ** -0.5),
        p + "self_attn.o_proj.bias": normal(H, std=0.1),
        p + "self_attn.sinks": normal(cfg.num_attention_heads, std=1.0),
        p + "mlp.router.weight": normal(E, H, std=H ** -0.5),
        p + "mlp.router.bias": normal(E, std=0.1),
        p + "mlp.experts.gate_up_proj_bias": normal(E, 2 * I, std=0.1),
        p + "mlp.experts.down_proj_bias": normal(E, H, std=0.1),
    }
    # experts: quantize gaussian weights to MXFP4 a few experts at a time to bound the memory
    for name, (rows, cols) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        blocks, scales = [], []
        step = max(1, (1 << 27) // (rows * cols))
        for e0 in range(0, E, step):
            n = min(step, E - e0)
            w = torch.randn(n, rows, cols, generator=gen, device=device) * cols ** -0.5
            b, s = quantize_mxfp4(w)
            blocks.append(b)
            scales.append(s)
        t[p + f"mlp.experts.{name}_blocks"] = torch.cat(blocks)
        t[p + f"mlp.experts.{name}_scales"] = torch.cat(scales)
    return t


def make_checkpoint(path: str | os.PathLike, preset: str = "tiny", seed: int = 0, *,
                    num_shards: int | None = None, device: str | None = None,
                    max_shard_bytes: int = 5 << 30, progress: bool = False, **overrides) -> Path:
    """Write config.json + safetensors (sharded with model.safetensors.index.json when more than
    one shard) of a random gpt-oss model. Returns the directory."""
    from safetensors.torch import save_file

    cfg = preset_config(preset, **overrides)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    t0 = time.time()

    # groups of tensors, written shard by shard so the host never holds the whole model
    def groups():
        H, V = cfg.hidden_size, cfg.vocab_size
        yield {"model.embed_tokens.weight": torch.randn(V, H, generator=gen, device=device).to(torch.bfloat16)}
        for i in range(cfg.num_hidden_layers):
            yield _tensors_for_layer(cfg, i, gen, device)
            if progress:
                print(f"  layer {i + 1}/{cfg.num_hidden_layers} ({time.time() - t0:.1f}s)", flush=True)
        yield {"model.norm.weight": (1 + 0.1 * torch.randn(H, generator=gen, device=device)).to(torch.bfloat16),
               "lm_head.weight": (torch.randn(V, H, generator=gen, device=device) * H ** -0.5).to(torch.bfloat16)}

    # shard plan: either a fixed number of shards (by layer groups) or by size
    pending: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    written: list[tuple[str, list[str], int]] = []
    all_groups = list(groups()) if num_shards else None

    def flush(tensors: dict[str, torch.Tensor]) -> None:
        idx = len(written)
        fname = f"_shard{idx}.safetensors"
        host = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(host, str(out / fname), metadata={"format": "pt"})
        written.append((fname, list(host), sum(v.numel() * v.element_size() for v in host.values())))

    if all_groups is not None:
        per = -(-len(all_groups) // num_shards)
        for s in range(0, len(all_groups), per):
            merged = {}
            for g in all_groups[s:s + per]:
                merged.update(g)
            flush(merged)
    else:
        size = 0
        for g in groups():
            gsize = sum(v.numel() * v.element_size() for v in g.values())
            if pending and size + gsize > max_shard_bytes:
                flush(pending)
                pending, size = {}, 0
            pending.update(g)
            size += gsize
        if pending:
            flush(pending)
    del shards

    # rename to the hub's names and write the index
    n = len(written)
    weight_map, total = {}, 0
    for idx, (tmp, names, nbytes) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{idx:05d}-of-{n - 1:05d}.safetensors"
        os.replace(out / tmp, out / final)
        for name in names:
            weight_map[name] = final
        total += nbytes
    if n > 1:
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif (out / "model.safetensors.index.json").exists():
        os.remove(out / "model.safetensors.index.json")
    with open(out / "config.json", "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    with open(out / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012],
                   "pad_token_id": 199999, "do_sample": True}, f, indent=2)
    return out


@contextlib.contextmanager
def llm_or_tiny(model: str | None = None, **kwargs):
    """LLM(model, **kwargs); without a model, an LLM over a tiny random checkpoint in a temporary
    directory (CPU, float32), removed afterwards: how the examples and notebooks run offline."""
    from . import LLM
    if model:
        yield LLM(model, **kwargs)
        return
    with tempfile.TemporaryDirectory(prefix="gptoss-tiny-") as d:
        path = make_checkpoint(d, preset="tiny", seed=0, device="cpu")
        yield LLM(str(path), **{"dtype": "float32", "device": "cpu", "max_model_len": 1024, "progress": False,
                                **kwargs})
