"""Parity with an independent implementation: Hugging Face transformers reading the same GGUF.

Both run in float32: greedy tokens must agree for at least 16 tokens and prompt logprobs closely.
"""

import pytest
import torch
import transformers  # a test dependency; the package never imports it

from glmserve import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into French and Spanish.",
]
NUM_TOKENS = 20


@pytest.fixture(scope="module")
def ours(bundled_gguf) -> LLM:
    # Float activations: greedy tokens are compared exactly (8-bit ones: test_native_kernels.py).
    return LLM(bundled_gguf, dtype="float32", kv_cache_memory=64 * 2**20, activation_precision="float")


@pytest.fixture(scope="module")
def reference(bundled_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        bundled_gguf.parent, gguf_file=bundled_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompts(ours) -> list[list[int]]:
    tokenizer = ours.get_tokenizer()
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def reference_greedy(model, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NUM_TOKENS, do_sample=False, min_new_tokens=NUM_TOKENS)
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_tokens_match_reference(ours, reference, prompts):
    # min_tokens bans end-of-sequence like min_new_tokens does in transformers
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)
    got = [o.outputs[0].token_ids for o in ours.generate([{"prompt_token_ids": p} for p in prompts], params)]
    expected = [reference_greedy(reference, p) for p in prompts]
    for g, e in zip(got, expected, strict=True):
        assert g[:16] == e[:16]
    assert any("Paris" in ours.get_tokenizer().decode(g) for g in got)


def test_prompt_logprobs_match_reference(ours, reference, prompts):
    prompt = prompts[0]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    ours_lp = ours.generate({"prompt_token_ids": prompt}, params)[0].prompt_logprobs
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt])).logits[0].float()
    ref_lp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    got = torch.tensor([entry[t] for entry, t in zip(ours_lp[1:], prompt[1:], strict=True)])
    assert ours_lp[0] is None
    torch.testing.assert_close(got, ref_lp, atol=2e-3, rtol=1e-3)
