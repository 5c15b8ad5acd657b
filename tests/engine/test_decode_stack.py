"""The native decode stack (layers/decode_stack.py, csrc/decode_stack.cpp) runs the same kernels in the
same order as the layer-by-layer path: the same tokens and bit-identical logprobs, for each model
family and weight form it takes, in steps of one decode and of many. Prefix caching is off: a
cached prompt's shorter prefill may take another kernel (int8 vs float activations), so the second
run would differ from the first for that reason alone."""

from pathlib import Path

import pytest
from glm_checkpoints import write_tiny_checkpoint
from test_baichuan import write_tiny_baichuan
from test_llm_engine import PROMPTS as ENGINE_PROMPTS

from glmserve import LLM, SamplingParams
from glmserve.engine.kernels import native

pytestmark = pytest.mark.skipif(not native.load(), reason="the native CPU kernels could not be built here")

PROMPTS = [*ENGINE_PROMPTS, "Water boils at"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def outputs(llm: LLM, prompts: list[str]) -> list[tuple[list[int], list[dict]]]:
    outs = llm.generate(prompts, GREEDY)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def assert_stack_equals_layers(llm: LLM, prompts: list[str]) -> None:
    model = llm.engine.runner.model
    stack = model.decode_stack
    assert stack is not None, "the native stack should take this model"
    calls = []
    original = type(stack).__call__
    stack_call = lambda self, *args: calls.append(args[0].shape[0]) or original(self, *args)  # noqa: E731
    type(stack).__call__ = stack_call
    try:
        native_outs = outputs(llm, prompts)
    finally:
        type(stack).__call__ = original
    assert calls and max(calls) == len(prompts)  # every decode step of the batch went native
    model.decode_stack = None
    try:
        python_outs = outputs(llm, prompts)
    finally:
        model.decode_stack = stack
    assert native_outs == python_outs


@pytest.fixture(scope="module")
def bundled_bf16() -> LLM:
    """int4 native kernels for up to 8 rows, the prepacked dense copy beyond (int8 activations)."""
    return LLM(dtype="bfloat16", kv_cache_memory=64 * 2**20, enable_prefix_caching=False)


@pytest.mark.parametrize("num_prompts", [1, 6])
def test_bundled_model_int4_rows(bundled_bf16, num_prompts):
    assert_stack_equals_layers(bundled_bf16, PROMPTS[:num_prompts])


def test_bundled_model_dense_rows(bundled_bf16):
    assert_stack_equals_layers(bundled_bf16, PROMPTS + PROMPTS[:4])  # 10 rows: past the int4 kernel's 8


def test_bundled_model_int8_without_dense_copy():
    llm = LLM(dtype="bfloat16", quantization="int8", kv_cache_memory=64 * 2**20, enable_prefix_caching=False)
    assert llm.engine.runner.model.decode_stack.max_rows == 64
    assert_stack_equals_layers(llm, PROMPTS)


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_chatglm3_bias_partial_interleaved_rotary_gqa(tmp_path, quantization):
    """qkv bias, rotary on half of each head in adjacent pairs, 4 query heads over 2 KV heads."""
    path = write_tiny_checkpoint(tmp_path / "chatglm3")
    llm = LLM(
        str(path), dtype="float32", quantization=quantization, quantization_group_size=32,
        kv_cache_memory=16 * 2**20, enable_prefix_caching=False,
    )
    assert_stack_equals_layers(llm, PROMPTS)


@pytest.mark.parametrize("preset", ["baichuan-13b", "baichuan2-7b"])
def test_baichuan_alibi_and_rope(tmp_path, preset):
    path = write_tiny_baichuan(tmp_path / preset, preset)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=16 * 2**20, enable_prefix_caching=False)
    assert_stack_equals_layers(llm, PROMPTS)


def test_python_path_where_native_ops_are_off(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(native, "has_decode_ops", lambda: False)
    path = write_tiny_checkpoint(tmp_path / "chatglm3")
    llm = LLM(str(path), dtype="float32", kv_cache_memory=16 * 2**20, enable_prefix_caching=False)
    assert llm.engine.runner.model.decode_stack is None
    assert llm.generate(PROMPTS[:2], GREEDY)[0].outputs[0].token_ids
