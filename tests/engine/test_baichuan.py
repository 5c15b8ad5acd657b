"""engine/models/baichuan.py against a float64 reference written here from the published formulas, on
tiny random checkpoints written by the random-checkpoint tool from the real configs (so the kind is
told from config.json as for the official downloads), driven through the real engine: paged KV
cache in blocks of 4, batched and chunked prefill, cached decode, decodes and prefills in one batch.

- Baichuan-13B: ALiBi, plain head; 5 heads (not a power of two).
- Baichuan2-13B: ALiBi and NormHead; 5 heads.
- Baichuan2-7B: RoPE over the whole head, half-split pairs, and NormHead; head_dim 16.
"""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmserve import LLM, SamplingParams
from glmserve.config import EngineConfig
from glmserve.devtools.random_checkpoint import (
    CheckpointSpec,
    load_config,
    scale_config,
    write_random_checkpoint,
)
from glmserve.engine.checkpoint.hf import open_hf_folder
from glmserve.engine.device import Placement
from glmserve.engine.layers.attention import alibi_slopes
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.memory import estimate_memory

TOL = 1e-4
KV_CACHE_BYTES = 4 * 2**20
SIZES = {
    "baichuan-13b": dict(
        num_layers=2, hidden_size=40, num_attention_heads=5, ffn_hidden_size=64, seq_length=256
    ),
    "baichuan2-13b": dict(
        num_layers=2, hidden_size=40, num_attention_heads=5, ffn_hidden_size=64, seq_length=256
    ),
    "baichuan2-7b": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, seq_length=256
    ),
}
KINDS = {  # preset -> (position embedding, NormHead)
    "baichuan-13b": ("alibi", False),
    "baichuan2-13b": ("alibi", True),
    "baichuan2-7b": ("rope", True),
}


def write_tiny_baichuan(out: Path, preset: str, seed: int = 0, **sizes) -> Path:
    config, tokenizer_dirs = load_config(preset)
    spec = CheckpointSpec(
        config=scale_config(config, **{**SIZES[preset], **sizes}),
        out=out,
        seed=seed,
        dtype=torch.float32,
        std=0.1,  # logits far from uniform, so greedy choices are clear
        tokenizer_dirs=tokenizer_dirs,
    )
    write_random_checkpoint(spec)
    return out


def make_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64000, (n,), generator=generator).tolist() for n in lengths]


PROMPTS = make_prompts([5, 13, 22, 9, 3])


# ---------------------------------------------------------------- the reference, from the papers


def paper_alibi_slopes(n: int) -> list[float]:
    """ALiBi (Press et al., 2022) reference code: a geometric sequence starting at 2^(-8/n) for n
    a power of two; otherwise the closest lower power of two's slopes, then every other slope of
    twice that many heads."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return paper_alibi_slopes(closest) + paper_alibi_slopes(2 * closest)[0::2][: n - closest]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Reference:
    """The whole model in float64 on one sequence, without a cache."""

    def __init__(self, folder: Path, position: str, norm_head: bool):
        self.w = {name: t.double() for name, t in load_file(folder / "model.safetensors").items()}
        config = open_hf_folder(folder).config
        self.num_layers, self.num_heads = config.num_hidden_layers, config.num_attention_heads
        self.eps, self.position = config.rms_norm_eps, position
        head = self.w["lm_head.weight"]
        self.head = head / head.norm(dim=1, keepdim=True) if norm_head else head  # Baichuan2 NormHead

    def attention(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        n, hidden = x.shape
        h, d = self.num_heads, hidden // self.num_heads
        q, k, v = (x @ self.w[prefix + "W_pack.weight"].T).split(hidden, -1)
        q, k, v = (t.view(n, h, d).transpose(0, 1) for t in (q, k, v))  # each [H, n, D]
        positions = torch.arange(n, dtype=torch.float64)
        if self.position == "rope":  # Su et al.: theta_i = 10000^(-2i/D), pairs (i, i + D/2)
            inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            angles = torch.outer(positions, inv_freq).repeat(1, 2)  # [n, D]
            q = q * angles.cos() + rotate_half(q) * angles.sin()
            k = k * angles.cos() + rotate_half(k) * angles.sin()
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [H, n, n]
        if self.position == "alibi":  # -m_h * (i - j) for key j before query i
            slopes = torch.tensor(paper_alibi_slopes(h), dtype=torch.float64)
            scores = scores - slopes[:, None, None] * (positions[:, None] - positions[None, :])
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, hidden)
        return out @ self.w[prefix + "o_proj.weight"].T

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: row p is the distribution of the token after ids[: p + 1]."""
        w = self.w
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            x = x + self.attention(rms_norm(x, w[p + "input_layernorm.weight"], self.eps), p + "self_attn.")
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        return (rms_norm(x, w["model.norm.weight"], self.eps) @ self.head.T).log_softmax(-1)


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module", params=list(KINDS))
def model(request, tmp_path_factory):
    preset = request.param
    folder = write_tiny_baichuan(tmp_path_factory.mktemp(preset) / "ckpt", preset)
    llm = LLM(folder, dtype="float32", kv_cache_memory=KV_CACHE_BYTES, block_size=4)
    return preset, folder, llm, Reference(folder, *KINDS[preset])


