"""Linear layers whose weights come from one or several checkpoint tensors.

`MergedLinear` holds several projections of the same input as one matrix (q/k/v, gate/up),
so a step runs one GEMM instead of several; `load_shard` copies a checkpoint tensor into
its rows. A weight may arrive 4-bit (Int4Weight): it is then packed for the int4 kernel and
the float weight, never written, is dropped (its pages were never touched).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.layers.quant import Int4Weight, PackedInt4, can_pack_int4

# The CPU int4 kernel beats bf16 GEMM for a few rows (decode of 1-4 sequences) and loses
# 3x at 16 rows (measured on this 2-core Zen 4: 1536x576, 16 rows: int4 228 us, bf16 68 us).
MAX_INT4_ROWS = 4


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = [out_features]
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.int4: PackedInt4 | None = None
        # Also keep the dequantized weight for steps of many rows, where dense GEMMs win (set by the loader).
        self.keep_dense_copy = False
        self._int4_shards: dict[int, Int4Weight] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and (self.weight is None or x.shape[0] <= MAX_INT4_ROWS):
            out = self.int4.matmul(x)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, param_name: str, tensor: torch.Tensor | Int4Weight, shard: int = 0) -> None:
        """Copy one checkpoint tensor into rows `shard` of the weight (or bias)."""
        size = self.output_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} has {tensor.shape[0]} rows, expected {size}")
        if isinstance(tensor, Int4Weight):
            self._load_int4_shard(tensor, shard)
            return
        start = sum(self.output_sizes[:shard])
        getattr(self, param_name).data[start : start + size].copy_(tensor)

    def _load_int4_shard(self, weight: Int4Weight, shard: int) -> None:
        self._int4_shards[shard] = weight
        if len(self._int4_shards) < len(self.output_sizes):
            return  # wait for the other projections of a merged layer
        merged = Int4Weight.concat([self._int4_shards[i] for i in range(len(self.output_sizes))])
        self._int4_shards = {}
        if can_pack_int4(merged, self.weight.device, self.weight.dtype):
            self.int4 = PackedInt4.from_weight(merged, self.weight.dtype)
            if not self.keep_dense_copy:
                self.weight = None
                return
        self.weight.data.copy_(merged.dequantize())


class MergedLinear(Linear):
    """Output rows are the concatenation of `output_sizes` projections, in order."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes
