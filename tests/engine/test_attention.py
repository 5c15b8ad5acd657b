"""Paged attention against a float64 reference written from the formulas: grouped KV heads,
ALiBi (with a head count that is not a power of two), chunked prefill after a cached prefix,
and a batch mixing a decode with two prefills."""

import math

import numpy as np
import pytest
import torch

from glmserve.engine.attention_metadata import build_attention_metadata
from glmserve.engine.layers.attention import SDPA_MAX_DECODES, PagedAttention, alibi_slopes

BLOCK_SIZE, NUM_BLOCKS, HEAD_DIM = 4, 32, 16


def reference(q, k, v, position, slopes=None):
    """One query at `position` against keys 0..position: q [H, D], k/v [L, KVH, D] float64."""
    num_heads, num_kv = q.shape[0], k.shape[1]
    group = num_heads // num_kv
    out = []
    for h in range(num_heads):
        keys, values = k[: position + 1, h // group], v[: position + 1, h // group]
        scores = keys @ q[h] / math.sqrt(q.shape[1])
        if slopes is not None:  # ALiBi: slope_h * (key position - query position)
            scores = scores + slopes[h] * (torch.arange(position + 1, dtype=torch.float64) - position)
        out.append(torch.softmax(scores, 0) @ values)
    return torch.stack(out)


class Seq:
    def __init__(self, length, blocks, num_heads, num_kv, seed):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(length, num_heads, HEAD_DIM, generator=g, dtype=torch.float64)
        self.k = torch.randn(length, num_kv, HEAD_DIM, generator=g, dtype=torch.float64)
        self.v = torch.randn(length, num_kv, HEAD_DIM, generator=g, dtype=torch.float64)
        self.blocks = blocks

    def slots(self, start, end):
        pos = np.arange(start, end)
        return np.asarray(self.blocks)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE


def run_step(layer, cache, decodes, prefills):
    """decodes: [(seq, position)], prefills: [(seq, start, end)] -> outputs [T, H, D] in order."""
    parts = [(s, p, p + 1) for s, p in decodes] + list(prefills)
    q = torch.cat([s.q[a:b] for s, a, b in parts]).float()
    k = torch.cat([s.k[a:b] for s, a, b in parts]).float()
    v = torch.cat([s.v[a:b] for s, a, b in parts]).float()
    meta = build_attention_metadata(
        np.concatenate([s.slots(a, b) for s, a, b in parts]),
        decode_tables=[s.blocks for s, _ in decodes],
        decode_context_lens=[p + 1 for _, p in decodes],
        prefill_tables=[s.blocks for s, _, _ in prefills],
        prefill_starts=[a for _, a, _ in prefills],
        prefill_q_lens=[b - a for _, a, b in prefills],
        block_size=BLOCK_SIZE,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    return layer(q, k, v, cache, meta).view(q.shape[0], layer.num_heads, HEAD_DIM)


@pytest.mark.parametrize(("num_heads", "num_kv", "use_alibi"), [(6, 2, False), (5, 5, True), (8, 8, True)])
def test_paged_attention_matches_reference(num_heads, num_kv, use_alibi):
    layer = PagedAttention(num_heads, num_kv, HEAD_DIM, use_alibi=use_alibi)
    cache = tuple(torch.zeros(num_kv, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM) for _ in range(2))
    a = Seq(17, [3, 7, 1, 9, 12], num_heads, num_kv, seed=1)
    b = Seq(5, [4, 5], num_heads, num_kv, seed=2)
    c = Seq(13, [10, 2, 8, 6], num_heads, num_kv, seed=3)
    run_step(layer, cache, [], [(a, 0, 10), (c, 0, 12)])  # two fresh prefills fill the cache
    out = run_step(layer, cache, [(c, 12)], [(a, 10, 17), (b, 0, 5)])  # decode + chunk after prefix + fresh
    slopes = alibi_slopes(num_heads).double() if use_alibi else None
    rows = [(c, 12)] + [(a, p) for p in range(10, 17)] + [(b, p) for p in range(5)]
    expected = torch.stack([reference(s.q[p], s.k, s.v, p, slopes) for s, p in rows])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_decodes", [1, 3, SDPA_MAX_DECODES + 2])  # SDPA, SDPA with a mask, matmuls
def test_decodes_of_different_lengths_match_reference(num_decodes):
    layer = PagedAttention(6, 2, HEAD_DIM)
    cache = tuple(torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM) for _ in range(2))
    lengths = [9, 14, 5, 11, 7, 16][:num_decodes]
    blocks = iter(range(1, NUM_BLOCKS))
    seqs = [Seq(n, [next(blocks) for _ in range(-(-n // BLOCK_SIZE))], 6, 2, seed=10 + i) for i, n in enumerate(lengths)]
    run_step(layer, cache, [], [(s, 0, n - 1) for s, n in zip(seqs, lengths, strict=True)])
    out = run_step(layer, cache, [(s, n - 1) for s, n in zip(seqs, lengths, strict=True)], [])
    expected = torch.stack([reference(s.q[n - 1], s.k, s.v, n - 1) for s, n in zip(seqs, lengths, strict=True)])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_single_fresh_prefill_with_alibi():
    layer = PagedAttention(5, 5, HEAD_DIM, use_alibi=True)
    cache = tuple(torch.zeros(5, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM) for _ in range(2))
    s = Seq(9, [2, 0, 5], 5, 5, seed=4)
    out = run_step(layer, cache, [], [(s, 0, 9)])
    slopes = alibi_slopes(5).double()
    expected = torch.stack([reference(s.q[p], s.k, s.v, p, slopes) for p in range(9)])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    # 5 heads: the 4 slopes of 4 heads, then every other slope of 8 heads
    assert alibi_slopes(5).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1])
    assert len(alibi_slopes(40)) == 40
