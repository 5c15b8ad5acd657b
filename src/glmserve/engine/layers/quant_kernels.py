"""The matmul each device runs a weight-only int4 / int8 weight (layers/quant.py) with.

`select_kernel` picks the form a layer is stored in, for the loader and the memory estimate alike:
- CPU, any float activations, with 8-bit activations allowed (the default; `--activation-precision
  float` keeps the forms below): glmserve's native kernels (kernels/native_linear.py, NativeInt4 /
  NativeInt8 for int4, int8 and Q8_0), which quantize activations per block of 32 to int8 and
  multiply in integers, as llama.cpp does. Where they cannot be built, the forms below.
- CPU, bf16 activations: `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int8pack_mm`
  (PackedInt4 / PackedInt8). For one token they read ~4x / 2x fewer bytes than bf16, and are
  several times faster than bf16 for one row (figures: docs/engine.md). Both compute
  w = (q - 8) * scale + zero for int4, hence zero = minimum + 8 * scale.
- CUDA, bf16 activations, compute capability >= 8.0: int4 on tinygemm, `aten._weight_int4pack_mm`
  (PackedInt4Cuda), with the same zero-point convention.
- CPU, bf16, Q8_0 blocks: PackedInt8Blocks, the int4 kernel over [x, x] (faster than bf16 and than
  per-channel int8 for a large output layer; docs/engine.md).
- Everything else (fp32 / fp16 activations, MPS, GPUs before sm80, int8 on CUDA, shapes a kernel
  refuses): DequantInt4 / DequantInt8 keep the weight quantized and expand one layer at a time
  into the activation dtype for a dense GEMM. Memory stays at the quantized size plus one
  layer's float weight; a step is slower than dense, so a layer that also keeps its dense weight
  never uses this form. Q8_0 blocks with no kernel are stored dense (select_kernel returns None).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from glmserve.engine.kernels import native
from glmserve.engine.kernels.native_linear import NativeInt4, NativeInt8
from glmserve.engine.layers.quant import (
    QUANTIZE_CHUNK,
    Int4Weight,
    Int8BlockWeight,
    Int8Weight,
    QuantWeight,
    pack_nibbles,
)


def _scales_and_zeros(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """[K // group_size, N, 2]: scale and zero of a group side by side (one 32-bit load in the kernels)."""
    zero = weight.minimum + 8 * weight.scale
    return torch.stack([weight.scale.t(), zero.t()], -1).contiguous().to(dtype)


@dataclass
class PackedInt8:
    """CPU: `_weight_int8pack_mm`."""

    is_fused: ClassVar[bool] = True  # reads the int8 weight inside the GEMM
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] in the activation dtype

    @staticmethod
    def from_weight(weight: Int8Weight, dtype: torch.dtype) -> PackedInt8:
        return PackedInt8(weight.q.contiguous(), weight.scale.to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel reads rows densely
        out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        return out.view(*x.shape[:-1], self.q.shape[0])


@dataclass
class PackedInt4:
    """CPU: `_weight_int4pack_mm_for_cpu`."""

    is_fused: ClassVar[bool] = True
    packed: torch.Tensor  # kernel layout, [N, K // 2] uint8
    scales_and_zeros: torch.Tensor  # [K // group_size, N, 2] in the activation dtype
    group_size: int
    out_features: int

    @staticmethod
    def from_weight(weight: Int4Weight, dtype: torch.dtype) -> PackedInt4:
        n, k = weight.shape
        return PackedInt4.from_row_blocks(n, k, weight.group_size, lambda span: weight.map_rows(lambda t: t[span]), dtype)

    @staticmethod
    def from_row_blocks(n: int, k: int, group_size: int, rows_of, dtype: torch.dtype) -> PackedInt4:
        """Pack an [N, K] Int4Weight whose rows `span` are `rows_of(span)`. The kernel packs rows in
        independent blocks of 64, so blocks of rows convert separately: the int32 input the op wants
        (and a derived weight's rows, as Q8_0 halves) is then a bounded temporary, not 4 bytes per
        weight at once."""
        rows = max(64, QUANTIZE_CHUNK // k // 64 * 64)
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scales_and_zeros = []
        for start in range(0, n, rows):
            span = slice(start, min(start + rows, n))
            block = rows_of(span)
            packed[span] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(block.q.to(torch.int32), 1)
            scales_and_zeros.append(_scales_and_zeros(block, dtype))
        return PackedInt4(packed, torch.cat(scales_and_zeros, 1), group_size, n)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel refuses strided rows
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group_size, self.scales_and_zeros
        )
        return out.view(*x.shape[:-1], self.out_features)


@dataclass
class PackedInt8Blocks:
    """CPU, Q8_0 blocks: the exact int4 form (Int8BlockWeight.as_int4_halves) over [x, x]."""

    is_fused: ClassVar[bool] = True
    halves: PackedInt4  # [N, 2K]

    @staticmethod
    def from_weight(weight: Int8BlockWeight, dtype: torch.dtype) -> PackedInt8Blocks:
        n, k = weight.shape
        return PackedInt8Blocks(PackedInt4.from_row_blocks(n, 2 * k, weight.group_size, weight.as_int4_halves, dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.halves.matmul(torch.cat([x, x], -1))


@dataclass
class PackedInt4Cuda:
    """CUDA: tinygemm, `_weight_int4pack_mm` (aten/src/ATen/native/cuda/int4mm.cu), bf16 only."""

    is_fused: ClassVar[bool] = True
    packed: torch.Tensor  # [N / 8, K / (inner_k_tiles * 16), 32, inner_k_tiles / 2] int32, mma tile layout
    scales_and_zeros: torch.Tensor  # [K // group_size, N, 2] bf16
    group_size: int
    out_features: int

    @staticmethod
    def from_weight(weight: Int4Weight, dtype: torch.dtype) -> PackedInt4Cuda:
        k = weight.shape[1]
        # 2, 4 or 8 k-tiles of 16 per lane word: 4-, 8- or 16-byte loads (torchao always uses 8).
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
        nibbles = pack_nibbles(weight.q).contiguous()  # [N, K / 2] uint8
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
        return PackedInt4Cuda(packed, _scales_and_zeros(weight, dtype), weight.group_size, weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] bf16 -> [..., N] bf16; the kernel reads x as a contiguous row-major matrix."""
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.view(*x.shape[:-1], self.out_features)


class _DequantBuffers(threading.local):
    """One float buffer per (device, dtype) and thread (each engine steps in its own thread), grown
    to the largest layer: a fresh 64 MiB CPU tensor per layer and step costs more page faults than
    the dequantization itself. Allocated outside inference mode, so tests may reuse it outside."""

    def __init__(self):
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop((device, dtype), None)  # free the smaller one first
            with torch.inference_mode(False):
                buffer = self.buffers[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


_dequant_buffers = _DequantBuffers()


@dataclass
class DequantInt4:
    """Any device / dtype: nibbles in memory, expanded per call into the activation dtype."""

    is_fused: ClassVar[bool] = False
    nibbles: torch.Tensor  # [N, ceil(K / 2)] uint8 (pack_nibbles)
    scale: torch.Tensor  # [N, K // group_size] in the activation dtype
    minimum: torch.Tensor  # [N, K // group_size] in the activation dtype
    group_size: int
    in_features: int

    @staticmethod
    def from_weight(weight: Int4Weight, dtype: torch.dtype) -> DequantInt4:
        scale, minimum = weight.scale.to(dtype), weight.minimum.to(dtype)
        return DequantInt4(pack_nibbles(weight.q), scale, minimum, weight.group_size, weight.shape[1])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] in `dtype`, in the shared buffer: valid until the next dequantization."""
        n, half = self.nibbles.shape
        w = _dequant_buffers.get(n * half * 2, dtype, self.nibbles.device).view(n, half, 2)
        w[..., 0] = self.nibbles >> 4
        w[..., 1] = self.nibbles & 0xF
        groups = w.view(n, half * 2)[:, : self.in_features].view(n, -1, self.group_size)  # [N, G, group]
        groups.mul_(self.scale[..., None]).add_(self.minimum[..., None])
        return groups.view(n, self.in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))


@dataclass
class DequantInt8:
    """Any device / dtype: int8 in memory, converted per call into the activation dtype."""

    is_fused: ClassVar[bool] = False
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] in the activation dtype

    @staticmethod
    def from_weight(weight: Int8Weight, dtype: torch.dtype) -> DequantInt8:
        return DequantInt8(weight.q.contiguous(), weight.scale.to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = _dequant_buffers.get(self.q.numel(), x.dtype, self.q.device).view_as(self.q).copy_(self.q)
        if x.dtype == torch.float16:  # x·q can pass fp16's 65504 where x·(q·scale) does not
            return F.linear(x, w.mul_(self.scale[:, None]))
        return F.linear(x, w) * self.scale  # scale the [..., N] output: one pass less over [N, K]


Kernel = (
    type[PackedInt4] | type[PackedInt8] | type[PackedInt8Blocks] | type[PackedInt4Cuda] | type[DequantInt4] | type[DequantInt8]
    | type[NativeInt4] | type[NativeInt8]
)
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)  # the only ones int4mm.cu instantiates


def select_kernel(
    scheme: str,
    shape: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    group_size: int = 0,
    int8_activations: bool = True,
) -> Kernel | None:
    """The stored form of an [N, K] "int8", "int4" or "q8_0" weight running with `dtype` activations
    on `device`; None for Q8_0 blocks without a kernel (stored dense)."""
    n, k = shape
    if int8_activations and device.type == "cpu" and k % 32 == 0 and group_size % 32 == 0 and native.load():
        return NativeInt4 if scheme == "int4" else NativeInt8
    is_cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
    if scheme == "q8_0":
        return PackedInt8Blocks if is_cpu_bf16 and n % 16 == 0 and k % group_size == 0 else None
    if scheme == "int8":
        # torch 2.13's CPU int8 kernel returns garbage (inf at K=40, errors of ~400 at K=56 or 72)
        # unless in_features is a multiple of 16. Its CUDA kernel (int8mm.cu) is one thread per
        # output element looping over K in fp32, no tiling: slower than dequantizing for cuBLAS.
        return PackedInt8 if is_cpu_bf16 and k % 16 == 0 else DequantInt8
    if is_cpu_bf16 and k % group_size == 0 and n % 16 == 0 and k % 32 == 0:
        return PackedInt4
    # tinygemm: N in tiles of 8, K in tiles of 32 or more (inner_k_tiles >= 2).
    tinygemm_shape = n % 8 == 0 and k % 32 == 0 and group_size in TINYGEMM_GROUP_SIZES and k % group_size == 0
    if tinygemm_shape and has_tinygemm(device, dtype):
        return PackedInt4Cuda
    return DequantInt4


def has_tinygemm(device: torch.device, dtype: torch.dtype) -> bool:
    """int4mm.cu's kernel takes bf16 activations only and is built for sm80+ (mma.sync bf16; for
    older GPUs its body is compiled out). ROCm builds tile N by 16 instead: left to the generic path."""
    if device.type != "cuda" or dtype != torch.bfloat16 or torch.version.hip:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def kernel_for(
    weight: QuantWeight, device: torch.device, dtype: torch.dtype, int8_activations: bool = True
) -> Kernel | None:
    if isinstance(weight, Int8Weight):  # per channel: one group of all columns
        return select_kernel("int8", weight.shape, device, dtype, weight.shape[1], int8_activations)
    scheme = "q8_0" if isinstance(weight, Int8BlockWeight) else "int4"
    return select_kernel(scheme, weight.shape, device, dtype, weight.group_size, int8_activations)
