"""GGUF files (llama.cpp) -> ModelConfig + float tensors under our models' checkpoint names.

Archs `llama` and `qwen2` map to Hugging Face Llama names; `chatglm` (ChatGLM3-6B, GLM-4-9B, as
llama.cpp's convert_hf_to_gguf.py `ChatGLMModel` writes them) to THUDM's names for
models/glm.py's ChatGLMForCausalLM, or to transformers' GlmForCausalLM names when q/k/v come apart.
The file is memory-mapped (gguf_file.py); each tensor is dequantized on its own,
converted and handed over, so peak memory stays near one model in the target dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType as QType

from glmserve.config import ModelConfig
from glmserve.engine.checkpoint.gguf_quant import KEPT_TYPES, read_quantized
from glmserve.engine.layers.quant import QuantWeight
from glmserve.gguf_file import GGUFFile, GGUFTensor, forget_gguf_files, is_gguf_file, open_gguf_file

__all__ = ["GGUFCheckpoint", "is_gguf_file", "open_gguf", "read_gguf_metadata"]

# GGUF arch -> are attn_q/attn_k rows permuted by llama.cpp's converter (`LlamaModel.permute`)?
# (`ChatGLMModel` keeps THUDM's row order: its rotary pairs are adjacent rows, as ggml's.)
SUPPORTED_ARCHS = {"llama": True, "qwen2": False, "chatglm": False}

# Types with a numpy dequantizer in gguf.quants, all block formats from ggml-quants.c.
SUPPORTED_TYPES = frozenset({
    QType.F32, QType.F16, QType.BF16,
    QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
})  # fmt: skip

_REQUIRED = object()


@dataclass(frozen=True)
class TensorNames:
    """GGUF tensor names (gguf-py `TENSOR_NAMES`) -> one model layout's module names."""

    layout: str  # for error messages
    top_level: dict[str, str]
    block: dict[str, str]  # `blk.N.<key>` -> `<block_prefix>.N.<value>`
    block_prefix: str

    def hf_name(self, gguf_name: str) -> str:
        """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (Llama names)."""
        stem, _, kind = gguf_name.rpartition(".")  # kind: weight | bias
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            hf_part = self.block.get(part)
            hf_stem = hf_part and f"{self.block_prefix}.{layer}.{hf_part}"
        else:
            hf_stem = self.top_level.get(stem)
        if hf_stem is None or kind not in ("weight", "bias"):
            raise ValueError(f"unsupported GGUF tensor {gguf_name!r} (no {self.layout} equivalent)")
        return f"{hf_stem}.{kind}"


LLAMA_NAMES = TensorNames(
    "Hugging Face Llama",
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "model.layers",
)
# `chatglm` from THUDM's files: attn_qkv is query_key_value (rows [q; k; v], with bias) and ffn_up is
# dense_h_to_4h (rows [gate; up], 2 * feed_forward_length of them), as llama.cpp's SWIGLU/SEQ reads it.
CHATGLM_NAMES = TensorNames(
    "THUDM ChatGLM",
    {
        "token_embd": "transformer.embedding.word_embeddings",
        "output_norm": "transformer.encoder.final_layernorm",
        "output": "transformer.output_layer",
    },
    {
        "attn_norm": "input_layernorm",
        "attn_qkv": "self_attention.query_key_value",
        "attn_output": "self_attention.dense",
        "ffn_norm": "post_attention_layernorm",
        "ffn_up": "mlp.dense_h_to_4h",
        "ffn_down": "mlp.dense_4h_to_h",
    },
    "transformer.encoder.layers",
)
# `chatglm` converted from transformers' GlmForCausalLM (e.g. glm-4-9b-chat-hf): q/k/v apart (with
# bias), ffn_up still the fused [gate; up] `gate_up_proj`.
_GLM_BLOCK = {k: v for k, v in LLAMA_NAMES.block.items() if k != "ffn_gate"} | {"ffn_up": "mlp.gate_up_proj"}
GLM_NAMES = TensorNames("transformers GLM", LLAMA_NAMES.top_level, _GLM_BLOCK, "model.layers")


