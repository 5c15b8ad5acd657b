"""Weight-only 4-bit and 8-bit weights: their stored formats and how float weights become them.

Int4Weight is group-wise asymmetric: w[n, k] = q[n, k] * scale[n, g] + minimum[n, g] with
g = k // group_size and q in 0..15. GGUF's Q4_0 (minimum = -8 * scale), Q4_1 and Q4_K blocks are
exactly this form with group size 32, so a 4-bit GGUF keeps its weights bit for bit. Int8Weight is
per output channel: w[n, k] = q[n, k] * scale[n]. Int8BlockWeight is GGUF's Q8_0, int8 with one scale
per block of 32: no PyTorch kernel takes block scales for int8, but the same weight is exactly an
int4 one over the input repeated twice (`as_int4_halves`), which the int4 kernel runs.
The matmul each device runs them with is in layers/quant_kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        """Asymmetric min/max rounding per group of `group_size` input columns. Scale and minimum
        are rounded to float16 first (q is then rounded against them), so the native kernels
        store them in two bytes each, exactly, as GGUF's Q4_1 does."""
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
        q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
        scale = torch.empty(n, k // group_size, device=weight.device)
        minimum = torch.empty_like(scale)
        for rows in row_chunks(n, k):
            groups = weight[rows].to(torch.float32, copy=True).view(-1, k // group_size, group_size)
            low = groups.amin(-1).half().float()
            step = ((groups.amax(-1) - low) / 15).clamp_(min=2**-24).half().float()  # float16 subnormals are exact too
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


def quantized_bytes(scheme: str, shape: tuple[int, int], group_size: int, dtype: torch.dtype, native: bool = False) -> int:
    """Bytes of one [N, K] weight in any of its stored forms (they hold the same data): int8 q plus
    one scale per row; or two nibbles per byte plus a scale and a zero per group, in `dtype`
    (Q8_0 blocks as int4 over a doubled K). The native CPU kernels keep scales in float16 (exact:
    GGUF's and our quantizer's scales are float16 values) and Q8_0 as int8 with a scale per block."""
    n, k = shape
    scale_bytes = 2 if native else dtype.itemsize
    if scheme == "int8":
        return n * k + n * 4 if native else n * k + n * dtype.itemsize
    if scheme == "q8_0":
        return n * k + n * (k // group_size) * 2 if native else quantized_bytes("int4", (n, 2 * k), group_size, dtype)
    return n * -(-k // 2) + 2 * n * (k // group_size) * scale_bytes


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, ceil(K / 2)] uint8, column 2j in the high nibble and 2j + 1 in the
    low one: the input layout of CUDA's `_convert_weight_to_int4pack` (int4mm.cu moves a byte's high
    half where an int32 input would have column 2j; torchao and test_linalg's test__int4_mm build it
    as q[:, ::2] << 4 | q[:, 1::2]). An odd K gets a zero column."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
