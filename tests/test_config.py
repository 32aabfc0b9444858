"""ModelConfig reads both published configs (old and new rope keys); EngineConfig rejects bad values."""

import copy

import pytest

from gptoss.config import ConfigError, EngineConfig, ModelConfig

# the fields of config.json as published for openai/gpt-oss-20b (120b differs in layers and experts)
PUBLISHED_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
    "vocab_size": 201088,
}


def published_120b():
    d = copy.deepcopy(PUBLISHED_20B)
    d.update(num_hidden_layers=36, num_local_experts=128,
             layer_types=["sliding_attention", "full_attention"] * 18)
    return d


@pytest.mark.parametrize("d,layers,experts", [(PUBLISHED_20B, 24, 32), (published_120b(), 36, 128)])
def test_published_configs(d, layers, experts):
    c = ModelConfig.from_dict(d)
    assert (c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok) == (layers, experts, 4)
    assert (c.hidden_size, c.intermediate_size, c.head_dim) == (2880, 2880, 64)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (64, 8, 201088)
    assert c.is_sliding[0] and not c.is_sliding[1] and sum(c.is_sliding) == layers // 2
    assert (c.rope_theta, c.rope_factor, c.rope_beta_fast, c.rope_beta_slow) == (150000, 32, 32, 1)
    assert c.rope_original_max_position == 4096 and c.rope_truncate is False
    assert c.sliding_window == 128 and c.swiglu_limit == 7.0


def test_rope_parameters_form_and_missing_layer_types():
    d = copy.deepcopy(PUBLISHED_20B)
    rope = d.pop("rope_scaling")
    rope["rope_theta"] = d.pop("rope_theta")
    d["rope_parameters"] = rope
    del d["layer_types"]
    c = ModelConfig.from_dict(d)
    assert c.rope_theta == 150000 and c.rope_factor == 32
    assert c.layer_types[:2] == ["sliding_attention", "full_attention"]


def test_roundtrip_hf_dict():
    c = ModelConfig.from_dict(PUBLISHED_20B)
    assert ModelConfig.from_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("change,needle", [
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ({"hidden_size": 2881}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2}}, "yarn"),
])
def test_bad_model_config(change, needle):
    d = copy.deepcopy(PUBLISHED_20B)
    d.update(change)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("kw,needle", [
    ({"kv_cache_dtype": "int4"}, "kv_cache_dtype='int4'.*'fp8'"),
    ({"dtype": "float16"}, "dtype='float16'"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"max_num_seqs": 0}, "max_num_seqs=0"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5 must be a number in \(0, 1\]"),
    ({"block_size": 12}, "power of two"),
    ({"max_model_len": -3}, "max_model_len"),
])
def test_bad_engine_config(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        EngineConfig(model="x", **kw)