def assert_prompt_logprobs_match(ours: list, expected: torch.Tensor, ids: list[int], k: int) -> None:
    assert ours[0] is None and len(ours) == len(ids)
    for p in range(1, len(ids)):
        top_values, top_ids = expected[p - 1].topk(k)
        assert set(ours[p]) == set(top_ids.tolist()) | {ids[p]}
        got = torch.tensor([ours[p][i] for i in [ids[p], *top_ids.tolist()]], dtype=torch.float64)
        want = torch.cat([expected[p - 1, ids[p]].view(1), top_values])
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def assert_generation_matches(
    reference: Reference, prompt: list[int], token_ids: list[int], logprobs
) -> None:
    """Greedy: each token is the reference's argmax given the same prefix, with its log-prob."""
    expected = reference.logprobs(prompt + token_ids)[len(prompt) - 1 : -1]
    assert token_ids == expected.argmax(-1).tolist()
    got = torch.tensor([entry[t] for entry, t in zip(logprobs, token_ids, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(
        got, expected.gather(1, torch.tensor(token_ids)[:, None])[:, 0], atol=TOL, rtol=0
    )


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("num_heads", [5, 8, 40])
def test_alibi_slopes_equal_the_papers(num_heads):
    assert alibi_slopes(num_heads).double().tolist() == pytest.approx(paper_alibi_slopes(num_heads), rel=1e-6)


def test_the_kind_is_told_from_config_json(model):
    preset, folder, llm, _ = model
    extra = open_hf_folder(folder).config.extra
    assert (extra["position_embedding"], extra["norm_head"]) == KINDS[preset]
    assert (llm.engine.runner.model.rotary is None) == (KINDS[preset][0] == "alibi")


def test_prefill_logprobs_match_reference(model):
    """A batch of mixed-length prefills in one forward (paged prefill path)."""
    _, _, llm, reference = model
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=4),
    )
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert_prompt_logprobs_match(out.prompt_logprobs, reference.logprobs(prompt), prompt, k=4)


def test_single_prompt_prefill_matches_reference(model):
    _, _, llm, reference = model
    prompt = PROMPTS[2]  # alone: the fresh-prefill path
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    )
    assert_prompt_logprobs_match(out[0].prompt_logprobs, reference.logprobs(prompt), prompt, k=3)


def test_cached_decode_matches_reference(model):
    """8 greedy steps through the paged cache for a batch of mixed lengths."""
    _, _, llm, reference = model
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert len(out.outputs[0].token_ids) == 8
        assert_generation_matches(reference, prompt, out.outputs[0].token_ids, out.outputs[0].logprobs)


def test_decodes_and_chunked_prefills_in_one_batch_match_reference(model):
    """Requests join a running batch: decode steps share forwards with 8-token prefill chunks,
    and a follow-up request reuses a cached prefix."""
    _, folder, _, reference = model
    config = EngineConfig(
        dtype="float32", kv_cache_memory=KV_CACHE_BYTES, block_size=4, max_num_batched_tokens=8
    )
    engine = LLMEngine(folder, config)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompts = dict(enumerate(make_prompts([11, 20, 6], seed=1)))
    prompts[3] = prompts[1][:12] + [7, 8, 9]  # shares three full blocks with request 1
    results: dict[int, tuple[list, list]] = {i: ([], []) for i in prompts}
    engine.add_request("0", prompts[0], params)
    for step in range(60):
        if step == 3:  # request 0 is decoding now
            engine.add_request("1", prompts[1], params)
            engine.add_request("2", prompts[2], params)
        if step == 12:
            engine.add_request("3", prompts[3], params)
        for out in engine.step():
            results[int(out.request_id)][0].extend(out.new_token_ids)
            results[int(out.request_id)][1].extend(out.logprobs)
    for i, (token_ids, logprobs) in results.items():
        assert len(token_ids) == 6
        assert_generation_matches(reference, prompts[i], token_ids, logprobs)


def test_memory_estimate_counts_every_weight(model):
    """The estimator builds the model on the meta device: its count equals the checkpoint's."""
    _, folder, _, _ = model
    checkpoint = open_hf_folder(folder)
    weights = sum(t.numel() * 4 for t in load_file(folder / "model.safetensors").values())
    def estimate(config: EngineConfig):
        return estimate_memory(checkpoint, config, 256, Placement.resolve(config))

    assert estimate(EngineConfig(dtype="float32")).weights_bytes == weights
    bf16, int8 = (estimate(EngineConfig(dtype="bfloat16", quantization=q)) for q in (None, "int8"))
    # hidden_size 40: the CPU int8 kernel wants in_features % 16, so those layers dequantize per call
    # into a float buffer as large as the biggest of them, the output layer.
    config = checkpoint.config
    buffer = config.vocab_size * config.hidden_size * 2 if config.hidden_size % 16 else 0
    assert int8.weights_bytes - buffer < bf16.weights_bytes == weights // 2


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_norm_head_is_normalised_before_quantization(tmp_path, quantization):
    # The packed kernels want in_features a multiple of 64.
    folder = write_tiny_baichuan(
        tmp_path / "ckpt", "baichuan2-13b", hidden_size=64, num_attention_heads=4, ffn_hidden_size=128
    )
    llm = LLM(
        folder, dtype="bfloat16", quantization=quantization, kv_cache_memory=KV_CACHE_BYTES, block_size=4
    )
    head = llm.engine.runner.model.lm_head
    assert head.packed is not None  # the output layer is int8 under int8 and int4
    rows = torch.eye(head.in_features, dtype=torch.bfloat16)
    weight = head.packed.matmul(rows).float().T  # [vocab, hidden], dequantized
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(head.out_features), atol=0.02, rtol=0)
    out = llm.generate(
        {"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 3
