"""The tensors of a Baichuan-13B / Baichuan2 checkpoint from its config.json, and how the random-checkpoint
tool's size flags (named after ChatGLM's config keys) map onto Baichuan's keys.

Per layer N (`model.layers.N.`), no biases and no grouped KV heads:
    input_layernorm.weight               [hidden]
    self_attn.W_pack.weight              [3 * hidden, hidden]   rows [q; k; v]
    self_attn.o_proj.weight              [hidden, hidden]
    post_attention_layernorm.weight      [hidden]
    mlp.gate_proj.weight, mlp.up_proj.weight   [F, hidden]
    mlp.down_proj.weight                 [hidden, F]
plus `model.embed_tokens.weight` [vocab, hidden], `model.norm.weight`, `lm_head.weight` [vocab, hidden].
"""

from __future__ import annotations

from typing import Any

# random_checkpoint SIZE_KEYS -> Baichuan config.json key. The vocabulary is not scaled: its size
# tells Baichuan2 from Baichuan-13B, and the real tokenizer needs every id.
BAICHUAN_SIZE_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "seq_length": "model_max_length",
}


def is_baichuan_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "baichuan"


def scale_baichuan_config(config: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    unsupported = sorted(k for k, v in sizes.items() if v is not None and k not in BAICHUAN_SIZE_KEYS)
    if unsupported:
        raise ValueError(f"a Baichuan config takes only {sorted(BAICHUAN_SIZE_KEYS)}; got {unsupported}")
    out = {**config, **{BAICHUAN_SIZE_KEYS[k]: v for k, v in sizes.items() if v is not None}}
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if "max_position_embeddings" in out and sizes.get("seq_length") is not None:  # Baichuan2-7B (RoPE)
        out["max_position_embeddings"] = out["model_max_length"]
    return out


def baichuan_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, vocab, ffn = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = {
            "input_layernorm.weight": (hidden,),
            "self_attn.W_pack.weight": (3 * hidden, hidden),
            "self_attn.o_proj.weight": (hidden, hidden),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.gate_proj.weight": (ffn, hidden),
            "mlp.up_proj.weight": (ffn, hidden),
            "mlp.down_proj.weight": (hidden, ffn),
        }
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
