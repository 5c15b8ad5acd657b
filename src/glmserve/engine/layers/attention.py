"""Attention over the paged KV cache for a batch mixing decodes and (chunked) prefills.

The flat batch holds the decode tokens first (one per sequence), then the prefill tokens of
each prefilling sequence back to back. Each layer writes the new K/V into the cache slots
(`slot_mapping`), then:
- decodes: gather each sequence's blocks, then one SDPA call for up to SDPA_MAX_DECODES
  sequences (its fused kernel wins while the batch is small), two batched matmuls for more
  (which win once SDPA's per-sequence overhead dominates; figures in docs/engine.md);
- prefills: pad the chunks to [P, max_q], gather the blocks, one SDPA call with a causal
  mask by absolute position (chunks may start after a cached prefix).
Grouped KV heads are handled by folding each group of query heads into the query length.
On CPU, where the native ops are built (kernels/native.py), the cache write is one op and decodes
are one fused op over the paged cache (csrc/decode_ops.cpp: no gather, float32 accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.kernels import native

SDPA_MAX_DECODES = 4


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks]
    decode_context_lens: torch.Tensor | None  # [B] int64: keys each decode attends to
    # [1, B, 1, L] additive: 0 where key index < context length, -inf after; None if nothing to mask
    decode_mask: torch.Tensor | None
    prefill_block_tables: torch.Tensor | None  # [P, max_blocks]
    prefill_mask: torch.Tensor | None  # [P, 1, max_q, L] bool: key position <= query position
    prefill_pad_index: torch.Tensor | None  # [P * max_q] row of the prefill tokens for each padded query
    prefill_unpad_index: torch.Tensor | None  # [num_prefill_tokens] padded row of each prefill token
    prefill_max_q: int = 0
    prefill_is_fresh: bool = False  # one prefill with nothing cached before it: plain causal attention


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [KVH, num_blocks, block_size, D], block_tables [B, max_blocks] -> [KVH, B, L, D].

    Heads lead the cache layout so the gathered keys are already in the batched-matmul layout
    (batch dims KVH, B): one index_select copy per layer and no transpose copy.
    """
    kvh, _, block_size, d = cache.shape
    b, max_blocks = block_tables.shape
    return cache.index_select(1, block_tables.flatten()).view(kvh, b, max_blocks * block_size, d)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al., 2022): 2^(-8i/n) for n a power of two; otherwise the
    slopes of the nearest lower power of two m, then every other slope of 2m for the rest."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(m) + powers(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, use_alibi: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group_size = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        # ALiBi adds slope_h * key_position to the scaled scores (the query-position term is
        # constant along each softmax row, so it is dropped, as Baichuan's code does).
        self.alibi = alibi_slopes(num_heads) if use_alibi else None

    def _alibi_bias(self, num_keys: int, device) -> torch.Tensor:
        """[H, L] float32: slope_h * key position."""
        return self.alibi.to(device)[:, None] * torch.arange(num_keys, device=device, dtype=torch.float32)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [KVH, num_blocks, block_size, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H * D]
        k_cache, v_cache = kv_cache
        fused = k_cache.device.type == "cpu" and native.has_decode_ops() and q.dtype == k.dtype == v.dtype == k_cache.dtype
        if fused:
            torch.ops.glmserve.write_kv_(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            k_cache.view(self.num_kv_heads, -1, self.head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            v_cache.view(self.num_kv_heads, -1, self.head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        num_decode = meta.num_decode_tokens
        parts = []
        if num_decode and fused:
            parts.append(
                torch.ops.glmserve.decode_attention(
                    q[:num_decode], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                    self.scale, self.alibi,
                )
            )
        elif num_decode:
            parts.append(self._decode(q[:num_decode], k_cache, v_cache, meta))
        if num_decode < q.shape[0]:
            parts.append(self._prefill(q[num_decode:], k[num_decode:], v[num_decode:], k_cache, v_cache, meta))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        b = q.shape[0]
        keys = gather_blocks(k_cache, meta.decode_block_tables)  # [KVH, B, L, D]
        values = gather_blocks(v_cache, meta.decode_block_tables)
        if b <= SDPA_MAX_DECODES and self.alibi is None:  # SDPA batch KVH, heads B, queries G
            q = q.view(b, self.num_kv_heads, self.group_size, self.head_dim).transpose(0, 1)  # [KVH, B, G, D]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.decode_mask)
            return out.transpose(0, 1).reshape(b, self.num_heads * self.head_dim)
        q = (q * self.scale).view(b, self.num_kv_heads, self.group_size, self.head_dim).transpose(0, 1)  # [KVH, B, G, D]
        scores = torch.matmul(q, keys.transpose(-1, -2))  # [KVH, B, G, L]
        if self.alibi is not None:
            bias = self._alibi_bias(keys.shape[2], q.device).view(self.num_kv_heads, 1, self.group_size, -1)
            scores = scores + bias.to(scores.dtype)
        if meta.decode_mask is not None:
            scores = scores + meta.decode_mask
        probs = torch.softmax(scores, -1)  # the CPU kernel accumulates 16-bit inputs in float32
        out = torch.matmul(probs, values)  # [KVH, B, G, D]
        return out.transpose(0, 1).reshape(b, self.num_heads * self.head_dim)

    def _prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.prefill_is_fresh and self.alibi is None:  # [1, H, n, D] against the chunk's own keys
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                is_causal=True,
                enable_gqa=True,
            )
            return out[0].transpose(0, 1).reshape(q.shape[0], -1)
        p, max_q = meta.prefill_block_tables.shape[0], meta.prefill_max_q
        padded_q = q[meta.prefill_pad_index].view(p, max_q, self.num_heads, self.head_dim).transpose(1, 2)
        keys = gather_blocks(k_cache, meta.prefill_block_tables).transpose(0, 1)  # [P, KVH, L, D]
        values = gather_blocks(v_cache, meta.prefill_block_tables).transpose(0, 1)
        mask = meta.prefill_mask  # [P, 1, max_q, L] bool
        if self.alibi is not None:  # float mask: the bias where visible, -inf elsewhere
            bias = self._alibi_bias(keys.shape[2], q.device)[None, :, None, :]  # [1, H, 1, L]
            mask = torch.where(mask, bias, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=mask, enable_gqa=True)  # [P, H, max_q, D]
        out = out.transpose(1, 2).reshape(p * max_q, self.num_heads * self.head_dim)
        return out[meta.prefill_unpad_index]
