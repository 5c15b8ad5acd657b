"""4-bit and Q8_0 weights: GGUF blocks are read exactly, packed matmuls match their dequantized reference,
and the bundled model running 4-bit (its default) or quantized in bf16 or float32 still answers
correctly. Kernel selection per device: test_quant_kernels.py."""

import functools

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from glmserve import LLM, SamplingParams
from glmserve.engine.checkpoint.gguf_quant import read_int4, read_q8_0
from glmserve.engine.kernels.native_linear import NativeInt8
from glmserve.engine.layers.linear import Linear, MergedLinear
from glmserve.engine.layers.quant import Int4Weight, Int8BlockWeight, Int8Weight
from glmserve.engine.layers.quant_kernels import PackedInt4, PackedInt8Blocks

BLOCK_BYTES = {QType.Q4_0: 18, QType.Q4_1: 20, QType.Q4_K: 144, QType.Q8_0: 34}
BLOCK_WEIGHTS = {QType.Q4_0: 32, QType.Q4_1: 32, QType.Q4_K: 256, QType.Q8_0: 32}


class FakeTensor:
    """The two fields read_int4 reads from a gguf.ReaderTensor."""

    def __init__(self, qtype, rows, cols, data):
        self.tensor_type, self.shape, self.data = qtype, np.array([cols, rows]), data


def assert_bf16_close(got, expected):
    """bf16 activations, scales and zero points: ~3 significant digits of the output's largest magnitude."""
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


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


def test_gguf_q8_0_blocks_read_exactly():
    rows, cols = 8, 512
    data = random_blocks(QType.Q8_0, rows, cols)
    weight = read_q8_0(FakeTensor(QType.Q8_0, rows, cols, data))
    reference = torch.from_numpy(gguf.quants.dequantize(data, QType.Q8_0)).reshape(rows, cols)
    assert weight.shape == (rows, cols) and weight.q.dtype == torch.int8
    torch.testing.assert_close(weight.dequantize(), reference, rtol=0, atol=0)


