"""All decoder layers of a CPU decode step in one native call (kernels/csrc/decode_stack.cpp).

A decode step of a small model spends as long in Python (module calls, op dispatch, views) as in
its kernels: ~15 calls per layer at ~4 us each. Where every piece of a layer has a native form
(the fused decode ops, native int4 / int8 or dense weights), a step made only of decodes runs the
whole stack in C++ instead, calling the same kernels in the same order: outputs are identical to
the layer-by-layer path (tests/engine/test_decode_stack.py). Steps with prompt tokens, other
devices, and layers without such forms take the Python path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.kernels import native
from glmserve.engine.kernels.native_linear import FUSED_ROWS, NativeInt4, NativeInt8
from glmserve.engine.layers.attention import AttentionMetadata, PagedAttention
from glmserve.engine.layers.linear import Linear, max_fused_rows
from glmserve.engine.layers.norm import RMSNorm
from glmserve.engine.layers.rotary import RotaryEmbedding

KIND_DENSE, KIND_INT4, KIND_INT8 = 0, 1, 2  # csrc/decode_stack.cpp, LinearKind
ANY_ROWS = 1 << 30


@dataclass
class LayerParts:
    """The pieces of a pre-norm decoder layer: h = norm(x); x += o(attn(qkv(h))); x += down(act(gate_up(norm(x))))."""

    input_norm: RMSNorm
    qkv: Linear  # rows: H query heads, then KVH key heads, then KVH value heads
    attn: PagedAttention
    o_proj: Linear
    post_norm: RMSNorm
    gate_up: Linear  # rows [gate; up], SiLU-gated
    down: Linear


class DecodeStack:
    def __init__(self, native_stack, dtype: torch.dtype, max_rows: int):
        self.native, self.dtype = native_stack, dtype
        self.max_rows = max_rows  # decodes per step it takes
        self.lora_step = None  # LoRAStep of the layers' adapters (set by the runner)

    @staticmethod
    def build(parts: list[LayerParts], rotary: RotaryEmbedding | None) -> DecodeStack | None:
        """The native stack over these layers, or None where some piece has no native form."""
        if not parts:
            return None
        first, dtype = parts[0].attn, parts[0].input_norm.weight.dtype
        if parts[0].input_norm.weight.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
            return None
        if not native.has_decode_ops():  # after the device check: never builds the library for a GPU model
            return None
        stack = torch.classes.glmserve.DecodeStack(
            first.num_heads, first.num_kv_heads, first.head_dim, parts[0].input_norm.eps, first.scale,
            rotary is not None and rotary.style == "interleaved", first.alibi,
        )
        max_rows = ANY_ROWS
        for layer in parts:
            if layer.input_norm.eps != parts[0].input_norm.eps or layer.post_norm.eps != parts[0].input_norm.eps:
                return None
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                limit = _add_linear(stack, linear, dtype)
                if limit is None:
                    return None
                max_rows = min(max_rows, limit)
            stack.add_layer(layer.input_norm.weight, layer.post_norm.weight)
        return DecodeStack(stack, dtype, max_rows)

    def accepts(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        t = x.shape[0]
        if self.lora_step is not None and self.lora_step.active and not self.lora_step.native:
            return False
        return meta.num_decode_tokens == t <= self.max_rows and x.dtype == self.dtype

    def __call__(self, x, cos_sin, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        cos, sin = cos_sin if cos_sin is not None else (None, None)
        lora_slots = self.lora_step.row_slots if self.lora_step is not None else None
        return self.native.forward(
            x, cos, sin, [k for k, _ in kv_caches], [v for _, v in kv_caches],
            meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens, lora_slots,
        )


def _add_linear(stack, linear: Linear, dtype: torch.dtype) -> int | None:
    """Hand one linear to the native stack as Linear.forward runs it: the most rows per step its
    forms take (ANY_ROWS with a dense weight), or None where it has no native form."""
    packed, is_prepacked = linear.packed, linear.prepacked is not None
    dense = linear.prepacked if is_prepacked else linear.weight
    if dense is not None and dense.dtype != dtype:
        return None
    lora = (linear.lora.a, linear.lora.bt, linear.lora.width) if linear.lora is not None else (None, None, 0)
    if packed is None:
        if dense is None:
            return None
        stack.add_linear(KIND_DENSE, None, None, None, 0, 0, dense, is_prepacked, linear.bias, *lora)
        return ANY_ROWS
    rows = max_fused_rows(packed)
    if isinstance(packed, NativeInt4):
        weights = (KIND_INT4, packed.nibbles, packed.scales, packed.mins)
    elif isinstance(packed, NativeInt8):
        weights = (KIND_INT8, packed.q, packed.scales, None)
    else:
        return None
    stack.add_linear(*weights, packed.group_size, rows, dense, is_prepacked, linear.bias, *lora)
    return ANY_ROWS if dense is not None else FUSED_ROWS  # past FUSED_ROWS, the Python path dequantizes


def run_layers(layers, stack: DecodeStack | None, x, cos_sin, rotary, kv_caches, meta: AttentionMetadata):
    """x through all decoder layers: natively where the stack takes the step, else layer by layer."""
    if stack is not None and stack.accepts(x, meta):
        return stack(x, cos_sin, kv_caches, meta)
    for layer, kv_cache in zip(layers, kv_caches, strict=True):
        x = layer(x, cos_sin, rotary, kv_cache, meta)
    return x
