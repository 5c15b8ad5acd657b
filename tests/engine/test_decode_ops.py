"""The fused ops of a CPU decode step (kernels/csrc/decode_ops.cpp) against the PyTorch code they
replace: the same roundings for the elementwise ops, float32 attention within float tolerance, on
strided rows (views of a merged projection), GQA, ALiBi, 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmserve.engine.kernels import native
from glmserve.engine.layers.attention import alibi_slopes, gather_blocks
from glmserve.engine.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.load(), "the native ops must build on the test machines (a C++ compiler is installed)"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place of a's dtype (a, b of one 16-bit dtype)."""
    if a.dtype == torch.float32:
        return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())
    return int((a.view(torch.int16).long() - b.view(torch.int16).long()).abs().max())


def strided_rows(t: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[t, k] whose rows are k + 24 apart, as a slice of a wider projection output."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k + 24, generator=g) * 3).to(dtype)[:, 5 : 5 + k]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_the_residual_before_it(dtype, threads):
    x, delta = strided_rows(7, 96, dtype), strided_rows(7, 96, dtype, seed=1)
    w = torch.randn(96).to(dtype)
    reference = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).to(dtype)
    out = torch.ops.glmserve.rms_norm(x, w, 1e-5)
    if dtype == torch.float32:  # float32 sums in another order
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    else:
        assert ulps_apart(out, reference) <= 1
    total, normed = torch.ops.glmserve.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(total, x + delta)  # rounded once, as aten's add
    assert torch.equal(normed, torch.ops.glmserve.rms_norm(x + delta, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype, threads):
    x = strided_rows(5, 2 * 200, dtype)
    x[0, :3] = torch.tensor([-100.0, 0.0, 100.0]).to(dtype)  # saturated ends
    gate, up = x.chunk(2, -1)
    out = torch.ops.glmserve.silu_mul(x)
    expected = F.silu(gate) * up
    # The exp differs from PyTorch's by ~1 float32 ulp: at most one ulp of the dtype after rounding
    # (and a value of ~1e-36 instead of 0 where exp(-x) overflows).
    ulp = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=ulp, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style, rotary_dim", [("neox", 64), ("interleaved", 32)])
def test_rotary_in_place_equals_the_copying_one(dtype, style, rotary_dim, threads):
    rotary = RotaryEmbedding(64, rotary_dim, 10000.0, 512, style)
    positions = torch.tensor([0, 3, 17, 511, 200])
    cos, sin = rotary.cos_sin(positions, dtype)
    qkv = strided_rows(5, 6 * 64, dtype)
    qk = qkv[:, : 4 * 64].view(5, 4, 64)  # strided rows, as the models rotate q and k of a projection
    expected = rotary.apply(qk, cos, sin)
    untouched = qkv[:, 4 * 64 :].clone()
    assert rotary.apply_(qk, cos, sin) is qk
    if dtype == torch.float32:  # PyTorch's addcmul may fuse the multiply-add (one rounding, not two)
        torch.testing.assert_close(qk, expected, rtol=2**-22, atol=1e-6)
    else:  # 16-bit: the same roundings as mul, then addcmul
        assert torch.equal(qk, expected)
    assert torch.equal(qkv[:, 4 * 64 :], untouched)


def test_write_kv_equals_index_copy():
    kvh, blocks, block_size, d = 2, 6, 4, 8
    k_cache, v_cache = torch.zeros(kvh, blocks, block_size, d), torch.zeros(kvh, blocks, block_size, d)
    kv = torch.randn(3, 2 * kvh * d)
    k, v = kv[:, : kvh * d].view(3, kvh, d), kv[:, kvh * d :].view(3, kvh, d)  # strided rows
    slots = torch.tensor([5, 0, 23])
    torch.ops.glmserve.write_kv_(k_cache, v_cache, k, v, slots)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    k_ref.view(kvh, -1, d).index_copy_(1, slots, k.transpose(0, 1))
    v_ref.view(kvh, -1, d).index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.glmserve.write_kv_(k_cache, v_cache, k, v, torch.tensor([0, 1, 24]))


def reference_attention(q, k_cache, v_cache, tables, lens, slopes=None) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D) + alibi) v per sequence over its first len keys: [B, H * D]."""
    b, h, d = q.shape
    kvh = k_cache.shape[0]
    keys = gather_blocks(k_cache, tables).double()  # [KVH, B, L, D]
    values = gather_blocks(v_cache, tables).double()
    out = []
    for s in range(b):
        n = int(lens[s])
        kk = keys[:, s, :n].repeat_interleave(h // kvh, 0)  # [H, n, D]
        vv = values[:, s, :n].repeat_interleave(h // kvh, 0)
        scores = torch.einsum("hd,hnd->hn", q[s].double(), kk) / d**0.5
        if slopes is not None:
            scores = scores + slopes.double()[:, None] * torch.arange(n, dtype=torch.float64)
        out.append(torch.einsum("hn,hnd->hd", scores.softmax(-1), vv).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("heads, kv_heads, head_dim, alibi", [(6, 2, 64, False), (4, 4, 40, False), (4, 4, 32, True)])
def test_decode_attention_matches_the_reference(dtype, tolerance, heads, kv_heads, head_dim, alibi, threads):
    g = torch.Generator().manual_seed(0)
    blocks, block_size = 12, 16
    k_cache = torch.randn(kv_heads, blocks, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, blocks, block_size, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 16, 17, 70])  # one key, exactly one block, one past it, several blocks
    tables = torch.stack([torch.randperm(blocks, generator=g)[:5] for _ in lens])
    qkv = torch.randn(4, (heads + 3) * head_dim, generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].view(4, heads, head_dim)  # strided rows
    slopes = alibi_slopes(heads) if alibi else None
    out = torch.ops.glmserve.decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, slopes)
    assert out.dtype == dtype and out.shape == (4, heads * head_dim)
    expected = reference_attention(q, k_cache, v_cache, tables, lens, slopes)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_decode_attention_refuses_what_does_not_fit():
    k_cache = torch.zeros(2, 4, 16, 8)
    q, tables = torch.zeros(1, 4, 8), torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="bad context length"):
        torch.ops.glmserve.decode_attention(q, k_cache, k_cache, tables, torch.tensor([33]), 1.0, None)
    with pytest.raises(RuntimeError, match="block out of range"):
        torch.ops.glmserve.decode_attention(q, k_cache, k_cache, torch.tensor([[0, 9]]), torch.tensor([20]), 1.0, None)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 49152])
def test_argmax_rows_equals_torch_argmax(vocab):
    torch.manual_seed(vocab)
    x = torch.randn(5, vocab)
    x[1] = 0.5  # ties everywhere: the first index wins
    x[2, vocab // 2] = float("nan")  # a NaN counts as the maximum
    x[3] = float("-inf")
    if vocab > 3:
        x[4, [vocab - 1, 2]] = 100.0  # the earlier of two maxima in different lanes
    assert torch.equal(torch.ops.glmserve.argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_lora_add_matches_a_float64_reference(dtype, tolerance, rows, threads):
    """out[t] += bt_s^T (a_s x[t]) for each row's slot s (-1: untouched); x strided, N past one chunk."""
    g = torch.Generator().manual_seed(rows)
    slots, width, k, n = 3, 12, 96, 300
    x = strided_rows(rows, k, dtype, seed=rows)
    a = (torch.randn(slots * width, k, generator=g) * 0.1).to(dtype)
    bt = (torch.randn(slots * width, n, generator=g) * 0.1).to(dtype)
    out = torch.randn(rows, n, generator=g).to(dtype)
    row_slots = torch.tensor([(t % (slots + 1)) - 1 for t in range(rows)], dtype=torch.int64)
    expected = out.double().clone()
    for t, s in enumerate(row_slots.tolist()):
        if s >= 0:
            rows_of_slot = slice(s * width, (s + 1) * width)
            expected[t] += (a[rows_of_slot].double() @ x[t].double()) @ bt[rows_of_slot].double()
    torch.ops.glmserve.lora_add_(out, x, a, bt, row_slots, width)
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_lora_add_refuses_a_slot_out_of_range():
    x, out = torch.zeros(1, 8), torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.glmserve.lora_add_(out, x, torch.zeros(4, 8), torch.zeros(4, 4), torch.tensor([2]), 2)
