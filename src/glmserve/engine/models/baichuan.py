"""Baichuan-13B-Chat, Baichuan2-7B-Chat and Baichuan2-13B-Chat: one decoder, three position / head variants.

The decoder is Llama's (pre-RMSNorm, SwiGLU MLP, no biases, every head its own K/V) with q/k/v
fused as `W_pack` [3 * hidden, hidden], rows [q; k; v]. What differs, all told from config.json
(see hf_loader._baichuan_fields):
- positions: ALiBi (Press et al., 2022) for the 13B models, RoPE (Su et al., 2021) over the
  whole head with the half-split "rotate_half" pairs for Baichuan2-7B;
- the output head: Baichuan2's "NormHead" L2-normalises each row of `lm_head.weight` (once, at
  load: Baichuan2's code does it on the first inference call); Baichuan-13B's is a plain Linear.

Module names equal the checkpoint keys (`model.layers.N.self_attn.W_pack.weight`, ...); gate and
up are held merged, as in llama.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.config import ModelConfig
from glmserve.engine.layers.attention import AttentionMetadata, PagedAttention
from glmserve.engine.layers.decode_stack import DecodeStack, run_layers
from glmserve.engine.layers.embedding import token_embedding
from glmserve.engine.layers.linear import Linear
from glmserve.engine.layers.norm import RMSNorm
from glmserve.engine.layers.quant import Int4Weight, Int8Weight, QuantWeight
from glmserve.engine.layers.rotary import RotaryEmbedding
from glmserve.engine.models.llama import LlamaDecoderLayer, LlamaMLP

KVCache = tuple[torch.Tensor, torch.Tensor]


class NormHead(Linear):
    """Baichuan2's output layer: logits = hidden @ normalize(W)^T, each row of W scaled to unit L2 norm."""

    def load_shard(self, param_name: str, tensor: torch.Tensor | QuantWeight, shard: int = 0) -> None:
        # Normalise before Linear may quantize the float tensor; a pre-quantized weight is
        # normalised in float and quantized again by the same scheme.
        if isinstance(tensor, QuantWeight):
            normalized = F.normalize(tensor.dequantize().float(), dim=-1)
            if isinstance(tensor, Int8Weight):
                tensor = Int8Weight.quantize(normalized)
            else:
                tensor = Int4Weight.quantize(normalized, tensor.group_size)
        elif param_name == "weight":
            tensor = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        super().load_shard(param_name, tensor, shard)


class BaichuanAttention(nn.Module):
    def __init__(self, config: ModelConfig, use_alibi: bool):
        super().__init__()
        h, d = config.num_attention_heads, config.head_dim
        self.num_heads, self.head_dim = h, d
        self.W_pack = Linear(config.hidden_size, 3 * h * d)  # rows [q; k; v], each head's D dims contiguous
        self.o_proj = Linear(h * d, config.hidden_size)
        self.attn = PagedAttention(h, h, d, use_alibi=use_alibi)

    @property
    def qkv_proj(self) -> Linear:
        """W_pack under the name LlamaDecoderLayer.parts reads (the checkpoint's name stays the module's)."""
        return self.W_pack

    def forward(self, x, cos_sin, rotary: RotaryEmbedding | None, kv_cache: KVCache, meta: AttentionMetadata):
        qkv = self.W_pack(x).view(x.shape[0], 3 * self.num_heads, self.head_dim)  # [T, 3H, D]
        qk, v = qkv[:, : 2 * self.num_heads], qkv[:, 2 * self.num_heads :]
        if rotary is not None:
            qk = rotary.apply_(qk, *cos_sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # each [T, H, D]
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class BaichuanDecoderLayer(LlamaDecoderLayer):
    """Llama's layer (forward, parts) around Baichuan's attention."""

    def __init__(self, config: ModelConfig, use_alibi: bool):
        nn.Module.__init__(self)  # not LlamaDecoderLayer's: it would build Llama's attention
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BaichuanAttention(config, use_alibi)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)


class BaichuanModel(nn.Module):
    def __init__(self, config: ModelConfig, use_alibi: bool):
        super().__init__()
        self.embed_tokens = token_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            BaichuanDecoderLayer(config, use_alibi) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BaichuanForCausalLM(nn.Module):
    """config.extra carries `position_embedding` ("alibi" | "rope") and `norm_head` (bool)."""

    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        use_alibi = config.extra.get("position_embedding", "alibi") == "alibi"
        self.model = BaichuanModel(config, use_alibi)
        self.decode_stack: DecodeStack | None = None  # set once weights are in (build_decode_stack)
        self.rotary = (
            None
            if use_alibi
            else RotaryEmbedding(
                config.head_dim, config.head_dim, config.rope_theta, config.max_position_embeddings, "neox"
            )
        )
        head = NormHead if config.extra.get("norm_head") else Linear
        self.lm_head = head(config.hidden_size, config.vocab_size)

    def forward(
        self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = None if self.rotary is None else self.rotary.cos_sin(positions, x.dtype)  # two [T, 1, D]
        x = run_layers(self.model.layers, self.decode_stack, x, cos_sin, self.rotary, kv_caches, meta)
        return self.model.norm(x)

    def build_decode_stack(self) -> None:
        self.decode_stack = DecodeStack.build([layer.parts() for layer in self.model.layers], self.rotary)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
