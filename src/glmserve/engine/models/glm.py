"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B: one architecture (THUDM's GLM family), two checkpoint layouts.

- "chatglm" (THUDM's own files, config.json model_type `chatglm`): `ChatGLMForCausalLM`, module
  names equal to the checkpoint keys (`transformer.encoder.layers.N.self_attention.query_key_value`).
- "glm" (transformers' native `GlmForCausalLM`, model_type `glm`): Llama's names with q/k/v split
  and the MLP's `gate_up_proj` fused, so it is the Llama model with the GLM rotary.

The architecture: pre-RMSNorm decoder blocks; attention with a bias on q/k/v only and grouped KV
heads (`multi_query_group_num`); rotary position embedding (Su et al., 2021) on the first half of
each head's dimensions, as interleaved adjacent pairs, base 10000 * `rope_ratio`; SwiGLU MLP
(Shazeer, 2020) whose fused projection is [gate; up]; an output layer untied from the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.config import ModelConfig
from glmserve.engine.layers.activation import silu_and_mul
from glmserve.engine.layers.attention import AttentionMetadata, PagedAttention
from glmserve.engine.layers.decode_stack import DecodeStack, LayerParts, run_layers
from glmserve.engine.layers.embedding import token_embedding
from glmserve.engine.layers.linear import Linear
from glmserve.engine.layers.norm import RMSNorm
from glmserve.engine.layers.rotary import RotaryEmbedding
from glmserve.engine.models.llama import LlamaForCausalLM

KVCache = tuple[torch.Tensor, torch.Tensor]

# transformers' GlmConfig default; THUDM's code hard-codes the same half (RotaryEmbedding(rotary_dim // 2)).
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5


def glm_rotary(
    config: ModelConfig, partial_rotary_factor: float = DEFAULT_PARTIAL_ROTARY_FACTOR
) -> RotaryEmbedding:
    """Rotary over the first `factor * head_dim` dims as adjacent pairs (2i, 2i+1); the rest pass through."""
    rotary_dim = int(config.head_dim * partial_rotary_factor)
    return RotaryEmbedding(
        config.head_dim, rotary_dim, config.rope_theta, config.max_position_embeddings, "interleaved"
    )


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        # Rows [q (H*D); k (KVH*D); v (KVH*D)], each head's D dims contiguous, as THUDM's split does.
        self.query_key_value = Linear(config.hidden_size, (h + 2 * kvh) * d, bias=config.attention_bias)
        self.dense = Linear(h * d, config.hidden_size)
        self.attn = PagedAttention(h, kvh, d)

    def forward(self, x, cos_sin, rotary: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata):
        t = x.shape[0]
        qkv = self.query_key_value(x)  # [T, (H + 2 KVH) * D]
        num_qk = self.num_heads + self.num_kv_heads
        qk = rotary.apply_(qkv[:, : num_qk * self.head_dim].view(t, num_qk, self.head_dim), *cos_sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, H, D], [T, KVH, D]
        v = qkv[:, num_qk * self.head_dim :].view(t, self.num_kv_heads, self.head_dim)
        return self.dense(self.attn(q, k, v, kv_cache, meta))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.intermediate_size)  # rows [gate; up]
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(silu_and_mul(self.dense_h_to_4h(x)))  # rows [gate; up]


class GLMBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, rotary, kv_cache, meta):
        attn = self.self_attention(self.input_layernorm(x), cos_sin, rotary, kv_cache, meta)
        x, h = self.post_attention_layernorm.add_and_norm(x, attn)
        return x + self.mlp(h)

    def parts(self) -> LayerParts:
        a, mlp = self.self_attention, self.mlp
        return LayerParts(
            self.input_layernorm, a.query_key_value, a.attn, a.dense, self.post_attention_layernorm,
            mlp.dense_h_to_4h, mlp.dense_4h_to_h,
        )


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = token_embedding(config.vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class ChatGLMModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = Linear(config.hidden_size, config.vocab_size)


class ChatGLMForCausalLM(nn.Module):
    """THUDM's layout. Real checkpoints also hold `transformer.rotary_pos_emb.inv_freq`, which
    the loader skips: the tables are derived from the config. (THUDM's config.json has no
    partial_rotary_factor: half; a GGUF's rope.dimension_count sets it.)"""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config)
        self.decode_stack: DecodeStack | None = None  # set once weights are in (build_decode_stack)
        self.rotary = glm_rotary(config, partial_rotary_factor(config.extra))

    def forward(
        self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        x = self.transformer.embedding.word_embeddings(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)  # two [T, 1, rotary_dim]
        layers = self.transformer.encoder.layers
        x = run_layers(layers, self.decode_stack, x, cos_sin, self.rotary, kv_caches, meta)
        return self.transformer.encoder.final_layernorm(x)

    def build_decode_stack(self) -> None:
        self.decode_stack = DecodeStack.build([layer.parts() for layer in self.transformer.encoder.layers], self.rotary)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab] (vocab = padded_vocab_size)."""
        return self.transformer.output_layer(hidden).float()


class GlmForCausalLM(LlamaForCausalLM):
    """transformers' layout: `model.layers.N.self_attn.{q,k,v}_proj` (with bias) are merged on
    load; `mlp.gate_up_proj` is already fused [gate; up] in the checkpoint, so it is one tensor
    of a plain Linear here."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.rotary = glm_rotary(config, partial_rotary_factor(config.extra))
        for layer in self.model.layers:
            layer.mlp.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)


def partial_rotary_factor(hf_config: dict) -> float:
    # transformers < 5 writes it at the top level, >= 5 inside rope_parameters.
    rope_parameters = hf_config.get("rope_parameters") or {}
    factor = hf_config.get("partial_rotary_factor", rope_parameters.get("partial_rotary_factor"))
    return float(factor if factor is not None else DEFAULT_PARTIAL_ROTARY_FACTOR)
