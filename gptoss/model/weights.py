"""Checkpoint loading: a table from checkpoint tensor names to the model's parameters.

Reads a local directory or a hub repo id; single-file or sharded safetensors with an index. Tensors
are read one at a time from memory-mapped files straight into pre-allocated parameters, so peak
host memory stays near one tensor beyond the model itself, and the MXFP4 experts stay packed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and its file."""


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory as is; anything else is a hub repo id fetched (or found in the cache)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a hub repo id "
                              f"like 'openai/gpt-oss-20b'")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline with no cached copy, unknown repo, no auth...
        raise CheckpointError(
            f"could not get {model!r} from the Hugging Face hub ({type(e).__name__}: {e}). Download it "
            f"on a machine with internet (`huggingface-cli download {model} --local-dir DIR`) and pass "
            f"DIR as the model, or set HF_HOME to a cache that holds it") from None


def checkpoint_files(root: Path) -> dict[str, Path]:
    """{tensor name: file} from model.safetensors.index.json, or from the single file(s) present."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        out = {}
        for name, fname in weight_map.items():
            f = root / fname
            if not f.exists():
                raise CheckpointError(f"{index} maps {name!r} to {fname}, which does not exist in {root}")
            out[name] = f
        return out
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {root}")
    from safetensors import safe_open
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                out[name] = f
    return out


@dataclass(slots=True)
class Target:
    param: torch.Tensor                 # where the tensor goes
    shape: tuple[int, ...]              # the shape the checkpoint must have
    src: tuple = ()                     # slices of the checkpoint tensor this rank takes (TP/EP)
    dst_rows: slice | None = None       # rows of a fused parameter (q/k/v into qkv)


def _rows(rank: int, n: int) -> slice:
    return slice(rank * n, (rank + 1) * n)


def checkpoint_table(model) -> dict[str, Target]:
    """Every tensor the checkpoint must hold, with the parameter (slice) it fills."""
    cfg, par = model.config, model.par
    H, V, E, I, D = (cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts, cfg.intermediate_size,
                     cfg.head_dim)
    nq, nkv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    table = {
        "model.embed_tokens.weight": Target(model.embedding, (V, H)),
        "model.norm.weight": Target(model.norm.weight, (H,)),
        "lm_head.weight": Target(model.unembedding, (V, H)),
    }
    spec = model.moe_spec
    r = par.tp_rank
    for i, layer in enumerate(model.layers):
        a, m, p = layer.attn, layer.mlp, f"model.layers.{i}."
        # tensor parallelism: rank r takes its q heads and the kv head(s) they read
        q_rows = _rows(r, a.q_size)
        kv_start = (r * cfg.num_key_value_heads // par.tp_size) * D
        kv_rows = slice(kv_start, kv_start + a.kv_size)
        qkv = [(q_rows, slice(0, a.q_size)), (kv_rows, slice(a.q_size, a.q_size + a.kv_size)),
               (kv_rows, slice(a.q_size + a.kv_size, a.q_size + 2 * a.kv_size))]
        for (src, dst), proj, full in zip(qkv, "qkv", (nq, nkv, nkv)):
            table[p + f"self_attn.{proj}_proj.weight"] = Target(a.qkv_weight, (full, H), (src,), dst)
            table[p + f"self_attn.{proj}_proj.bias"] = Target(a.qkv_bias, (full,), (src,), dst)
        table[p + "self_attn.o_proj.weight"] = Target(a.out_weight, (H, nq), (slice(None), q_rows))
        table[p + "self_attn.o_proj.bias"] = Target(a.out_bias, (H,))
        table[p + "self_attn.sinks"] = Target(a.sinks, (cfg.num_attention_heads,), (_rows(r, a.num_heads),))
        table[p + "input_layernorm.weight"] = Target(a.norm.weight, (H,))
        table[p + "post_attention_layernorm.weight"] = Target(m.norm.weight, (H,))
        table[p + "mlp.router.weight"] = Target(m.router_weight, (E, H))
        table[p + "mlp.router.bias"] = Target(m.router_bias, (E,))
        # this rank's experts (EP) and slice of the intermediate dimension (TP); gate/up rows are
        # interleaved, so a contiguous row range is a contiguous range of intermediate units
        ex = slice(spec.expert_start, spec.expert_start + spec.local_experts)
        ir = r if spec.intermediate_size != I else 0  # which intermediate slice (0: the whole)
        i2 = _rows(ir, 2 * spec.intermediate_size)
        ib = _rows(ir, spec.intermediate_size // 32)
        x = p + "mlp.experts."
        table[x + "gate_up_proj_blocks"] = Target(m.gate_up_blocks, (E, 2 * I, H // 32, 16), (ex, i2))
        table[x + "gate_up_proj_scales"] = Target(m.gate_up_scales, (E, 2 * I, H // 32), (ex, i2))
        table[x + "gate_up_proj_bias"] = Target(m.gate_up_bias, (E, 2 * I), (ex, i2))
        table[x + "down_proj_blocks"] = Target(m.down_blocks, (E, H, I // 32, 16), (ex, slice(None), ib))
        table[x + "down_proj_scales"] = Target(m.down_scales, (E, H, I // 32), (ex, slice(None), ib))
        table[x + "down_proj_bias"] = Target(m.down_bias, (E, H), (ex,))
    if cfg.tie_word_embeddings:
        table.pop("lm_head.weight")
    return table


def load_weights(model, root: Path, progress: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint in `root`; names what is missing or wrong."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    files = checkpoint_files(root)
    table = checkpoint_table(model)
    missing = sorted(set(table) - set(files))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {root} lacks tensor(s) {missing[:5]}{more}; "
                              f"files: {sorted({f.name for f in files.values()})}")
    by_file: dict[Path, list[str]] = {}
    for name in table:
        by_file.setdefault(files[name], []).append(name)
    bar = tqdm(total=len(table), desc="Loading weights", unit="tensor", disable=not progress)
    for f, names in sorted(by_file.items()):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in names:
                t = table[name]
                sl = sf.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != t.shape:
                    raise CheckpointError(f"tensor {name!r} in {f.name} has shape {list(shape)}, "
                                          f"expected {list(t.shape)}")
                src = sl[t.src] if t.src else sl[:]
                dst = t.param.data if t.dst_rows is None else t.param.data[t.dst_rows]
                if tuple(src.shape) != tuple(dst.shape):
                    raise CheckpointError(f"tensor {name!r} in {f.name}: slice {list(src.shape)} does not "
                                          f"fit parameter {list(dst.shape)}")
                if dst.dtype == torch.uint8 and src.dtype != torch.uint8:
                    raise CheckpointError(f"tensor {name!r} in {f.name} is {src.dtype}, expected uint8 "
                                          f"(MXFP4 blocks/scales)")
                dst.copy_(src.to(dst.device))
                bar.update(1)
    bar.close()
    if model.config.tie_word_embeddings:
        model.unembedding.data = model.embedding.data
