"""The memory estimate (no weights loaded) against what the loaded model really stores."""

import pytest
import torch

from glmserve import LLM
from glmserve.engine.layers.linear import Linear


def packed_bytes(form) -> int:
    """Bytes of the tensors of a stored quantized form (PackedInt8Blocks holds a PackedInt4)."""
    if form is None:
        return 0
    if isinstance(form, torch.Tensor):
        return form.numel() * form.element_size()
    return sum(packed_bytes(v) for v in vars(form).values() if isinstance(v, torch.Tensor) or hasattr(v, "is_fused"))


def stored_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of every weight the model holds: parameters plus packed quantized tensors, plus the
    float buffer that the largest layer dequantizing per call expands into."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += packed_bytes(getattr(model, "quantized_output", None))  # a tied output in the file's form
    total += packed_bytes(getattr(model, "prepacked_output", None))  # and in oneDNN's layout
    buffer = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.prepacked is not None:  # the dense weight, oneDNN layout
            total += packed_bytes(module.prepacked)
        if isinstance(module, Linear) and module.packed is not None:
            total += packed_bytes(module.packed)
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
