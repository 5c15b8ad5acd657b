"""Linear layers whose weights come from one or several checkpoint tensors.

`MergedLinear` holds several projections of the same input as one matrix (q/k/v, gate/up),
so a step runs one GEMM instead of several; `load_shard` copies a checkpoint tensor into
its rows. Weight-only quantization happens here, shard by shard as tensors load: a weight that
arrives 4-bit (a GGUF's) or is quantized on arrival (`quantization`) is packed for the int4 /
int8 kernels once all its shards are in, and the float weight, never written, is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.layers.quant import (
    Int4Weight,
    Int8Weight,
    PackedInt4,
    PackedInt8,
    QuantWeight,
    can_pack,
    pack,
)

# The CPU int4/int8 kernels beat bf16 GEMM for a few rows (decode of 1-4 sequences) and lose
# at 16 rows (measured on this 2-core Zen 4: 1536x576, 16 rows: int4 228 us, bf16 68 us), so a
# layer that also holds its dense weight uses it for bigger steps.
MAX_INT4_ROWS = 4


OUTPUT_LAYER_NAMES = ("lm_head", "output_layer")  # Llama / Baichuan, ChatGLM


def is_output_layer(module_path: str) -> bool:
    return module_path.rpartition(".")[2] in OUTPUT_LAYER_NAMES


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = [out_features]
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: PackedInt4 | PackedInt8 | None = None
        # Set by the loader before weights arrive:
        self.quantization: str | None = None  # "int8" | "int4": quantize float weights as they load
        self.group_size = 64  # int4 group size for quantize-on-load
        self.keep_dense_copy = False  # also keep the float weight for many-row steps (small models)
        self._pending: dict[int, QuantWeight] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (self.weight is None or x.shape[0] <= MAX_INT4_ROWS):
            out = self.packed.matmul(x)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, param_name: str, tensor: torch.Tensor | QuantWeight, shard: int = 0) -> None:
        """Copy one checkpoint tensor into rows `shard` of the weight (or bias)."""
        size = self.output_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} has {tensor.shape[0]} rows, expected {size}")
        if param_name == "weight" and isinstance(tensor, torch.Tensor) and self.quantization:
            tensor = self._quantize(tensor)
        if isinstance(tensor, Int4Weight | Int8Weight):
            self._load_quantized_shard(tensor, shard)
            return
        start = sum(self.output_sizes[:shard])
        getattr(self, param_name).data[start : start + size].copy_(tensor)

    def _quantize(self, tensor: torch.Tensor) -> QuantWeight:
        if self.quantization == "int8":
            return Int8Weight.quantize(tensor)
        return Int4Weight.quantize(tensor, self.group_size)

    def _load_quantized_shard(self, weight: QuantWeight, shard: int) -> None:
        self._pending[shard] = weight
        if len(self._pending) < len(self.output_sizes):
            return  # wait for the other projections of a merged layer
        merged = type(weight).concat([self._pending[i] for i in range(len(self.output_sizes))])
        self._pending = {}
        if can_pack(merged, self.weight.device, self.weight.dtype):
            self.packed = pack(merged, self.weight.dtype)
            if not self.keep_dense_copy:
                self.weight = None  # never written: its pages were never touched
                return
        self.weight.data.copy_(merged.dequantize())


class MergedLinear(Linear):
    """Output rows are the concatenation of `output_sizes` projections, in order."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes
