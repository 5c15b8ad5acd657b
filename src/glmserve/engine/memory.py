"""Memory estimate without loading weights: weights as they will be stored, KV cache per token.

Used by `glmserve estimate` and at engine start (logged, and a configuration that cannot fit is
refused with the numbers). Weights follow the same policy as the loader: linear layers in the
chosen scheme (the output layer int8 under int8/int4), everything else in the compute dtype, a
GGUF's 4-bit and Q8_0 layers kept so by default (plus a dense copy on small models; a tied quantized
embedding also serves as the output layer in its file form). Each quantized layer
is counted in the form `select_kernel` gives it on the device; layers that dequantize per call also
need the float buffer of the largest of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QType

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.checkpoint import Checkpoint, weight_quantization
from glmserve.engine.checkpoint.gguf_quant import GROUP_SIZE as GGUF_GROUP_SIZE
from glmserve.engine.checkpoint.gguf_quant import INT4_TYPES
from glmserve.engine.device import Placement
from glmserve.engine.kernels.native_linear import NATIVE_KERNELS
from glmserve.engine.layers.linear import Linear, is_output_layer, prepacks
from glmserve.engine.layers.quant import quantized_bytes
from glmserve.engine.layers.quant_kernels import select_kernel
from glmserve.engine.models import model_class

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    max_num_seqs: int
    dtype: str
    quantization: str

    @property
    def kv_bytes_full(self) -> int:
        """KV for max_num_seqs requests at max_model_len tokens each (the most the engine uses)."""
        return self.kv_bytes_per_token * self.max_model_len * self.max_num_seqs

    def lines(self) -> list[str]:
        return [
            f"weights: {self.weights_bytes / GIB:.2f} GiB ({self.dtype}, quantization {self.quantization})",
            f"KV cache: {self.kv_bytes_per_token / 1024:.1f} KiB per token; "
            f"{self.kv_bytes_per_token * self.max_model_len / GIB:.2f} GiB per {self.max_model_len}-token sequence; "
            f"{self.kv_bytes_full / GIB:.2f} GiB for {self.max_num_seqs} such sequences",
            f"total at full use: {(self.weights_bytes + self.kv_bytes_full) / GIB:.2f} GiB",
        ]


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def estimate_memory(
    checkpoint: Checkpoint, engine_config: EngineConfig, max_model_len: int, placement: Placement
) -> MemoryEstimate:
    dtype = placement.dtype
    quantization, group_size = weight_quantization(checkpoint, engine_config)
    int8 = engine_config.activation_precision == "int8"
    if checkpoint.format == "gguf" and quantization in (None, "int4"):
        weights = _gguf_weights_bytes(checkpoint, placement, keep_dense=quantization is None, int8_activations=int8)
    else:
        weights = _model_weights_bytes(checkpoint.config, placement, quantization, group_size, int8)
    return MemoryEstimate(
        weights_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(checkpoint.config, dtype),
        max_model_len=max_model_len,
        max_num_seqs=engine_config.max_num_seqs,
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization or "as in the checkpoint",
    )


@dataclass
class _WeightBytes:
    """Bytes stored, plus the one float buffer that layers dequantizing per call share."""

    device: torch.device
    dtype: torch.dtype
    int8_activations: bool
    stored: int = 0
    buffer: int = 0

    @property
    def total(self) -> int:
        return self.stored + self.buffer

    def add_dense(self, numel: int) -> None:
        self.stored += numel * self.dtype.itemsize

    def add_quantized(self, scheme: str, shape: tuple[int, int], group_size: int, keep_dense: bool) -> None:
        """One linear weight [N, K], stored as Linear._store_weight stores it."""
        dense = shape[0] * shape[1] * self.dtype.itemsize
        kernel = select_kernel(scheme, shape, self.device, self.dtype, group_size, self.int8_activations)
        quantized = quantized_bytes(scheme, shape, group_size, self.dtype, kernel in NATIVE_KERNELS)
        if kernel is None:  # Q8_0 blocks with no kernel: stored dense
            self.stored += dense
            return
        if keep_dense:
            self.stored += dense + (quantized if kernel.is_fused else 0)
            return
        self.stored += quantized
        if not kernel.is_fused:
            self.buffer = max(self.buffer, dense)


# llama.cpp names of the projections every model here holds merged (its packed_modules): one Linear.
GGUF_MERGED = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "ffn_gate": "ffn_up"}


def _gguf_weights_bytes(checkpoint, placement: Placement, keep_dense: bool, int8_activations: bool) -> int:
    device, dtype, tensors = placement.device, placement.dtype, checkpoint.reader.tensors
    dense = sum(int(t.n_elements) for t in tensors) * dtype.itemsize
    keep_dense = keep_dense and placement.keeps_dense_copy(dense)
    weights = _WeightBytes(device, dtype, int8_activations)
    for group in _gguf_linear_groups(tensors).values():
        scheme = _kept_scheme(group) if _is_linear(group[0]) else None
        if scheme is None:
            weights.add_dense(sum(int(t.n_elements) for t in group))
        else:  # GGUF lists dimensions innermost first: [K, N]
            shape = (sum(int(t.shape[1]) for t in group), int(group[0].shape[0]))
            weights.add_quantized(scheme, shape, GGUF_GROUP_SIZE, keep_dense)
    weights.stored += _tied_output_copy_bytes(checkpoint.config, dtype, device, keep_dense)
    embedding = next((t for t in tensors if t.name == "token_embd.weight"), None)
    scheme = _kept_scheme([embedding]) if embedding is not None else None
    if checkpoint.config.tie_word_embeddings and scheme is not None:  # models/llama.py, keep_quantized_output
        shape = (int(embedding.shape[1]), int(embedding.shape[0]))
        kernel = select_kernel(scheme, shape, device, dtype, GGUF_GROUP_SIZE, int8_activations)
        if kernel is not None and kernel.is_fused:
            weights.stored += quantized_bytes(scheme, shape, GGUF_GROUP_SIZE, dtype, kernel in NATIVE_KERNELS)
    return weights.total


def _tied_output_copy_bytes(config: ModelConfig, dtype: torch.dtype, device: torch.device, keep_dense: bool) -> int:
    """models/llama.py, prepack_tied_output: small CPU bf16 models keep a second copy of a tied
    output layer, in oneDNN's layout."""
    if config.tie_word_embeddings and keep_dense and prepacks(device, dtype):
        return config.vocab_size * config.hidden_size * dtype.itemsize
    return 0


