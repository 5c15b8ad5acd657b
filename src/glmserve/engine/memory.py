"""Memory estimate without loading weights: weights as they will be stored, KV cache per token.

Used by `glmserve estimate` and at engine start (logged, and a configuration that cannot fit is
refused with the numbers). Weights follow the same policy as the loader: linear layers in the
chosen scheme (the output layer int8 under int8/int4), everything else in the compute dtype, a
GGUF's 4-bit layers kept 4-bit by default (plus a dense copy on small models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.device import resolve_dtype
from glmserve.engine.gguf_int4 import GROUP_SIZE as GGUF_GROUP_SIZE
from glmserve.engine.gguf_int4 import INT4_TYPES
from glmserve.engine.layers.linear import Linear, is_output_layer
from glmserve.engine.layers.quant import keeps_dense_copy
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


def estimate_memory(checkpoint, engine_config: EngineConfig, max_model_len: int) -> MemoryEstimate:
    device = torch.device(engine_config.device)
    dtype = resolve_dtype(engine_config.dtype, device)
    quantization = getattr(checkpoint, "quantization", None) or engine_config.quantization
    group_size = getattr(checkpoint, "group_size", engine_config.quantization_group_size)
    if checkpoint.format == "gguf" and quantization in (None, "int4"):
        weights = _gguf_weights_bytes(checkpoint, dtype, keep_dense=quantization is None, device=device)
    else:
        weights = _model_weights_bytes(checkpoint.config, dtype, quantization, group_size)
    return MemoryEstimate(
        weights_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(checkpoint.config, dtype),
        max_model_len=max_model_len,
        max_num_seqs=engine_config.max_num_seqs,
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization or "as in the checkpoint",
    )


def int4_bytes(numel: int, group_size: int, dtype: torch.dtype) -> int:
    return numel // 2 + (numel // group_size) * 2 * dtype.itemsize  # nibbles + scale and zero per group


def _gguf_weights_bytes(checkpoint, dtype: torch.dtype, keep_dense: bool, device: torch.device) -> int:
    tensors = checkpoint.reader.tensors
    dense = sum(int(t.n_elements) for t in tensors) * dtype.itemsize
    keep_dense = keep_dense and keeps_dense_copy(dense, device)
    total = 0
    for t in tensors:
        numel = int(t.n_elements)
        if t.tensor_type in INT4_TYPES and len(t.shape) == 2 and dtype == torch.bfloat16:
            total += int4_bytes(numel, GGUF_GROUP_SIZE, dtype) + (numel * dtype.itemsize if keep_dense else 0)
        else:
            total += numel * dtype.itemsize
    return total


def _model_weights_bytes(config: ModelConfig, dtype: torch.dtype, quantization: str | None, group_size: int) -> int:
    with torch.device("meta"):
        model = model_class(config)(config)
    total = 0
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            numel = param.numel()
            scheme = quantization if isinstance(module, Linear) and name == "weight" else None
            if scheme in ("int8", "int4") and is_output_layer(path):
                scheme = "int8"
            if scheme == "int8":
                total += numel + module.out_features * dtype.itemsize
            elif scheme == "int4":
                total += int4_bytes(numel, group_size, dtype)
            else:
                total += numel * dtype.itemsize
    return total
