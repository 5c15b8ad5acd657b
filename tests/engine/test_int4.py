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
from glmserve.engine.layers.quant import Int4Weight, PackedInt4

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
    assert layer.int4 is None  # waits for the second projection
    layer.load_shard("weight", parts[1], 1)
    assert layer.int4 is not None and layer.weight is not None
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
        assert all(m.int4 is not None for m in linears)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text
