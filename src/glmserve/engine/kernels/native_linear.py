"""Weight forms for the native CPU kernels (kernels/native.py, csrc/quant_linear.cpp): int4 / int8
weights times activations quantized to int8 per block of 32, as llama.cpp computes.

Few-row steps (decodes) run the fused kernel, which streams each weight once for up to 8 rows at
a time. A layer that also keeps a dense copy (small models) hands steps of more than `max_rows`
rows to it; without one, steps of up to FUSED_ROWS run the fused kernel 8 rows at a time, and
longer ones (prompts) dequantize the weight a slice of rows at a time into the activation dtype
for a dense GEMM (oneDNN: AMX or AVX-512 BF16 where the CPU has them), which beats re-streaming
the weight for every 8 rows there; the slices keep that buffer bounded.

The stored forms are exact: GGUF Q4_0 / Q4_1 blocks keep their bytes (our nibble order is
GGUF's) and float16 scales; scales that float16 cannot hold exactly (Q4_K's products) stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from glmserve.engine.kernels import native
from glmserve.engine.layers.quant import Int4Weight, Int8BlockWeight, Int8Weight, row_chunks

# Rows up to which the fused kernel beats a dense copy of the weight, and (no dense copy) up to
# which it beats dequantizing slices for a dense GEMM (measured: docs/engine.md, "Native kernels").
MAX_FUSED_ROWS = 8
FUSED_ROWS = 64
SLICE_BYTES = 64 * 2**20  # the dequantized slice of a many-row step


def gguf_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K / 2] uint8 in GGUF's block order: per 32 columns, byte j holds
    column j in its low nibble and column 16 + j in its high one."""
    n, k = q.shape
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=q.device)
    for rows in row_chunks(n, k):
        blocks = q[rows].view(-1, k // 32, 2, 16)
        out[rows] = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).view(-1, k // 2)
    return out


def exact_half(values: torch.Tensor) -> torch.Tensor:
    """float16 where that holds every value exactly (GGUF's scales, ours), else float32."""
    half = values.to(torch.float16)
    return half if torch.equal(half.float(), values.float()) else values.float().contiguous()


def _dequantized_linear(x: torch.Tensor, weight, out_features: int) -> torch.Tensor:
    """x [M, K] @ W.T, W dequantized `rows` at a time into x's dtype."""
    k = x.shape[-1]
    rows = max(16, SLICE_BYTES // (k * x.dtype.itemsize) // 16 * 16)
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    buffer = torch.empty(min(rows, out_features), k, dtype=x.dtype)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        part = buffer[: stop - start]
        weight.dequantize_into(start, part)
        out[:, start:stop] = F.linear(x, part)
    return out


@dataclass
class NativeInt4:
    """Group-wise int4: w = q * scale + min per group of `group_size` columns (a multiple of 32)."""

    is_fused: ClassVar[bool] = True
    max_rows: ClassVar[int] = MAX_FUSED_ROWS
    nibbles: torch.Tensor  # [N, K / 2] uint8, GGUF block order
    scales: torch.Tensor  # [N, K / group_size] float16 (exact) or float32
    mins: torch.Tensor | None  # like scales; None: min = -8 * scale (Q4_0)
    group_size: int

    in_features: int

    @staticmethod
    def from_weight(weight: Int4Weight, dtype: torch.dtype) -> NativeInt4:
        if not native.load():
            raise RuntimeError("the native CPU kernels are not available here")
        scales = exact_half(weight.scale)
        is_symmetric = torch.equal(weight.minimum, -8 * weight.scale)
        mins = None if is_symmetric else exact_half(weight.minimum).to(scales.dtype)
        return NativeInt4(gguf_nibbles(weight.q), scales, mins, weight.group_size, weight.shape[1])

    @property
    def out_features(self) -> int:
        return self.nibbles.shape[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > FUSED_ROWS:
            out = _dequantized_linear(flat, self, self.out_features)
        else:
            out = torch.ops.glmserve.int4_linear(flat, self.nibbles, self.scales, self.mins, self.group_size)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize_into(self, row0: int, out: torch.Tensor) -> None:
        torch.ops.glmserve.int4_dequantize(self.nibbles, self.scales, self.mins, self.group_size, row0, out)


@dataclass
class NativeInt8:
    """int8: w = q * scale per group of `group_size` columns (in_features: per channel; 32: Q8_0)."""

    is_fused: ClassVar[bool] = True
    max_rows: ClassVar[int] = MAX_FUSED_ROWS
    q: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N, K / group_size] float16 (exact) or float32
    group_size: int

    @staticmethod
    def from_weight(weight: Int8Weight | Int8BlockWeight, dtype: torch.dtype) -> NativeInt8:
        if not native.load():
            raise RuntimeError("the native CPU kernels are not available here")
        if isinstance(weight, Int8BlockWeight):
            return NativeInt8(weight.q.contiguous(), exact_half(weight.scale), weight.group_size)
        return NativeInt8(weight.q.contiguous(), weight.scale.float().view(-1, 1), weight.q.shape[1])

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > FUSED_ROWS:
            out = _dequantized_linear(flat, self, self.out_features)
        else:
            out = torch.ops.glmserve.int8_linear(flat, self.q, self.scales, self.group_size)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize_into(self, row0: int, out: torch.Tensor) -> None:
        torch.ops.glmserve.int8_dequantize(self.q, self.scales, self.group_size, row0, out)


NATIVE_KERNELS = (NativeInt4, NativeInt8)