@dataclass(frozen=True)
class GGUFCheckpoint:
    path: Path
    config: ModelConfig
    reader: GGUFFile = field(repr=False)
    is_rope_permuted: bool = False
    names: TensorNames = LLAMA_NAMES
    format: str = "gguf"
    quantization: str | None = None  # GGUF block types are kept by iter_tensors(keep_quantized=True)
    group_size: int | None = None

    def iter_tensors(
        self, dtype: torch.dtype, keep_quantized: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
        """(Hugging Face name, tensor in `dtype`), one tensor at a time, in file order.
        With keep_quantized, 2-D Q4_0 / Q4_1 / Q4_K weights come as exact Int4Weight and Q8_0 ones
        as Int8BlockWeight instead."""
        for tensor in self.reader.tensors:
            if keep_quantized and tensor.tensor_type in KEPT_TYPES and len(tensor.shape) == 2:
                weights = read_quantized(tensor)
            else:
                weights = dequantize_tensor(tensor).to(dtype)
            num_heads = self._permuted_heads(tensor.name)
            if num_heads is not None:
                weights = _unpermute(weights, num_heads)
            yield self.names.hf_name(tensor.name), weights
            tensor.release_pages()  # copied by now (a view still reads correctly: it faults back)
        forget_gguf_files()  # all read: no cached header keeps the file mapped past this checkpoint

    def _permuted_heads(self, gguf_name: str) -> int | None:
        if not self.is_rope_permuted:
            return None
        if ".attn_q." in gguf_name:
            return self.config.num_attention_heads
        if ".attn_k." in gguf_name:
            return self.config.num_key_value_heads
        return None


def open_gguf(path: Path) -> GGUFCheckpoint:
    reader = open_gguf_file(path)
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        supported = ", ".join(SUPPORTED_ARCHS)
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {supported}")
    if arch == "chatglm":
        config = chatglm_model_config(reader)
        names = CHATGLM_NAMES if config.architecture == "chatglm" else GLM_NAMES
    else:
        config, names = gguf_model_config(reader), LLAMA_NAMES
    check_tensors(reader, names)
    return GGUFCheckpoint(path, config, reader, is_rope_permuted=SUPPORTED_ARCHS[arch], names=names)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata key/values as plain Python values (str, int, float, bool, lists); no tensor data is read."""
    return dict(open_gguf_file(path).fields)


def check_tensors(reader: GGUFFile, names: TensorNames) -> None:
    """Fail at open time, not halfway through loading, on tensors we cannot map or dequantize."""
    for tensor in reader.tensors:
        names.hf_name(tensor.name)
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, not supported; supported: {supported}"
            )


def gguf_model_config(reader: GGUFFile) -> ModelConfig:
    arch = _value(reader, "general.architecture")
    tensor_names = {t.name for t in reader.tensors}
    # Llama's rotary covers whole heads: rope.dimension_count is the head size when key_length is absent.
    key_length = _value(reader, f"{arch}.attention.key_length", None)
    head_dim = key_length or _value(reader, f"{arch}.rope.dimension_count", None)
    return ModelConfig(
        architecture="llama",
        **_common_fields(reader, arch, head_dim),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        eos_token_ids=_eos_token_ids(reader),
        extra={"model_type": arch},
    )


# Tokens that end a ChatGLM3 / GLM-4 answer besides EOS (THUDM's generation eos_token_id list).
CHATGLM_STOP_TOKENS = ("<|user|>", "<|observation|>")


def chatglm_model_config(reader: GGUFFile) -> ModelConfig:
    """llama.cpp's `chatglm`: rotary on the first rope.dimension_count dims of each head (the
    converter writes head_dim / 2), as adjacent pairs (ggml's "normal" rope); q/k/v with bias.
    Architecture "chatglm" (THUDM layout) when q/k/v are fused, else "glm" (transformers')."""
    fields = _common_fields(reader, "chatglm", None)
    head_dim = fields["head_dim"]
    rotary_dim = _value(reader, "chatglm.rope.dimension_count")
    if not (0 < rotary_dim <= head_dim and rotary_dim % 2 == 0):
        raise ValueError(f"chatglm.rope.dimension_count={rotary_dim} does not fit heads of {head_dim} dims")
    tensor_names = {t.name for t in reader.tensors}
    is_fused = "blk.0.attn_qkv.weight" in tensor_names
    tokens = _value(reader, "tokenizer.ggml.tokens", [])
    stop_ids = [tokens.index(token) for token in CHATGLM_STOP_TOKENS if token in tokens]
    return ModelConfig(
        architecture="chatglm" if is_fused else "glm",
        **fields,
        tie_word_embeddings=False,  # THUDM's output_layer is its own matrix
        attention_bias=f"blk.0.{'attn_qkv' if is_fused else 'attn_q'}.bias" in tensor_names,
        eos_token_ids=tuple(dict.fromkeys([*_eos_token_ids(reader), *stop_ids])),
        extra={"model_type": "chatglm", "partial_rotary_factor": rotary_dim / head_dim},
    )


def _common_fields(reader: GGUFFile, arch: str, head_dim: int | None) -> dict[str, Any]:
    def arch_value(key: str, default: Any = _REQUIRED) -> Any:
        return _value(reader, f"{arch}.{key}", default)

    hidden_size = arch_value("embedding_length")
    num_heads = arch_value("attention.head_count")
    return dict(
        vocab_size=arch_value("vocab_size", None) or _num_tokens(reader),
        hidden_size=hidden_size,
        intermediate_size=arch_value("feed_forward_length"),
        num_hidden_layers=arch_value("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=arch_value("attention.head_count_kv", num_heads),
        head_dim=head_dim or arch_value("attention.key_length", None) or hidden_size // num_heads,
        rms_norm_eps=arch_value("attention.layer_norm_rms_epsilon"),
        rope_theta=arch_value("rope.freq_base", 10000.0),
        max_position_embeddings=arch_value("context_length"),
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id", None),
    )


def _value(reader: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    if key in reader.fields:
        return reader.fields[key]
    if default is _REQUIRED:
        raise ValueError(f"GGUF metadata has no {key!r}")
    return default


def _num_tokens(reader: GGUFFile) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("GGUF metadata has neither <arch>.vocab_size nor tokenizer.ggml.tokens")
    return len(tokens)


def _eos_token_ids(reader: GGUFFile) -> tuple[int, ...]:
    # eot/eom: end of turn / end of message, e.g. Llama 3's <|eot_id|>, <|eom_id|>.
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = (_value(reader, key, None) for key in keys)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def dequantize_tensor(tensor: GGUFTensor) -> torch.Tensor:
    """float32 tensor in torch layout. GGUF lists dims fastest-first (ne[0] = row length),
    so the torch shape is the GGUF shape reversed; `tensor.data` holds raw blocks per row."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(reversed(tensor.shape))
    if array.shape != shape:
        raise ValueError(f"GGUF tensor {tensor.name!r} dequantized to {array.shape}, expected {shape}")
    if not array.flags.writeable:
        array = array.copy()  # F32 comes back as a view of the read-only memmap
    return torch.from_numpy(array)


def _unpermute(weights: torch.Tensor | QuantWeight, num_heads: int) -> torch.Tensor | QuantWeight:
    if isinstance(weights, QuantWeight):
        return weights.map_rows(lambda rows: unpermute_rope_rows(rows, num_heads))
    return unpermute_rope_rows(weights, num_heads)


def unpermute_rope_rows(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` of attn_q / attn_k rows (weight or bias).

    Per head, llama.cpp interleaves the two rotary halves (rows x0, x_{d/2}, x1, x_{d/2+1}, ...)
    for its GPT-J style RoPE; Hugging Face keeps them split (x0..x_{d/2-1}, x_{d/2}..x_{d-1})
    for `rotate_half`. Same formula as transformers' `reverse_permute_weights`.
    """
    # [num_heads * head_dim, ...] -> [num_heads, head_dim // 2, 2, ...] -> [num_heads, 2, head_dim // 2, ...]
    return weights.unflatten(0, (num_heads, -1, 2)).transpose(1, 2).reshape(weights.shape)
