"""THUDM config.json files (the real ones) and transformers' glm configs -> ModelConfig."""

import json

import pytest

from glmserve.devtools import PRESETS_DIR
from glmserve.devtools.glm_layout import glm_config
from glmserve.engine.checkpoint.hf import hf_model_config


def real_config(name: str) -> dict:
    return json.loads((PRESETS_DIR / name / "config.json").read_text())


@pytest.mark.parametrize(
    "name, layers, rope_theta, max_positions, vocab, eos, eps",
    [
        ("chatglm2", 28, 10000.0, 32768, 65024, (2,), 1e-5),
        ("chatglm3", 28, 10000.0, 8192, 65024, (2,), 1e-5),
        ("glm4", 40, 5_000_000.0, 131072, 151552, (151329, 151336, 151338), 1.5625e-07),
    ],
)
def test_real_chatglm_configs(name, layers, rope_theta, max_positions, vocab, eos, eps):
    config = hf_model_config(real_config(name), {})
    assert config.architecture == "chatglm"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (layers, 4096, 13696)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 2, 128)
    assert config.vocab_size == vocab  # padded_vocab_size: the embedding's rows
    assert config.rope_theta == rope_theta  # 10000 * rope_ratio
    assert config.max_position_embeddings == max_positions  # seq_length
    assert config.attention_bias and not config.tie_word_embeddings
    assert config.eos_token_ids == eos and config.rms_norm_eps == eps


def test_glm_layout_config_means_the_same_model():
    chatglm = hf_model_config(real_config("glm4"), {})
    native = hf_model_config(glm_config(real_config("glm4"), "bfloat16"), {})
    assert native.architecture == "glm"
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    fields += ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings")
    assert all(getattr(native, f) == getattr(chatglm, f) for f in fields)
    assert native.attention_bias and native.eos_token_ids == chatglm.eos_token_ids


def test_without_multi_query_attention_every_head_has_its_kv():
    config = {**real_config("chatglm3"), "multi_query_attention": False}
    assert hf_model_config(config, {}).num_key_value_heads == 32


def test_first_generation_chatglm_is_refused_clearly():
    chatglm_6b = {"model_type": "chatglm", "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28,
                  "num_attention_heads": 32, "inner_hidden_size": 16384, "position_encoding_2d": True}  # fmt: skip
    with pytest.raises(ValueError, match="first-generation ChatGLM-6B"):
        hf_model_config(chatglm_6b, {})


def test_unsupported_variant_flags_are_refused():
    with pytest.raises(ValueError, match="rmsnorm"):
        hf_model_config({**real_config("chatglm3"), "rmsnorm": False}, {})
