"""4-bit weights: GGUF blocks are read exactly, packed matmuls match their dequantized reference,
and the bundled model running 4-bit (its default) still answers correctly."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from glmserve import LLM, SamplingParams
from glmserve.engine.gguf_int4 import read_int4
from glmserve.engine.layers.linear import Linear, MergedLinear
from glmserve.engine.layers.quant import Int4Weight, Int8Weight, PackedInt4

BLOCK_BYTES = {QType.Q4_0: 18, QType.Q4_1: 20, QType.Q4_K: 144}
BLOCK_WEIGHTS = {QType.Q4_0: 32, QType.Q4_1: 32, QType.Q4_K: 256}


class FakeTensor:
    """The two fields read_int4 reads from a gguf.ReaderTensor."""

    def __init__(self, qtype, rows, cols, data):
        self.tensor_type, self.shape, self.data = qtype, np.array([cols, rows]), data


def random_blocks(qtype, rows, cols, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    num_blocks = rows * cols // BLOCK_WEIGHTS[qtype]
    raw = rng.integers(0, 256, size=(num_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(num_blocks, 2)).astype(np.float16).view(np.uint8)
    raw[:, :4] = scales  # finite fp16 d (and m / dmin) in the first 4 bytes
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q4_K])
def test_gguf_4bit_blocks_read_exactly(qtype):
    rows, cols = 8, 512
    data = random_blocks(qtype, rows, cols)
    weight = read_int4(FakeTensor(qtype, rows, cols, data))
    reference = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(rows, cols)
    assert weight.shape == (rows, cols) and int(weight.q.max()) <= 15
    torch.testing.assert_close(weight.dequantize(), reference, rtol=0, atol=1e-6)


def random_int4(rows, cols, seed=0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return Int4Weight(
        torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8),
        torch.rand(rows, cols // 32, generator=g) * 0.02 + 0.001,
        torch.randn(rows, cols // 32, generator=g) * 0.1,
        32,
    )


def test_packed_int4_matmul_matches_dequantized_reference():
    weight = random_int4(96, 128)
    x = torch.randn(3, 128).bfloat16()
    got = PackedInt4.from_weight(weight, torch.bfloat16).matmul(x).float()
    expected = x.float() @ weight.dequantize().t()
    # bf16 activations, scales and zero points: ~3 significant digits
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_merged_linear_packs_after_all_shards_and_keeps_dense_copy():
    layer = MergedLinear(64, [32, 16]).bfloat16()
    layer.keep_dense_copy = True
    parts = [random_int4(32, 64, 1), random_int4(16, 64, 2)]
    layer.load_shard("weight", parts[0], 0)
    assert layer.packed is None  # waits for the second projection
    layer.load_shard("weight", parts[1], 1)
    assert layer.packed is not None and layer.weight is not None
    dense = Int4Weight.concat(parts).dequantize()
    x1, x8 = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()  # int4 kernel / dense GEMM
    for x in (x1, x8):
        torch.testing.assert_close(layer(x).float(), x.float() @ dense.t(), rtol=3e-2, atol=3e-2)


def test_linear_without_dense_copy_drops_float_weight():
    layer = Linear(64, 32).bfloat16()
    layer.load_shard("weight", random_int4(32, 64))
    assert layer.weight is None and layer(torch.randn(6, 64).bfloat16()).shape == (6, 32)


def test_bundled_model_runs_4bit_by_default_and_answers():
    llm = LLM(kv_cache_memory=32 * 2**20)  # auto dtype: bf16 here, Q4_1 weights kept 4-bit
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    if llm.engine.runner.dtype == torch.bfloat16:
        assert all(m.packed is not None for m in linears)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


def test_quantize_on_load_round_trip_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    int8 = Int8Weight.quantize(w)
    assert (int8.dequantize() - w).abs().max() <= w.abs().amax(-1).max() / 127 / 2 + 1e-6
    int4 = Int4Weight.quantize(w, 64)
    group_range = w.view(64, 4, 64).amax(-1) - w.view(64, 4, 64).amin(-1)
    assert (int4.dequantize() - w).abs().view(64, 4, 64).amax(-1).le(group_range / 15 / 2 + 1e-5).all()


def test_int8_linear_matches_dequantized_reference():
    layer = Linear(128, 64).bfloat16()
    layer.quantization = "int8"
    w = torch.randn(64, 128)
    layer.load_shard("weight", w)
    assert layer.weight is None and layer.packed is not None
    x = torch.randn(2, 128).bfloat16()
    expected = x.float() @ Int8Weight.quantize(w).dequantize().t()
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.fixture(scope="module")
def prompt_logprobs_by_scheme():
    """Prompt logprobs of one chat prompt under each scheme (bf16 activations)."""
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=0)
    results = {}
    for scheme in ("none", "int8", "int4"):
        llm = LLM(dtype="bfloat16", quantization=scheme, kv_cache_memory=32 * 2**20)
        ids = llm.get_tokenizer().apply_chat_template(messages)
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        logprobs = torch.tensor([e[t] for e, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])
        results[scheme] = (logprobs, out.outputs[0].text)
    return results


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_logprobs_close_to_bf16(prompt_logprobs_by_scheme, scheme):
    """Tolerances (documented in docs/quantization.md): on the bundled model, prompt logprobs of the
    quantized schemes differ from bf16 by < 0.25 nats on average and < 1.5 at worst; int8 here
    re-quantizes the GGUF's 4-bit weights, int4 keeps them with bf16 scales."""
    reference, _ = prompt_logprobs_by_scheme["none"]
    logprobs, text = prompt_logprobs_by_scheme[scheme]
    diff = (logprobs - reference).abs()
    assert diff.mean() < 0.25 and diff.max() < 1.5
    assert "Paris" in text


def test_quantization_needs_cpu_bf16(bundled_gguf):
    with pytest.raises(ValueError, match="bfloat16"):
        LLM(bundled_gguf, dtype="float32", quantization="int8", kv_cache_memory=2**24)


@pytest.mark.parametrize("in_features", [40, 56, 64, 72])
def test_int8_layers_of_any_width_are_correct(in_features):
    """The CPU int8 kernel is only right for in_features % 16 == 0; other widths fall back to dense."""
    layer = Linear(in_features, 32).bfloat16()
    layer.quantization = "int8"
    w = torch.randn(32, in_features)
    layer.load_shard("weight", w)
    x = torch.randn(3, in_features).bfloat16()
    expected = x.float() @ Int8Weight.quantize(w).dequantize().t()
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
