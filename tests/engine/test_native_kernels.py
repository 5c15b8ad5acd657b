"""The native CPU kernels (engine/kernels): each ISA path this CPU runs against a float64 reference
of the same arithmetic (activations quantized per block of 32, in the kernel's float32 steps),
odd shapes, 1 and 2 threads, exact packing and dequantization, rows independent of their step,
the fallback without a compiler, and the accuracy contract of 8-bit activations on whole models."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from glm_checkpoints import write_tiny_checkpoint

from glmserve import LLM, SamplingParams
from glmserve.engine.kernels import native, native_linear
from glmserve.engine.kernels.native_linear import NativeInt4, NativeInt8, gguf_nibbles
from glmserve.engine.layers.linear import Linear
from glmserve.engine.layers.quant import Int4Weight, Int8BlockWeight, Int8Weight

ISAS = native.available_isas()


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.load(), "the native kernels must build on the test machines (a C++ compiler is installed)"


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it, float64: per block of 32, d = max|x| / 127 and round(x * 127 / max|x|)
    in float32, as the kernel computes them."""
    m, k = x.shape
    blocks = x.float().view(m, -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv).double() * (amax / 127).double()).view(m, k)


def random_int4(n: int, k: int, group: int, symmetric: bool, scale_dtype: torch.dtype, seed: int = 0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(scale_dtype).float()
    minimum = -8 * scale if symmetric else (-torch.rand(n, k // group, generator=g) * 0.1).to(scale_dtype).float()
    return Int4Weight(q, scale, minimum, group)


INT4_CASES = [  # (N, K, group, symmetric, scale dtype): K % 128 != 0 ends in 1-3 single blocks; float32 scales (Q4_K)
    (64, 4096, 64, False, torch.float16),
    (48, 576, 32, True, torch.float16),
    (40, 544, 32, False, torch.float32),
    (9, 13696, 64, False, torch.float16),
    (5, 160, 32, True, torch.float16),
    (7, 96, 32, False, torch.float16),  # single blocks only on AVX-512
    (3, 64, 32, True, torch.float32),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "k", "group", "symmetric", "scale_dtype"), INT4_CASES)
def test_int4_kernels_match_the_reference(n, k, group, symmetric, scale_dtype, threads, monkeypatch):
    torch.set_num_threads(threads)
    weight = random_int4(n, k, group, symmetric, scale_dtype)
    packed = NativeInt4.from_weight(weight, torch.bfloat16)
    assert (packed.mins is None) == symmetric and packed.scales.dtype == scale_dtype  # exact, smallest
    w = weight.dequantize().double()
    for m in (1, 2, 3, 8, 11):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        reference = quantized_activations(x) @ w.T
        bound = 1e-5 * reference.abs().max().item() + 1e-6  # float32 sums of exact integer dots
        for isa in ISAS:
            out = torch.ops.glmserve.int4_linear(x, packed.nibbles, packed.scales, packed.mins, group, isa)
            assert (out.double() - reference).abs().max().item() <= bound, (isa, m)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "k", "group"), [(64, 4096, 4096), (48, 576, 32), (40, 544, 32), (7, 96, 96), (9, 64, 32)])
