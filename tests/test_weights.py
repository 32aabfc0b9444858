"""Checkpoint layout and loading: the HF names/shapes/dtypes, sharding, and every bad-checkpoint error."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptoss.config import ModelConfig
from gptoss.model.gpt_oss import Transformer
from gptoss.model.weights import CheckpointError, checkpoint_files, checkpoint_table, load_weights, resolve_model_path
from gptoss.testing import make_checkpoint, preset_config
from test_config import PUBLISHED_20B, published_120b


def _facts_shapes(c: ModelConfig) -> dict:
    """The tensor table of shared/reference/gpt-oss-facts.md, for layer 0."""
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size
    q, kv = c.num_attention_heads * 64, c.num_key_value_heads * 64
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,),
        p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
        p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.q_proj.bias": (q,),
        p + "self_attn.o_proj.weight": (H, q), p + "self_attn.o_proj.bias": (H,),
        p + "self_attn.sinks": (c.num_attention_heads,), p + "mlp.router.weight": (E, H), p + "mlp.router.bias": (E,),
        p + "mlp.experts.gate_up_proj_blocks": (E, 2 * I, H // 32, 16),
        p + "mlp.experts.gate_up_proj_scales": (E, 2 * I, H // 32), p + "mlp.experts.gate_up_proj_bias": (E, 2 * I),
        p + "mlp.experts.down_proj_blocks": (E, H, I // 32, 16), p + "mlp.experts.down_proj_scales": (E, H, I // 32),
        p + "mlp.experts.down_proj_bias": (E, H),
    }


@pytest.mark.parametrize("d", [PUBLISHED_20B, published_120b()])
def test_table_matches_published_layout(d):
    c = ModelConfig.from_dict(d)
    model = Transformer(c, torch.bfloat16, "meta", max_positions=16)
    table = checkpoint_table(model)
    assert len(table) == 3 + 19 * c.num_hidden_layers
    for name, shape in _facts_shapes(c).items():
        assert table[name].shape == shape, name


def test_tiny_checkpoint_is_hf_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    c = ModelConfig.from_dict(cfg)
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
    # head_dim is 16 in the tiny preset: scale the facts' 64 accordingly
    want = _facts_shapes(c)
    for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "o_proj.weight"):
        key = "model.layers.0.self_attn." + n
        want[key] = tuple(s // 64 * c.head_dim if s % 64 == 0 and s != c.hidden_size else s for s in want[key])
    for n, s in want.items():
        assert shapes[n] == s, n
    assert dtypes["model.layers.0.mlp.experts.gate_up_proj_blocks"] == "U8"
    assert dtypes["model.layers.0.mlp.experts.down_proj_scales"] == "U8"
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.layers.0.self_attn.sinks"] == "BF16"


def _load(path, **kw):
    c = ModelConfig.from_json(path / "config.json")
    m = Transformer(c, torch.float32, "cpu", max_positions=64)
    load_weights(m, path, progress=False, **kw)
    return m


def test_sharded_equals_single(tiny_ckpt, tmp_path):
    sharded = make_checkpoint(tmp_path / "sharded", preset="tiny", seed=0, num_shards=3, device="cpu")
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == 3
    assert sorted(p.name for p in sharded.glob("*.safetensors"))[0] == "model-00000-of-00002.safetensors"
    a, b = _load(tiny_ckpt), _load(sharded)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_loaded_values_are_the_checkpoint(tiny_ckpt):
    m = _load(tiny_ckpt)
    t = load_file(str(tiny_ckpt / "model.safetensors"))
    a = m.layers[1].attn
    q, kv = a.q_size, a.kv_size
    assert torch.equal(a.qkv_weight[q:q + kv], t["model.layers.1.self_attn.k_proj.weight"].float())
    assert torch.equal(m.layers[1].mlp.down_blocks, t["model.layers.1.mlp.experts.down_proj_blocks"])
    assert m.layers[1].mlp.gate_up_blocks.dtype == torch.uint8  # experts stay packed


def _copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def _edited(tiny_ckpt, tmp_path, edit):
    """A copy of the checkpoint with `edit(tensors)` applied to its tensors."""
    d = _copy(tiny_ckpt, tmp_path)
    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"))
    return d


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    d = _edited(tiny_ckpt, tmp_path, lambda t: t.pop("model.layers.2.self_attn.sinks"))
    with pytest.raises(CheckpointError, match=r"lacks tensor.*model\.layers\.2\.self_attn\.sinks.*model\.safetensors"):
        _load(d)


def test_misshaped_tensor_is_named_with_file(tiny_ckpt, tmp_path):
    name = "model.layers.1.mlp.router.weight"
    d = _edited(tiny_ckpt, tmp_path, lambda t: t.update({name: t[name][:, :32].contiguous()}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.router\.weight.*model\.safetensors.*\[4, 32\].*\[4, 64\]"):
        _load(d)


def test_wrong_dtype_for_mxfp4_is_named(tiny_ckpt, tmp_path):
    name = "model.layers.0.mlp.experts.down_proj_scales"
    d = _edited(tiny_ckpt, tmp_path, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=r"down_proj_scales.*uint8"):
        _load(d)


def test_index_pointing_at_missing_shard(tmp_path):
    d = make_checkpoint(tmp_path / "s", preset="tiny", seed=1, num_shards=2, device="cpu")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        checkpoint_files(d)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        checkpoint_files(tmp_path)


def test_offline_hub_id_error_names_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CheckpointError, match=r"'openai/gpt-oss-20b'.*--local-dir"):
        resolve_model_path("openai/gpt-oss-20b")


def test_not_a_dir_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a hub repo id"):
        resolve_model_path(str(tmp_path / "nope" / "deeper"))


def test_preset_shapes():
    c = preset_config("gpt-oss-120b")
    assert c.num_hidden_layers == 36 and c.num_local_experts == 128 and len(c.layer_types) == 36
