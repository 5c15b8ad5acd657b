"""engine/models/glm.py against transformers' GlmForCausalLM on the same tiny random weights, driven
through the real engine (paged KV cache in blocks of 4, batched and chunked prefill, decode).

Our side loads THUDM's layout (.bin or safetensors shards) or transformers' layout; the reference
loads transformers' layout written from the same seed. Everything runs in float32: log-probs
must agree within TOL and greedy tokens exactly.
"""

from pathlib import Path

import pytest
import torch
import transformers  # a test dependency; the package never imports it
from glm_checkpoints import write_tiny_checkpoint

from glmserve import LLM, SamplingParams
from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.models.glm import glm_rotary

TOL = 1e-4
KV_CACHE_BYTES = 4 * 2**20
PREFIX = [64790, 64792]  # [gMASK] sop


def make_prompts(lengths: list[int], vocab: int = 64789, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [PREFIX + torch.randint(0, vocab, (n - 2,), generator=generator).tolist() for n in lengths]


PROMPTS = make_prompts([5, 13, 22, 9, 3])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm")
    return {
        "bin": write_tiny_checkpoint(root / "bin", fmt="bin", num_shards=3),
        "safetensors": write_tiny_checkpoint(root / "safetensors", num_shards=2),
        "glm": write_tiny_checkpoint(root / "glm", layout="glm", num_shards=2),
    }


@pytest.fixture(scope="module")
def reference(checkpoints):
    return transformers.GlmForCausalLM.from_pretrained(checkpoints["glm"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(checkpoints) -> LLM:
    return LLM(checkpoints["bin"], dtype="float32", kv_cache_memory=KV_CACHE_BYTES, block_size=4)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the distribution of the token after ids[: p + 1]."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def assert_prompt_logprobs_match(ours: list, expected: torch.Tensor, ids: list[int], k: int) -> None:
    assert ours[0] is None and len(ours) == len(ids)
    for p in range(1, len(ids)):
        top_values, top_ids = expected[p - 1].topk(k)
        assert set(ours[p]) == set(top_ids.tolist()) | {ids[p]}
        got = torch.tensor([ours[p][i] for i in [ids[p], *top_ids.tolist()]])
        want = torch.cat([expected[p - 1, ids[p]].view(1), top_values])
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def assert_generation_matches(model, prompt: list[int], token_ids: list[int], logprobs: list[dict]) -> None:
    """Greedy: every generated token is the reference's argmax given the same prefix, and its
    log-prob (from our paged KV cache) equals the reference's."""
    expected = reference_logprobs(model, prompt + token_ids)[len(prompt) - 1 : -1]
    assert token_ids == expected.argmax(-1).tolist()
    got = torch.tensor([entry[t] for entry, t in zip(logprobs, token_ids, strict=True)])
    torch.testing.assert_close(
        got, expected.gather(1, torch.tensor(token_ids)[:, None])[:, 0], atol=TOL, rtol=0
    )


# ---------------------------------------------------------------- rotary layout


def thudm_rotary(x: torch.Tensor, positions: torch.Tensor, rope_ratio: float) -> torch.Tensor:
    """THUDM modeling_chatglm.py's rotary, restated: RotaryEmbedding(kv_channels // 2) builds
    theta = 1 / base^(2i / n) over n = D / 2 with base 10000 * rope_ratio; apply_rotary_pos_emb
    rotates adjacent pairs (x[2i], x[2i+1]) of the first n dims and passes the rest through."""
    t, h, d = x.shape
    n = d // 2
    theta = 1.0 / ((10000 * rope_ratio) ** (torch.arange(0, n, 2, dtype=torch.float32) / n))
    angles = torch.outer(positions.float(), theta)  # [T, n/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    pairs = x[..., :n].reshape(t, h, n // 2, 2)
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1
    )
    return torch.cat([rotated.flatten(2), x[..., n:]], -1)


def test_rotary_layout_equals_thudm_and_transformers():
    from transformers.models.glm import modeling_glm

    rope_ratio, heads, head_dim = 3.0, 4, 16
    positions = torch.tensor([0, 1, 7, 100, 1023])
    x = torch.randn(len(positions), heads, head_dim, generator=torch.Generator().manual_seed(0))
    expected = thudm_rotary(x, positions, rope_ratio)

    hf_config = transformers.GlmConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        rope_theta=10000 * rope_ratio,
    )
    cos, sin = modeling_glm.GlmRotaryEmbedding(hf_config)(x, positions[None])
    q = x.transpose(0, 1)[None]  # [1, H, T, D]
    hf_out, _ = modeling_glm.apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(hf_out[0].transpose(0, 1), expected, atol=1e-5, rtol=0)

    config = ModelConfig(
        "chatglm", 100, heads * head_dim, 32, 1, heads, 2, head_dim, rope_theta=10000 * rope_ratio
    )
    rotary = glm_rotary(config)
    ours = rotary.apply(x, *rotary.cos_sin(positions, x.dtype))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parity through the engine


@pytest.mark.parametrize("kind", ["bin", "safetensors", "glm"])
def test_prefill_logprobs_match_reference(checkpoints, reference, kind):
    """All layouts; a mixed-length batch of prefills shares one forward (paged prefill path)."""
    llm = LLM(checkpoints[kind], dtype="float32", kv_cache_memory=KV_CACHE_BYTES, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert_prompt_logprobs_match(out.prompt_logprobs, reference_logprobs(reference, prompt), prompt, k=5)


def test_single_prompt_prefill_matches_reference(llm, reference):
    prompt = PROMPTS[2]  # alone: the fresh-prefill (plain causal SDPA) path
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    )
    assert_prompt_logprobs_match(out[0].prompt_logprobs, reference_logprobs(reference, prompt), prompt, k=3)


def test_cached_decode_matches_reference(llm, reference):
    """10 greedy steps through the paged cache for a batch of mixed lengths."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert len(out.outputs[0].token_ids) == 10
        assert_generation_matches(reference, prompt, out.outputs[0].token_ids, out.outputs[0].logprobs)


def test_greedy_tokens_equal_transformers_generate(llm, reference):
    prompt = PROMPTS[1]
    ours = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    with torch.inference_mode():
        theirs = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
    assert ours[0].outputs[0].token_ids == theirs[0, len(prompt) :].tolist()


def test_decodes_and_chunked_prefills_in_one_batch_match_reference(checkpoints, reference):
    """Requests join a running batch: decode steps share forwards with 8-token prefill chunks."""
    config = EngineConfig(
        dtype="float32", kv_cache_memory=KV_CACHE_BYTES, block_size=4, max_num_batched_tokens=8
    )
    engine = LLMEngine(checkpoints["safetensors"], config)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    prompts = dict(enumerate(make_prompts([11, 20, 6], seed=1)))
    results: dict[int, tuple[list, list]] = {i: ([], []) for i in prompts}
    engine.add_request("0", prompts[0], params)
    for step in range(40):
        if step == 3:  # request 0 is decoding now
            engine.add_request("1", prompts[1], params)
            engine.add_request("2", prompts[2], params)
        for out in engine.step():
            results[int(out.request_id)][0].extend(out.new_token_ids)
            results[int(out.request_id)][1].extend(out.logprobs)
    for i, (token_ids, logprobs) in results.items():
        assert len(token_ids) == 8
        assert_generation_matches(reference, prompts[i], token_ids, logprobs)


def test_glm4_shape_matches_reference(tmp_path):
    """GLM-4's config: vocabulary 151552, rope_ratio 500, 40-layer config scaled to 2 layers."""
    ours_dir = write_tiny_checkpoint(tmp_path / "ours", preset="glm4-9b", rope_ratio=None, fmt="bin")
    ref_dir = write_tiny_checkpoint(tmp_path / "ref", preset="glm4-9b", rope_ratio=None, layout="glm")
    reference = transformers.GlmForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    assert reference.config.rope_parameters["rope_theta"] == 5_000_000
    llm = LLM(ours_dir, dtype="float32", kv_cache_memory=KV_CACHE_BYTES, block_size=4)
    prompts = [[151331, 151333, 151336, 198, 6023, 151337], [151331, 151333, 109377, 1879, 3, 77, 900, 12]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0, prompt_logprobs=2)
    for out, prompt in zip(
        llm.generate([{"prompt_token_ids": p} for p in prompts], params), prompts, strict=True
    ):
        assert_prompt_logprobs_match(out.prompt_logprobs, reference_logprobs(reference, prompt), prompt, k=2)
        assert_generation_matches(reference, prompt, out.outputs[0].token_ids, out.outputs[0].logprobs)
