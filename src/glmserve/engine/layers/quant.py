"""Weight-only 4-bit weights and the packed matmul they run on.

Int4Weight is group-wise asymmetric: w[n, k] = q[n, k] * scale[n, g] + minimum[n, g] with
g = k // group_size and q in 0..15. GGUF's Q4_0 (minimum = -8 * scale), Q4_1 and Q4_K blocks are
exactly this form with group size 32, so a 4-bit GGUF keeps its weights bit for bit.

On CPU the weights run on `aten._weight_int4pack_mm_for_cpu`, which computes
w = (q - 8) * scale + zero, hence zero = minimum + 8 * scale. For one token it reads ~4x fewer
bytes than bf16 and is 3-5x faster on this machine (PERF-NOTES); other devices dequantize once
at load for now.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.device import available_memory_bytes


@dataclass
class Int4Weight:
    q: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K // group_size] float32
    minimum: torch.Tensor  # [N, K // group_size] float32
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        groups = self.q.view(n, k // self.group_size, self.group_size).float()
        return (groups * self.scale[..., None] + self.minimum[..., None]).view(n, k)

    def map_rows(self, fn) -> Int4Weight:
        """Apply the same row reordering (e.g. undoing a RoPE permutation) to every part."""
        return Int4Weight(fn(self.q), fn(self.scale), fn(self.minimum), self.group_size)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int) -> Int4Weight:
        """Asymmetric min/max rounding per group of `group_size` input columns."""
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
        groups = weight.float().view(n, k // group_size, group_size)
        minimum, maximum = groups.amin(-1), groups.amax(-1)
        scale = ((maximum - minimum) / 15).clamp(min=1e-8)
        q = ((groups - minimum[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return Int4Weight(q.view(n, k), scale, minimum, group_size)

    @staticmethod
    def concat(parts: list[Int4Weight]) -> Int4Weight:
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot merge 4-bit shards with group sizes {sorted(sizes)}")
        return Int4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.minimum for p in parts]),
            parts[0].group_size,
        )


@dataclass
class Int8Weight:
    """Per-output-channel symmetric int8: w[n, k] = q[n, k] * scale[n]."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    @staticmethod
    def quantize(weight: torch.Tensor) -> Int8Weight:
        weight = weight.float()
        scale = (weight.abs().amax(-1) / 127).clamp(min=1e-8)
        return Int8Weight((weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale)

    @staticmethod
    def concat(parts: list[Int8Weight]) -> Int8Weight:
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


@dataclass
class PackedInt8:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] in the activation dtype

    @staticmethod
    def from_weight(weight: Int8Weight, dtype: torch.dtype) -> PackedInt8:
        return PackedInt8(weight.q.contiguous(), weight.scale.to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        return out.view(*x.shape[:-1], self.q.shape[0])


QuantWeight = Int4Weight | Int8Weight


def supports_weight_only_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """The packed CPU kernels want bf16 activations (with fp32 ones they are ~10x slower than a
    dense GEMM); other devices are not wired yet and dequantize at load."""
    return device.type == "cpu" and dtype == torch.bfloat16


def keeps_dense_copy(dense_weight_bytes: int, device: torch.device) -> bool:
    """4-bit layers also keep their dense weight for many-row steps when all dense weights take
    under a quarter of free memory (a small model); big models stay 4-bit only."""
    return dense_weight_bytes < available_memory_bytes(device) / 4


def pack(weight: QuantWeight, dtype: torch.dtype) -> PackedInt4 | PackedInt8:
    if isinstance(weight, Int4Weight):
        return PackedInt4.from_weight(weight, dtype)
    return PackedInt8.from_weight(weight, dtype)


def can_pack(weight: QuantWeight, device: torch.device, dtype: torch.dtype) -> bool:
    if isinstance(weight, Int8Weight):
        # torch 2.13's CPU int8 kernel returns garbage (inf at K=40, errors of ~400 at K=56 or 72)
        # unless in_features is a multiple of 16: such layers are dequantized instead.
        return supports_weight_only_kernels(device, dtype) and weight.shape[1] % 16 == 0
    return can_pack_int4(weight, device, dtype)


def can_pack_int4(weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> bool:
    n, k = weight.shape
    shapes_ok = k % weight.group_size == 0 and n % 16 == 0 and k % 32 == 0
    return supports_weight_only_kernels(device, dtype) and shapes_ok


@dataclass
class PackedInt4:
    packed: torch.Tensor  # kernel layout, [N, K // 2] uint8
    scales_and_zeros: torch.Tensor  # [K // group_size, N, 2] in the activation dtype
    group_size: int
    out_features: int

    @staticmethod
    def from_weight(weight: Int4Weight, dtype: torch.dtype) -> PackedInt4:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
        zero = weight.minimum + 8 * weight.scale
        scales_and_zeros = torch.stack([weight.scale.t(), zero.t()], -1).contiguous().to(dtype)
        return PackedInt4(packed, scales_and_zeros, weight.group_size, weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.view(*x.shape[:-1], self.out_features)
