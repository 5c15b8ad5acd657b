"""Weight-only 4-bit and 8-bit weights, and the matmul each device runs them on.

Int4Weight is group-wise asymmetric: w[n, k] = q[n, k] * scale[n, g] + minimum[n, g] with
g = k // group_size and q in 0..15. GGUF's Q4_0 (minimum = -8 * scale), Q4_1 and Q4_K blocks are
exactly this form with group size 32, so a 4-bit GGUF keeps its weights bit for bit. Int8Weight is
per output channel: w[n, k] = q[n, k] * scale[n]. Int8BlockWeight is GGUF's Q8_0, int8 with one scale
per block of 32: no PyTorch kernel takes block scales for int8, but the same weight is exactly an
int4 one over the input repeated twice (`as_int4_halves`), which the int4 kernel runs.

`select_kernel` picks the form a layer is stored in, for the loader and the memory estimate alike:
- CPU, bf16 activations: `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int8pack_mm`
  (PackedInt4 / PackedInt8). For one token they read ~4x / 2x fewer bytes than bf16 and int4 is
  3-5x faster on this machine (PERF-NOTES). Both compute w = (q - 8) * scale + zero for int4,
  hence zero = minimum + 8 * scale.
- CUDA, bf16 activations, compute capability >= 8.0: int4 on tinygemm, `aten._weight_int4pack_mm`
  (PackedInt4Cuda), with the same zero-point convention.
- CPU, bf16, Q8_0 blocks: PackedInt8Blocks, the int4 kernel over [x, x] (1.5 ms for SmolLM2's
  49152x576 output layer against 4.5 ms for bf16 and 2 ms for per-channel int8).
- Everything else (fp32 / fp16 activations, MPS, GPUs before sm80, int8 on CUDA, shapes a kernel
  refuses): DequantInt4 / DequantInt8 keep the weight quantized and expand one layer at a time
  into the activation dtype for a dense GEMM. Memory stays at the quantized size plus one
  layer's float weight; a step is slower than dense (CPU fp32, 4096x4096, one row: ~11 ms int8,
  3 ms dense), so a layer that also keeps its dense weight never uses this form. Q8_0 blocks with
  no kernel are stored dense (select_kernel returns None).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


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

    def to(self, device: torch.device) -> Int4Weight:
        return Int4Weight(self.q.to(device), self.scale.to(device), self.minimum.to(device), self.group_size)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int) -> Int4Weight:
        """Asymmetric min/max rounding per group of `group_size` input columns."""
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
        q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
        scale = torch.empty(n, k // group_size, device=weight.device)
        minimum = torch.empty_like(scale)
        for rows in row_chunks(n, k):
            groups = weight[rows].to(torch.float32, copy=True).view(-1, k // group_size, group_size)
            low, high = groups.amin(-1), groups.amax(-1)
            step = ((high - low) / 15).clamp_(min=1e-8)
            groups.sub_(low[..., None]).div_(step[..., None]).round_().clamp_(0, 15)
            q[rows], scale[rows], minimum[rows] = groups.view(-1, k), step, low
        return Int4Weight(q, scale, minimum, group_size)

    @staticmethod
    def concat(parts: list[Int4Weight]) -> Int4Weight:
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot merge 4-bit shards with group sizes {sorted(sizes)}")
        if len(parts) == 1:
            return parts[0]  # no copy of a big layer's weight
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

    def to(self, device: torch.device) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device))

    @staticmethod
    def quantize(weight: torch.Tensor) -> Int8Weight:
        n, k = weight.shape
        q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        scale = torch.empty(n, device=weight.device)
        for rows in row_chunks(n, k):
            chunk = weight[rows].to(torch.float32, copy=True)  # a copy: modified in place
            step = (chunk.abs().amax(-1) / 127).clamp_(min=1e-8)
            q[rows], scale[rows] = chunk.div_(step[:, None]).round_().clamp_(-127, 127), step
        return Int8Weight(q, scale)

    @staticmethod
    def concat(parts: list[Int8Weight]) -> Int8Weight:
        if len(parts) == 1:
            return parts[0]  # no copy of a big layer's weight
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


@dataclass
class Int8BlockWeight:
    """GGUF Q8_0: w[n, k] = q[n, k] * scale[n, k // 32], q in -128..127."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // group_size] float32
    group_size: int = 32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.view(n, -1, self.group_size).float() * self.scale[..., None]).view(n, k)

    def map_rows(self, fn) -> Int8BlockWeight:
        return Int8BlockWeight(fn(self.q), fn(self.scale), self.group_size)

    def to(self, device: torch.device) -> Int8BlockWeight:
        return Int8BlockWeight(self.q.to(device), self.scale.to(device), self.group_size)

    def as_int4_halves(self, rows: slice = slice(None)) -> Int4Weight:
        """Rows of the same weight as an int4 one over the doubled input [x, x], exactly: with
        u = q + 128 in 0..255, w = 16 s (u >> 4) - 128 s + s (u & 15). Columns 0..K-1 hold the
        high nibbles (scale 16 s, minimum -128 s), columns K..2K-1 the low ones (scale s, minimum 0)."""
        u = (self.q[rows].to(torch.int16) + 128).to(torch.uint8)
        scale = self.scale[rows]
        return Int4Weight(
            torch.cat([u >> 4, u & 15], 1),
            torch.cat([16 * scale, scale], 1),
            torch.cat([-128 * scale, torch.zeros_like(scale)], 1),
            self.group_size,
        )

    @staticmethod
    def concat(parts: list[Int8BlockWeight]) -> Int8BlockWeight:
        if len(parts) == 1:
            return parts[0]
        return Int8BlockWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), parts[0].group_size)


