import math

import numpy as np
import pytest
import torch

from glmserve.engine.sampler import build_sampling_batch, sample, topk_logprobs
from glmserve.engine.sampling_params import SamplingParams


def batch_for(params, seen=None, outputs=None, banned=None, generators=None):
    n = len(params)
    return build_sampling_batch(
        params,
        seen or [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
        banned or [[] for _ in range(n)],
        generators or [None] * n,
        torch.device("cpu"),
    )


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    ids, _ = sample(logits, batch_for([SamplingParams(temperature=0)] * 2))
    assert ids.tolist() == [1, 0]


def test_top_k_one_equals_greedy_at_any_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ids, _ = sample(logits, batch_for([SamplingParams(temperature=2.0, top_k=1)] * 4))
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_top_p_keeps_nucleus_only():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.8)]
    seen = {sample(logits, batch_for(params))[0].item() for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(4000, 1)
    ids, _ = sample(logits, batch_for([SamplingParams(temperature=1.0)] * 4000))
    freq = torch.bincount(ids, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_seed_is_reproducible_and_independent_of_batch():
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, seed=42)

    def draw(rows):
        gen = torch.Generator().manual_seed(42)
        batch = batch_for([params] * rows, generators=[gen] + [None] * (rows - 1))
        return [sample(logits.repeat(rows, 1), batch)[0][0].item() for _ in range(5)]

    assert draw(1) == draw(1) == draw(3)


def test_repetition_penalty_and_banned_ids():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    ids, processed = sample(logits, batch_for([SamplingParams(temperature=0, repetition_penalty=2.0)], seen=[[0]]))
    assert ids.item() == 1 and processed[0, 0].item() == 1.0
    ids, _ = sample(logits, batch_for([SamplingParams(temperature=0)], banned=[[0, 1]]))
    assert ids.item() == 2


def test_frequency_and_presence_penalties():
    logits = torch.tensor([[3.0, 2.0]])
    params = [SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.5)]
    _, processed = sample(logits, batch_for(params, outputs=[[0, 0]]))
    assert processed[0].tolist() == [3.0 - 1.0 - 0.5, 2.0]


def test_topk_logprobs_are_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    chosen, values, ids = topk_logprobs(logits, torch.tensor([0]), 2)
    norm = math.log(sum(math.exp(x) for x in (1.0, 2.0, 3.0)))
    assert abs(chosen.item() - (1.0 - norm)) < 1e-6
    assert ids.tolist() == [[2, 1]] and abs(values[0, 0].item() - (3.0 - norm)) < 1e-6


def bitmask_allowing(allowed: list[list[int]], vocab_size: int) -> torch.Tensor:
    words = np.zeros((len(allowed), (vocab_size + 31) // 32), dtype=np.uint32)
    for row, ids in enumerate(allowed):
        for i in ids:
            words[row, i // 32] |= np.uint32(1 << (i % 32))
    return torch.from_numpy(words.view(np.int32))


@pytest.mark.parametrize("native_kernels", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_rows_draw_only_allowed_tokens(monkeypatch, native_kernels, temperature):
    if not native_kernels:
        monkeypatch.setattr("glmserve.engine.sampler.native.load", lambda: False)
    vocab_size = 100
    logits = torch.randn(3, vocab_size)
    raw = logits.clone()
    allowed = [[5, 31, 32, 99], [0]]  # rows 0 and 2 constrained; row 1 free
    params = [SamplingParams(temperature=temperature, logprobs=1)] * 3
    batch = build_sampling_batch(params, [[]] * 3, [[]] * 3, [[]] * 3, [None] * 3, torch.device("cpu"),
                                 [0, 2], bitmask_allowing(allowed, vocab_size))  # fmt: skip
    for _ in range(20):
        ids, processed = sample(logits, batch)
        assert ids[0].item() in allowed[0] and ids[2].item() == 0
        assert ids[1].item() == raw[1].argmax().item() or temperature > 0
    assert torch.equal(logits, raw)  # logprobs wanted: the model's logits are kept
    assert torch.isinf(processed[0]).sum() == vocab_size - 4 and not torch.isinf(processed[1]).any()
