"""The memory estimate (no weights loaded) against what the loaded model really stores."""

import pytest
import torch

from glmserve import LLM
from glmserve.engine.layers.linear import Linear


def stored_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of every weight the model holds: parameters plus packed quantized tensors, plus the
    float buffer that the largest layer dequantizing per call expands into."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.packed is not None:
            total += sum(t.numel() * t.element_size() for t in vars(module.packed).values() if isinstance(t, torch.Tensor))
            if not module.packed.is_fused:
                buffer = max(buffer, module.in_features * module.out_features * dtype.itemsize)
    return total + buffer


@pytest.mark.parametrize("quantization", [None, "none", "int8", "int4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # float32 int8/int4: dequantized per call
def test_estimate_within_10_percent_of_loaded_weights(dtype, quantization):
    llm = LLM(dtype=dtype, quantization=quantization, kv_cache_memory=16 * 2**20)
    estimate = llm.engine.memory.weights_bytes
    measured = stored_bytes(llm.engine.runner.model, llm.engine.runner.dtype)
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)


def test_kv_bytes_per_token_matches_allocated_cache():
    llm = LLM(dtype="bfloat16", kv_cache_memory=16 * 2**20)
    caches = llm.engine.runner.kv_caches
    allocated = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)
    assert allocated == llm.engine.memory.kv_bytes_per_token * llm.engine.kv_cache_tokens
