"""Dense linear layers: CPU bf16 weights are prepacked into oneDNN's layout at load and compute
exactly what F.linear computes on the plain weight; other dtypes keep the plain weight."""

import pytest
import torch
import torch.nn.functional as F

from glmserve.engine.layers.linear import PREPACK_BF16, Linear, MergedLinear


@pytest.mark.skipif(not PREPACK_BF16, reason="this CPU build has no oneDNN bf16")
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_prepacked_bf16_equals_plain_linear(rows):
    g = torch.Generator().manual_seed(rows)
    q, k = torch.randn(48, 64, generator=g).bfloat16(), torch.randn(16, 64, generator=g).bfloat16()
    bias = torch.randn(64, generator=g).bfloat16()
    layer = MergedLinear(64, [48, 16], bias=True).bfloat16()
    layer.load_shard("bias", bias[:48], 0)
    layer.load_shard("weight", q, 0)
    assert layer.prepacked is None  # waits for the second shard
    layer.load_shard("weight", k, 1)
    layer.load_shard("bias", bias[48:], 1)
    assert layer.prepacked is not None and layer.weight is None
    x = torch.randn(rows, 64, generator=g).bfloat16()
    expected = F.linear(x, torch.cat([q, k]), bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x.view(1, rows, 64)), expected.view(1, rows, 64))  # leading dims


def test_float32_keeps_the_plain_weight():
    layer = Linear(64, 32).float()
    w = torch.randn(32, 64)
    layer.load_shard("weight", w)
    assert layer.prepacked is None and torch.equal(layer.weight, w)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, w))
