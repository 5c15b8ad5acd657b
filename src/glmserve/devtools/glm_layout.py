"""The tensors of a ChatGLM2/3 / GLM-4 checkpoint from its config.json, and their names in
transformers' native `GlmForCausalLM` layout (model_type `glm`).

THUDM's layout (model_type `chatglm`), per layer N (`transformer.encoder.layers.N.`):
    input_layernorm.weight                    [hidden]
    self_attention.query_key_value.weight     [(H + 2 G) * D, hidden]   rows [q; k; v]
    self_attention.query_key_value.bias       [(H + 2 G) * D]           (add_qkv_bias)
    self_attention.dense.weight               [hidden, H * D]
    post_attention_layernorm.weight           [hidden]
    mlp.dense_h_to_4h.weight                  [2 F, hidden]             rows [gate; up]
    mlp.dense_4h_to_h.weight                  [hidden, F]
with H heads, G = multi_query_group_num KV heads, D = kv_channels, F = ffn_hidden_size.
"""

from __future__ import annotations

import re
from typing import Any

import torch

LAYER_PREFIX = "transformer.encoder.layers"
# THUDM name (within a layer, or global) -> transformers GlmForCausalLM name.
GLM_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def num_kv_heads(config: dict[str, Any]) -> int:
    """multi_query_group_num, unless multi_query_attention is false (as the engine's loader reads it)."""
    if config.get("multi_query_attention") is False:
        return config["num_attention_heads"]
    return config.get("multi_query_group_num") or config["num_attention_heads"]


def head_dim(config: dict[str, Any]) -> int:
    return config.get("kv_channels") or config["hidden_size"] // config["num_attention_heads"]


def chatglm_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a THUDM checkpoint, in the order the official index lists them."""
    hidden, vocab, ffn = config["hidden_size"], config["padded_vocab_size"], config["ffn_hidden_size"]
    q_rows, kv_rows = (
        config["num_attention_heads"] * head_dim(config),
        num_kv_heads(config) * head_dim(config),
    )
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (vocab, hidden)}
    for i in range(config["num_layers"]):
        layer = {
            "input_layernorm.weight": (hidden,),
            "self_attention.query_key_value.weight": (q_rows + 2 * kv_rows, hidden),
            "self_attention.query_key_value.bias": (q_rows + 2 * kv_rows,),
            "self_attention.dense.weight": (hidden, q_rows),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.dense_h_to_4h.weight": (2 * ffn, hidden),
            "mlp.dense_4h_to_h.weight": (hidden, ffn),
        }
        if not config.get("add_qkv_bias"):
            del layer["self_attention.query_key_value.bias"]
        shapes |= {f"{LAYER_PREFIX}.{i}.{name}": shape for name, shape in layer.items()}
    shapes["transformer.encoder.final_layernorm.weight"] = (hidden,)
    shapes["transformer.output_layer.weight"] = (vocab, hidden)
    # THUDM's RotaryEmbedding(kv_channels // 2) buffer: 1 / 10000^(2i / dim) over dim = D / 2.
    shapes["transformer.rotary_pos_emb.inv_freq"] = (head_dim(config) // 4,)
    return shapes


def rotary_inv_freq(config: dict[str, Any]) -> torch.Tensor:
    """The saved (unused) buffer, as THUDM computes it: rope_ratio is applied later, in forward."""
    dim = head_dim(config) // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def to_glm_layout(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """One THUDM tensor -> its transformers `GlmForCausalLM` tensors (none for the RoPE buffer;
    three for q/k/v). Split tensors are views: clone them before saving with torch.save."""
    if name.endswith("rotary_pos_emb.inv_freq"):
        return []
    if name in GLM_NAMES:
        return [(GLM_NAMES[name], tensor)]
    match = re.fullmatch(rf"{re.escape(LAYER_PREFIX)}\.(\d+)\.(.+)", name)
    if match is None:
        raise ValueError(f"not a ChatGLM checkpoint tensor: {name!r}")
    prefix, local = f"model.layers.{match[1]}.", match[2]
    if local.startswith("self_attention.query_key_value."):
        kind = local.rpartition(".")[2]  # weight | bias
        q_rows, kv_rows = (
            config["num_attention_heads"] * head_dim(config),
            num_kv_heads(config) * head_dim(config),
        )
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    return [(prefix + GLM_NAMES[local], tensor)]


def glm_config(config: dict[str, Any], torch_dtype: str) -> dict[str, Any]:
    """THUDM config.json -> the config.json of the same model in transformers' `glm` layout."""
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": config["padded_vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["ffn_hidden_size"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": num_kv_heads(config),
        "head_dim": head_dim(config),
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0 * config.get("rope_ratio", 1),
        "rms_norm_eps": config["layernorm_epsilon"],
        "max_position_embeddings": config["seq_length"],
        "attention_bias": bool(config.get("add_qkv_bias")),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "torch_dtype": torch_dtype,
    }
