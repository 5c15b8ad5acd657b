"""Llama-family decoder (Llama, SmolLM2, Qwen2): GQA, RoPE, RMSNorm, SwiGLU.

Module names equal the Hugging Face checkpoint keys, except that q/k/v and gate/up are
held merged (`packed_modules` says where each checkpoint tensor goes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.config import ModelConfig
from glmserve.engine.layers.activation import silu_and_mul
from glmserve.engine.layers.attention import AttentionMetadata, PagedAttention
from glmserve.engine.layers.decode_stack import DecodeStack, LayerParts, run_layers
from glmserve.engine.layers.embedding import token_embedding
from glmserve.engine.layers.linear import Linear, MergedLinear, max_fused_rows, prepack, prepacked_linear
from glmserve.engine.layers.norm import RMSNorm
from glmserve.engine.layers.quant import QuantWeight
from glmserve.engine.layers.quant_kernels import kernel_for
from glmserve.engine.layers.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.qkv_proj = MergedLinear(
            config.hidden_size, [h * d, kvh * d, kvh * d], bias=config.attention_bias
        )
        self.o_proj = Linear(h * d, config.hidden_size)
        self.attn = PagedAttention(h, kvh, d)

    def forward(self, x, cos_sin, rotary: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata):
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) * D]
        num_qk = self.num_heads + self.num_kv_heads
        qk = rotary.apply_(qkv[:, : num_qk * self.head_dim].view(t, num_qk, self.head_dim), *cos_sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, num_qk * self.head_dim :].view(t, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos_sin, rotary, kv_cache, meta):
        attn = self.self_attn(self.input_layernorm(x), cos_sin, rotary, kv_cache, meta)
        x, h = self.post_attention_layernorm.add_and_norm(x, attn)
        return x + self.mlp(h)

    def parts(self) -> LayerParts:
        a, mlp = self.self_attn, self.mlp
        return LayerParts(
            self.input_layernorm, a.qkv_proj, a.attn, a.o_proj, self.post_attention_layernorm, mlp.gate_up_proj, mlp.down_proj
        )


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = token_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.head_dim, config.rope_theta, config.max_position_embeddings, "neox"
        )
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.tied_embedding = "model.embed_tokens.weight" if config.tie_word_embeddings else None
        self.quantized_output = None  # a tied output layer kept as the file stores the embedding
        self.int8_activations = True  # set by the runner: EngineConfig.activation_precision
        self.prepacked_output: torch.Tensor | None = None  # a tied output layer in oneDNN's layout
        self.decode_stack: DecodeStack | None = None  # set once weights are in (build_decode_stack)

    def build_decode_stack(self) -> None:
        self.decode_stack = DecodeStack.build([layer.parts() for layer in self.model.layers], self.rotary)

    def prepack_tied_output(self) -> None:
        """Small models on CPU in bf16 also keep the tied output layer in oneDNN's layout (see
        layers/linear.py, prepack) for many-row steps, where the plain layout is reordered on
        every call (about twice as slow for SmolLM2's 49152x576; docs/engine.md)."""
        if self.lm_head is None:
            self.prepacked_output = prepack(self.model.embed_tokens.weight)

    def keep_quantized_output(self, weight: QuantWeight) -> None:
        """Tied embeddings from a GGUF come quantized (SmolLM2's Q8_0). A lookup needs the dense
        embedding, but the output layer reads all of it every step, and on a small model that read
        is the largest cost of a step (SmolLM2-135M: Q8_0 blocks read a third of bf16's bytes;
        docs/engine.md). So few-row steps also keep the file's form where a fused kernel reads
        it, as llama.cpp does."""
        embedding = self.model.embed_tokens.weight
        kernel = kernel_for(weight, embedding.device, embedding.dtype, self.int8_activations)
        if kernel is not None and kernel.is_fused:
            self.quantized_output = kernel.from_weight(weight.to(embedding.device), embedding.dtype)

    def forward(
        self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        x = run_layers(self.model.layers, self.decode_stack, x, cos_sin, self.rotary, kv_caches, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:  # tied to the embedding
            if self.quantized_output is not None and hidden.shape[0] <= max_fused_rows(self.quantized_output):
                return self.quantized_output.matmul(hidden).float()
            if self.prepacked_output is not None:
                return prepacked_linear(hidden, self.prepacked_output, None).float()
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
