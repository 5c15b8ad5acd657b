"""Which form a quantized layer takes per device and dtype (no GPU needed: capability queries are
patched), and that each form computes its dequantized reference: the dequantizing path on CPU here,
the CUDA kernels where a GPU is present."""

import pytest
import torch

from glmserve.engine.kernels import native
from glmserve.engine.kernels.native_linear import NativeInt4, NativeInt8
from glmserve.engine.layers.linear import Linear, MergedLinear
from glmserve.engine.layers.quant import Int4Weight, Int8Weight, pack_nibbles
from glmserve.engine.layers.quant_kernels import (
    DequantInt4,
    DequantInt8,
    PackedInt4,
    PackedInt4Cuda,
    PackedInt8,
    select_kernel,
)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Relative to the output's largest magnitude: bf16 keeps ~3 significant digits, fp16 ~4.
TOLERANCE = {FP32: 1e-4, FP16: 5e-3, BF16: 2e-2}
HAS_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def random_int4(rows, cols, group_size, seed=0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return Int4Weight.quantize(torch.randn(rows, cols, generator=g), group_size)


def assert_matches(got, x, dense):
    expected = x.float() @ dense.t().to(x.device)
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


# -- the CUDA kernel's input layout -----------------------------------------------------------
def test_nibbles_put_even_columns_in_the_high_half():
    q = torch.tensor([[1, 2, 3, 4, 5], [15, 0, 0, 15, 7]], dtype=torch.uint8)
    assert pack_nibbles(q).tolist() == [[0x12, 0x34, 0x50], [0xF0, 0x0F, 0x70]]  # odd K: zero column


@pytest.mark.parametrize("cols", [64, 45])
def test_nibble_packing_round_trips(cols):
    q = torch.randint(0, 16, (9, cols), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_nibbles(q)  # [9, ceil(cols / 2)]
    unpacked = torch.stack([packed >> 4, packed & 0xF], -1).view(9, -1)[:, :cols]
    assert torch.equal(unpacked, q)
    group = 9 if cols % 2 else 32  # 45 = 5 groups of 9
    weight = Int4Weight(q, torch.ones(9, cols // group), torch.zeros(9, cols // group), group)
    assert torch.equal(DequantInt4.from_weight(weight, FP32).dequantize(FP32), q.float())


# -- kernel selection -------------------------------------------------------------------------
@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be on an NVIDIA GPU of the given compute capability."""

    def set_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.version, "hip", None)

    return set_capability


@pytest.mark.parametrize("dtype", [BF16, FP32, FP16])
def test_cpu_runs_the_native_kernels_with_int8_activations(dtype):
    assert native.load(), "the native kernels should build on the test machines"
    assert select_kernel("int4", (24, 128), CPU, dtype, 32) is NativeInt4
    assert select_kernel("int4", (64, 4096), CPU, dtype, 64) is NativeInt4
    assert select_kernel("int8", (7, 96), CPU, dtype, 96) is NativeInt8
    assert select_kernel("q8_0", (64, 576), CPU, dtype, 32) is NativeInt8
    assert select_kernel("int4", (64, 72), CPU, dtype, 24) is DequantInt4  # K % 32: not native


def test_cpu_bf16_keeps_its_packed_kernels_with_float_activations():
    float_acts = {"int8_activations": False}
    assert select_kernel("int4", (64, 128), CPU, BF16, 32, **float_acts) is PackedInt4
    assert select_kernel("int8", (64, 128), CPU, BF16, **float_acts) is PackedInt8
    assert select_kernel("int8", (64, 40), CPU, BF16, **float_acts) is DequantInt8  # wrong at K % 16
    assert select_kernel("int4", (24, 128), CPU, BF16, 32, **float_acts) is DequantInt4  # N % 16


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_cpu_without_bf16_dequantizes_with_float_activations(dtype):
    assert select_kernel("int4", (64, 128), CPU, dtype, 32, int8_activations=False) is DequantInt4
    assert select_kernel("int8", (64, 128), CPU, dtype, int8_activations=False) is DequantInt8


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_cuda_sm80_runs_int4_on_tinygemm(gpu, capability):
    gpu(capability)
    assert select_kernel("int4", (64, 128), CUDA, BF16, 32) is PackedInt4Cuda
    assert select_kernel("int4", (4096, 4096), CUDA, BF16, 256) is PackedInt4Cuda
    assert select_kernel("int8", (64, 128), CUDA, BF16) is DequantInt8  # CUDA's int8 kernel is a naive loop
    assert select_kernel("int4", (64, 128), CUDA, FP16, 32) is DequantInt4  # bf16 activations only
    assert select_kernel("int4", (12, 128), CUDA, BF16, 32) is DequantInt4  # N % 8
    assert select_kernel("int4", (64, 48), CUDA, BF16, 16) is DequantInt4  # K % 32, group 16


def test_cuda_before_sm80_and_rocm_dequantize(gpu, monkeypatch):
    gpu((7, 5))
    assert select_kernel("int4", (64, 128), CUDA, BF16, 32) is DequantInt4
    gpu((9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert select_kernel("int4", (64, 128), CUDA, BF16, 32) is DequantInt4


def test_mps_dequantizes():
    assert select_kernel("int4", (64, 128), MPS, BF16, 32) is DequantInt4
    assert select_kernel("int8", (64, 128), MPS, FP16) is DequantInt8


# -- the dequantizing path --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize(("rows", "cols", "group_size"), [(24, 96, 32), (7, 45, 15), (40, 256, 64)])
def test_dequant_int4_matches_reference(dtype, rows, cols, group_size):
    weight = random_int4(rows, cols, group_size)
    x = torch.randn(5, cols).to(dtype)
    assert_matches(DequantInt4.from_weight(weight, dtype).matmul(x), x, weight.dequantize())
    assert_matches(DequantInt4.from_weight(weight, dtype).matmul(x[:1]), x[:1], weight.dequantize())


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize(("rows", "cols"), [(7, 45), (24, 96), (33, 40)])
def test_dequant_int8_matches_reference(dtype, rows, cols):
    weight = Int8Weight.quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, cols).to(dtype)
    assert_matches(DequantInt8.from_weight(weight, dtype).matmul(x), x, weight.dequantize())


def test_fp16_int8_does_not_overflow_where_the_dense_weight_does_not():
    weight = Int8Weight(torch.full((4, 64), 127, dtype=torch.int8), torch.full((4,), 1e-3))
    x = torch.full((1, 64), 100.0, dtype=FP16)  # x·q = 812800 > 65504; x·w = 812.8
    assert_matches(DequantInt8.from_weight(weight, FP16).matmul(x), x, weight.dequantize())


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_merged_linear_quantized_on_load_stays_quantized(dtype, scheme):
    # K = 72: no CPU kernel (int4 wants K % 32, int8 K % 16); N = 88 is not a multiple of 16 either
    layer = MergedLinear(72, [40, 24, 24], bias=True).to(dtype)
    layer.quantization, layer.group_size = scheme, 24
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 72, generator=g) for n in (40, 24, 24)]
    biases = [torch.randn(n, generator=g) for n in (40, 24, 24)]
    for shard, (w, b) in enumerate(zip(parts, biases, strict=True)):
        layer.load_shard("weight", w, shard)
        layer.load_shard("bias", b, shard)
    assert isinstance(layer.packed, DequantInt4 if scheme == "int4" else DequantInt8) and layer.weight is None
    quantized = [Int4Weight.quantize(w, 24) if scheme == "int4" else Int8Weight.quantize(w) for w in parts]
    dense = torch.cat([q.dequantize() for q in quantized])
    x = torch.randn(6, 72).to(dtype)
    assert_matches(layer(x) - layer.bias, x, dense)


def test_dense_copy_beats_dequantizing_per_call():
    """A small model's 4-bit layers keep their dense weight; without a packed kernel that is all they keep."""
    layer = Linear(128, 64)  # float32, float activations: no packed kernel on CPU
    layer.keep_dense_copy, layer.int8_activations = True, False
    weight = random_int4(64, 128, 32)
    layer.load_shard("weight", weight)
    assert layer.packed is None and torch.equal(layer.weight, weight.dequantize())


# -- CUDA, where a GPU is present -------------------------------------------------------------
@pytest.mark.skipif(not HAS_SM80, reason="needs an NVIDIA GPU of compute capability 8.0 or newer")
@pytest.mark.parametrize(
    ("rows", "cols", "group_size"),
    [
        (64, 128, 32),  # inner_k_tiles 8
        (96, 96, 32),  # 2
        (64, 192, 64),  # 4
        (256, 1024, 128),
        (128, 512, 256),
    ],
)
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_tinygemm_matches_reference(rows, cols, group_size, num_tokens):
    weight = random_int4(rows, cols, group_size).to(CUDA)
    x = torch.randn(num_tokens, cols, device=CUDA, dtype=BF16)
    assert_matches(PackedInt4Cuda.from_weight(weight, BF16).matmul(x), x, weight.dequantize())


@pytest.mark.skipif(not HAS_SM80, reason="needs an NVIDIA GPU of compute capability 8.0 or newer")
def test_cuda_linear_quantized_on_load_runs_tinygemm():
    layer = MergedLinear(256, [128, 64, 64]).to(device=CUDA, dtype=BF16)
    layer.quantization = "int4"
    parts = [torch.randn(n, 256) for n in (128, 64, 64)]
    for shard, w in enumerate(parts):
        layer.load_shard("weight", w, shard)
    assert isinstance(layer.packed, PackedInt4Cuda) and layer.weight is None
    dense = torch.cat([Int4Weight.quantize(w, 64).dequantize() for w in parts])
    x = torch.randn(2, 256, device=CUDA, dtype=BF16)
    assert_matches(layer(x), x, dense)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_cuda_dequantizing_path_matches_reference(dtype):
    int4, int8 = random_int4(40, 96, 32), Int8Weight.quantize(torch.randn(40, 96))
    x = torch.randn(3, 96, device=CUDA, dtype=dtype)
    assert_matches(DequantInt4.from_weight(int4.to(CUDA), dtype).matmul(x), x, int4.dequantize())
    assert_matches(DequantInt8.from_weight(int8.to(CUDA), dtype).matmul(x), x, int8.dequantize())