def test_int8_kernels_match_the_reference(n, k, group, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)  # -128 too: GGUF allows it
    if group == k:
        weight = Int8Weight(q, torch.rand(n, generator=g) * 0.01 + 1e-3)
    else:
        weight = Int8BlockWeight(q, (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half().float(), group)
    packed = NativeInt8.from_weight(weight, torch.bfloat16)
    w = weight.dequantize().double()
    for m in (1, 2, 5, 8, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        reference = quantized_activations(x) @ w.T
        for isa in ISAS:
            out = torch.ops.glmserve.int8_linear(x, packed.q, packed.scales, packed.group_size, isa)
            assert (out.double() - reference).abs().max().item() <= 1e-5 * reference.abs().max().item() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_float_activations_and_their_dtype_back(dtype):
    weight = random_int4(32, 256, 32, False, torch.float16)
    packed = NativeInt4.from_weight(weight, dtype)
    x = torch.randn(3, 256).to(dtype)
    out = packed.matmul(x)
    reference = quantized_activations(x) @ weight.dequantize().double().T
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item())


def test_gguf_block_order_and_exact_dequantization():
    weight = random_int4(6, 160, 32, False, torch.float16)
    nibbles = gguf_nibbles(weight.q)
    block = nibbles[0, :16]
    assert nibbles.shape == (6, 80)
    assert torch.equal(block & 15, weight.q[0, :16]) and torch.equal(block >> 4, weight.q[0, 16:32])
    packed = NativeInt4.from_weight(weight, torch.float32)
    out = torch.empty(6, 160)
    packed.dequantize_into(0, out)
    torch.testing.assert_close(out.double(), weight.dequantize().double(), rtol=1e-6, atol=1e-7)


def test_many_rows_run_a_dense_gemm_on_dequantized_slices(monkeypatch):
    monkeypatch.setattr(native_linear, "SLICE_BYTES", 64 * 128 * 4)  # 64 rows per slice: 5 slices
    weight = Int8Weight.quantize(torch.randn(300, 128))
    packed = NativeInt8.from_weight(weight, torch.float32)
    x = torch.randn(native_linear.FUSED_ROWS + 1, 128)
    torch.testing.assert_close(packed.matmul(x), x @ weight.dequantize().T, rtol=1e-4, atol=1e-4)
    few = x[: native_linear.FUSED_ROWS]  # 8 rows at a time through the fused kernel
    torch.testing.assert_close(packed.matmul(few).double(), quantized_activations(few) @ weight.dequantize().double().T,
                               rtol=1e-5, atol=1e-4)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Each row is quantized and summed on its own, in the same order whatever the step's size."""
    w4 = NativeInt4.from_weight(Int4Weight.quantize(torch.randn(70, 576), 32), torch.float32)
    w8 = NativeInt8.from_weight(Int8Weight.quantize(torch.randn(70, 576)), torch.float32)
    x = torch.randn(8, 576)
    for isa in ISAS:
        for run in (lambda x, isa=isa: torch.ops.glmserve.int4_linear(x, w4.nibbles, w4.scales, w4.mins, 32, isa),
                    lambda x, isa=isa: torch.ops.glmserve.int8_linear(x, w8.q, w8.scales, w8.group_size, isa)):  # fmt: skip
            full = run(x)
            assert all(torch.equal(run(x[:m]), full[:m]) for m in range(1, 9)), isa


def test_without_a_compiler_the_pytorch_kernels_run(tmp_path, bundled_gguf):
    """No C++ compiler and no built library: one log line, then PyTorch's kernels, and answers."""
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from glmserve import LLM, SamplingParams\n"
        "from glmserve.engine.layers.linear import Linear\n"
        f"llm = LLM({str(bundled_gguf)!r}, kv_cache_memory=32 * 2**20)\n"
        "forms = {type(m.packed).__name__ for m in llm.engine.runner.model.modules() if isinstance(m, Linear)}\n"
        "out = llm.generate('The capital of France is', SamplingParams(temperature=0, max_tokens=4))\n"
        "print(sorted(forms), len(out[0].outputs[0].token_ids))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "GLMSERVE_KERNEL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "Native" not in done.stdout and done.stdout.strip().endswith("4")
    assert done.stderr.count("native CPU kernels unavailable") == 1


# -- the accuracy contract of 8-bit activations (docs/engine.md) --------------------------------


def prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    return torch.tensor([entry[t] for entry, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])


@pytest.fixture
def prompts_on_int8_kernels(monkeypatch):
    """Prompts run on the int8 kernels too (else they take the dense GEMM), so prompt logprobs
    measure what a decode step computes."""
    monkeypatch.setattr(NativeInt4, "max_rows", 10**9)  # not the dense copy (small models)
    monkeypatch.setattr(NativeInt8, "max_rows", 10**9)
    monkeypatch.setattr(native_linear, "FUSED_ROWS", 10**9)  # not dequantized slices


@pytest.mark.parametrize(("dtype", "mean_bound", "max_bound"), [("float32", 0.15, 0.75), ("bfloat16", 0.2, 1.0)])
def test_bundled_model_with_int8_activations_stays_close_to_float32(prompts_on_int8_kernels, dtype, mean_bound, max_bound):
    """SmolLM2 Q4_1, its own 4-bit weights either way: 8-bit activations against the float32 model
    (measured 2026-12-04: mean 0.09 / max 0.42 nats in float32, 0.12 / 0.66 in bfloat16)."""
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence. "
                                            "Then explain why cities grow near rivers, in three short points."}]  # fmt: skip
    reference_llm = LLM(dtype="float32", activation_precision="float", kv_cache_memory=32 * 2**20)
    ids = reference_llm.get_tokenizer().apply_chat_template(messages)
    reference = prompt_logprobs(reference_llm, ids)
    del reference_llm
    llm = LLM(dtype=dtype, kv_cache_memory=32 * 2**20)
    assert any(isinstance(m.packed, NativeInt4) for m in llm.engine.runner.model.modules() if isinstance(m, Linear))
    diff = (prompt_logprobs(llm, ids) - reference).abs()
    assert diff.mean() < mean_bound and diff.max() < max_bound, (diff.mean(), diff.max())


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_random_chatglm3_with_int8_activations_stays_close_to_float_activations(prompts_on_int8_kernels, tmp_path, scheme):
    """A random ChatGLM3 shape quantized on load: 8-bit activations against float activations on
    the same quantized weights (float32)."""
    folder = write_tiny_checkpoint(tmp_path / "chatglm3", hidden_size=128, ffn_hidden_size=320, kv_channels=32)
    ids = [64790, 64792, *range(1000, 1060)]
    runs = {
        precision: prompt_logprobs(LLM(folder, dtype="float32", quantization=scheme, activation_precision=precision,
                                       kv_cache_memory=16 * 2**20), ids)  # fmt: skip
        for precision in ("float", "int8")
    }
    diff = (runs["int8"] - runs["float"]).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())