def _is_linear(tensor) -> bool:
    return len(tensor.shape) == 2 and tensor.name != "token_embd.weight"  # the embedding loads dense


def _kept_scheme(group: list) -> str | None:
    """How the loader keeps a group of GGUF tensors that form one weight: "int4", "q8_0" or None (dense)."""
    if all(t.tensor_type in INT4_TYPES for t in group):
        return "int4"
    if all(t.tensor_type == QType.Q8_0 for t in group):
        return "q8_0"
    return None


def _gguf_linear_groups(tensors) -> dict[str, list]:
    """Tensors as the model holds them: 'blk.3.attn_qkv' -> [attn_q, attn_k, attn_v]; every other
    tensor alone (the embedding, 1-D, and the 2-D weights of unmerged layers)."""
    groups: dict[str, list] = {}
    for t in tensors:
        stem, _, kind = t.name.rpartition(".")
        prefix, _, part = stem.rpartition(".")
        key = f"{prefix}.{GGUF_MERGED.get(part, part)}.{kind}" if _is_linear(t) else t.name
        groups.setdefault(key, []).append(t)
    return groups


def _model_weights_bytes(
    config: ModelConfig, placement: Placement, quantization: str | None, group_size: int, int8_activations: bool
) -> int:
    device, dtype = placement.device, placement.dtype
    with torch.device("meta"):
        model = model_class(config)(config)
    weights = _WeightBytes(device, dtype, int8_activations)
    dense = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    keep_dense = quantization is None and placement.keeps_dense_copy(dense)  # as ModelRunner decides
    weights.stored += _tied_output_copy_bytes(config, dtype, device, keep_dense)
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            scheme = quantization if isinstance(module, Linear) and name == "weight" else None
            if scheme in ("int8", "int4") and is_output_layer(path):
                scheme = "int8"
            if scheme in ("int8", "int4"):
                weights.add_quantized(scheme, tuple(param.shape), group_size, keep_dense=False)
            else:
                weights.add_dense(param.numel())
    return weights.total