QuantWeight = Int4Weight | Int8Weight | Int8BlockWeight

# Quantizing works on float32 copies of this many weights at a time: a bounded temporary (16 MiB)
# instead of several float32 copies of the whole matrix (4 GiB for ChatGLM3-6B's output layer).
QUANTIZE_CHUNK = 4 * 2**20


def row_chunks(n: int, k: int) -> list[slice]:
    rows = max(1, QUANTIZE_CHUNK // max(k, 1))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def quantized_bytes(scheme: str, shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> int:
    """Bytes of one [N, K] weight in any of its stored forms (they hold the same data): int8 q plus
    one scale per row; or two nibbles per byte plus a scale and a zero per group, in `dtype`
    (Q8_0 blocks as int4 over a doubled K)."""
    n, k = shape
    if scheme == "int8":
        return n * k + n * dtype.itemsize
    if scheme == "q8_0":
        return quantized_bytes("int4", (n, 2 * k), group_size, dtype)
    return n * -(-k // 2) + 2 * n * (k // group_size) * dtype.itemsize


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, ceil(K / 2)] uint8, column 2j in the high nibble and 2j + 1 in the
    low one: the input layout of CUDA's `_convert_weight_to_int4pack` (int4mm.cu moves a byte's high
    half where an int32 input would have column 2j; torchao and test_linalg's test__int4_mm build it
    as q[:, ::2] << 4 | q[:, 1::2]). An odd K gets a zero column."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


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
)
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)  # the only ones int4mm.cu instantiates


def select_kernel(
    scheme: str, shape: tuple[int, int], device: torch.device, dtype: torch.dtype, group_size: int = 0
) -> Kernel | None:
    """The stored form of an [N, K] "int8", "int4" or "q8_0" weight running with `dtype` activations
    on `device`; None for Q8_0 blocks without a kernel (stored dense)."""
    n, k = shape
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


def kernel_for(weight: QuantWeight, device: torch.device, dtype: torch.dtype) -> Kernel | None:
    if isinstance(weight, Int8Weight):
        return select_kernel("int8", weight.shape, device, dtype)
    if isinstance(weight, Int8BlockWeight):
        return select_kernel("q8_0", weight.shape, device, dtype, weight.group_size)
    return select_kernel("int4", weight.shape, device, dtype, weight.group_size)