def random_q8_0(rows, cols, seed=0) -> Int8BlockWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8)
    return Int8BlockWeight(q, torch.rand(rows, cols // 32, generator=g) * 0.01 + 0.001)


def test_q8_0_is_exactly_int4_over_a_doubled_input():
    weight = random_q8_0(16, 64)
    halves = weight.as_int4_halves()  # [16, 128], q in 0..15
    assert halves.shape == (16, 128) and int(halves.q.max()) <= 15
    x = torch.randn(3, 64, dtype=torch.float64)
    doubled = torch.cat([x, x], -1) @ halves.dequantize().double().t()
    torch.testing.assert_close(doubled, x @ weight.dequantize().double().t(), rtol=1e-6, atol=1e-5)  # float32 parts
    rows = weight.as_int4_halves(slice(4, 9))
    assert torch.equal(rows.q, halves.q[4:9]) and torch.equal(rows.scale, halves.scale[4:9])


def test_q8_0_layer_runs_packed_on_cpu_bf16_and_dense_elsewhere():
    weight = random_q8_0(32, 64)
    x = torch.randn(2, 64)
    for dtype, packed in ((torch.bfloat16, True), (torch.float32, False)):
        layer = Linear(64, 32).to(dtype)
        layer.int8_activations = False  # PyTorch's kernels (the native ones: test_native_kernels.py)
        layer.load_shard("weight", weight)
        assert (layer.packed is not None) == packed
        expected = x @ weight.dequantize().t()
        assert_bf16_close(layer(x.to(dtype)).float(), expected)


@pytest.mark.parametrize(("precision", "form"), [("int8", NativeInt8), ("float", PackedInt8Blocks)])
def test_bundled_model_keeps_its_q8_0_output_layer(precision, form):
    """SmolLM2's tied embedding is Q8_0: the output layer runs on it for few-row steps, and agrees
    with the dense embedding's logits."""
    model = LLM(dtype="bfloat16", kv_cache_memory=32 * 2**20, activation_precision=precision).engine.runner.model
    assert isinstance(model.quantized_output, form)
    hidden = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    got = model.compute_logits(hidden)  # 2 rows: the Q8_0 blocks
    dense = hidden.float() @ model.model.embed_tokens.weight.float().t()
    # bf16 output: 0.0625 steps at |logit| ~ 16; 8-bit activations add up to ~0.13 (random hidden states)
    torch.testing.assert_close(got, dense, rtol=0, atol=0.1 if precision == "float" else 0.2)
    assert torch.equal(got.argmax(-1), dense.argmax(-1))


def random_int4(rows, cols, seed=0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return Int4Weight(
        torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8),
        torch.rand(rows, cols // 32, generator=g) * 0.02 + 0.001,
        torch.randn(rows, cols // 32, generator=g) * 0.1,
        32,
    )


@pytest.mark.parametrize("kernel, random_weight", [(PackedInt4, random_int4), (PackedInt8Blocks, random_q8_0)])
def test_packed_matmul_matches_dequantized_reference(kernel, random_weight):
    weight = random_weight(96, 128)
    x = torch.randn(3, 128).bfloat16()
    got = kernel.from_weight(weight, torch.bfloat16).matmul(x).float()
    expected = x.float() @ weight.dequantize().t()
    assert_bf16_close(got, expected)


@pytest.mark.parametrize("form", ["int4", "int8"])
def test_packed_layers_take_strided_rows(form):
    """RMSNorm's CPU output is a column slice (row stride 2K); the kernels want dense rows."""
    layer = Linear(64, 32).bfloat16()
    layer.quantization = form
    layer.load_shard("weight", torch.randn(32, 64))
    x = torch.randn(3, 128).bfloat16()[:, :64]
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_merged_linear_packs_after_all_shards_and_keeps_dense_copy():
    layer = MergedLinear(64, [32, 16]).bfloat16()
    layer.keep_dense_copy, layer.int8_activations = True, False  # the bf16 tolerance below
    parts = [random_int4(32, 64, 1), random_int4(16, 64, 2)]
    layer.load_shard("weight", parts[0], 0)
    assert layer.packed is None  # waits for the second projection
    layer.load_shard("weight", parts[1], 1)
    assert layer.packed is not None and layer.prepacked is not None  # the dense copy, in oneDNN layout
    dense = Int4Weight.concat(parts).dequantize()
    x1, x8 = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()  # int4 kernel / dense GEMM
    for x in (x1, x8):
        torch.testing.assert_close(layer(x).float(), x.float() @ dense.t(), rtol=3e-2, atol=3e-2)


def test_linear_without_dense_copy_drops_float_weight():
    layer = Linear(64, 32).bfloat16()
    layer.load_shard("weight", random_int4(32, 64))
    assert layer.weight is None and layer(torch.randn(6, 64).bfloat16()).shape == (6, 32)


def test_merged_linear_with_mixed_shard_kinds_is_stored_dense():
    """A GGUF Q4_K_M file holds Q4_K and Q6_K (dequantized: float) rows in one q/k/v."""
    layer = MergedLinear(64, [32, 16]).float()
    four_bit, dense_part = random_int4(32, 64, 1), torch.randn(16, 64)
    layer.load_shard("weight", dense_part, 1)  # any order
    layer.load_shard("weight", four_bit, 0)
    assert layer.packed is None
    torch.testing.assert_close(layer.weight.data, torch.cat([four_bit.dequantize(), dense_part]))


def test_int4_quantization_keeps_file_4bit_rows_and_matches_their_group_size():
    layer = MergedLinear(64, [32, 16]).float()
    layer.quantization, layer.group_size, layer.int8_activations = "int4", 64, False
    four_bit, dense_part = random_int4(32, 64, 1), torch.randn(16, 64)
    layer.load_shard("weight", four_bit, 0)
    layer.load_shard("weight", dense_part, 1)
    expected = torch.cat([four_bit.dequantize(), Int4Weight.quantize(dense_part, 32).dequantize()])
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-4, atol=1e-4)


def test_chunked_quantization_equals_whole_matrix(monkeypatch):
    from glmserve.engine.layers import quant

    w = torch.randn(37, 128, generator=torch.Generator().manual_seed(3))
    original = w.clone()
    whole4, whole8 = Int4Weight.quantize(w, 32), Int8Weight.quantize(w)
    assert torch.equal(w, original)  # float32 input: quantizing works on copies
    monkeypatch.setattr(quant, "QUANTIZE_CHUNK", 128 * 5)  # 5 rows per chunk, the last one short
    chunked4, chunked8 = Int4Weight.quantize(w, 32), Int8Weight.quantize(w)
    for a, b in ((whole4.q, chunked4.q), (whole4.scale, chunked4.scale), (whole4.minimum, chunked4.minimum),
                 (whole8.q, chunked8.q), (whole8.scale, chunked8.scale)):  # fmt: skip
        assert torch.equal(a, b)


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
    groups = w.view(64, 4, 64)
    group_range, group_max = groups.amax(-1) - groups.amin(-1), groups.abs().amax(-1)
    # Half a step, plus what rounding the step and the minimum to float16 (11 bits) moves.
    bound = group_range / 15 / 2 + (group_range + group_max) * 2**-10 + 1e-6
    assert (int4.dequantize() - w).abs().view(64, 4, 64).amax(-1).le(bound).all()


def test_int8_linear_matches_dequantized_reference():
    layer = Linear(128, 64).bfloat16()
    layer.quantization = "int8"
    w = torch.randn(64, 128)
    layer.load_shard("weight", w)
    assert layer.weight is None and layer.packed is not None
    x = torch.randn(2, 128).bfloat16()
    expected = x.float() @ Int8Weight.quantize(w).dequantize().t()
    assert_bf16_close(layer(x).float(), expected)


@functools.cache
def prompt_logprobs(dtype: str, scheme: str, precision: str = "float") -> tuple[torch.Tensor, str, set[str]]:
    """Prompt logprobs of one chat prompt, the answer, and the stored forms of the linear layers."""
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=0)
    llm = LLM(dtype=dtype, quantization=scheme, kv_cache_memory=32 * 2**20, activation_precision=precision)
    ids = llm.get_tokenizer().apply_chat_template(messages)
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
    logprobs = torch.tensor([e[t] for e, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])
    forms = {type(m.packed).__name__ for m in llm.engine.runner.model.modules() if isinstance(m, Linear)}
    return logprobs, out.outputs[0].text, forms


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantized_model_logprobs_close_to_dense(dtype, scheme):
    """Tolerances (documented in docs/engine.md): on the bundled model, prompt logprobs of the
    quantized schemes differ from the dense model in the same dtype by < 0.25 nats on average and
    < 1.5 at worst; int8 here re-quantizes the GGUF's 4-bit weights, int4 keeps them (with bf16
    scales in bf16). bf16 runs the CPU packed kernels, float32 dequantizes per call."""
    reference, _, _ = prompt_logprobs(dtype, "none")
    logprobs, text, forms = prompt_logprobs(dtype, scheme)
    expected_forms = {("bfloat16", "int8"): {"PackedInt8"}, ("bfloat16", "int4"): {"PackedInt4"}}
    assert forms == expected_forms.get((dtype, scheme), {f"Dequant{scheme.capitalize()}"})
    diff = (logprobs - reference).abs()
    assert diff.mean() < 0.25 and diff.max() < 1.5
    assert "Paris" in text


@pytest.mark.parametrize("in_features", [40, 56, 64, 72])
def test_int8_layers_of_any_width_are_correct(in_features):
    """The CPU int8 kernel is only right for in_features % 16 == 0; other widths dequantize per call."""
    layer = Linear(in_features, 32).bfloat16()
    layer.quantization = "int8"
    w = torch.randn(32, in_features)
    layer.load_shard("weight", w)
    x = torch.randn(3, in_features).bfloat16()
    expected = x.float() @ Int8Weight.quantize(w).dequantize().t()
    assert_bf16_close(layer(x).float(), expected)


def test_int4_packing_in_row_blocks_equals_whole_matrix(monkeypatch):
    from glmserve.engine.layers import quant_kernels

    weight = random_int4(64 * 5 + 32, 128)  # the last block is short
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
    monkeypatch.setattr(quant_kernels, "QUANTIZE_CHUNK", 128 * 64)  # 64 rows per block
    assert torch.equal(PackedInt4.from_weight(weight, torch.bfloat16).packed, whole)
    halves = random_q8_0(64 * 5 + 32, 64)
    whole = PackedInt4.from_weight(halves.as_int4_halves(), torch.bfloat16)
    blocks = PackedInt8Blocks.from_weight(halves, torch.bfloat16).halves  # 64 rows at a time
    assert torch.equal(blocks.packed, whole.packed) and torch.equal(blocks.scales_and_zeros, whole.scales_and_zeros)
