from glmserve.engine.block_manager import BlockManager
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.sequence import Sequence


def make_seq(ids, rid="r", **params):
    return Sequence(rid, list(ids), SamplingParams(**params))


def admit(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does for a waiting sequence scheduled whole."""
    num_new = seq.num_tokens - bm.num_cached_tokens(seq)
    assert bm.can_allocate(seq, num_new)
    bm.allocate_prefix(seq)
    bm.allocate(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq)


def test_allocate_and_free_counts_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    admit(bm, seq)
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    assert bm.num_free_blocks == 5
    bm.deallocate(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_decode_grows_one_block_at_boundary():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(4))
    admit(bm, seq)
    assert len(seq.block_table) == 1
    seq.append_token(99)  # position 4 needs a second block
    assert bm.can_allocate(seq, 1)
    bm.allocate(seq, 1)
    assert len(seq.block_table) == 2


def test_prefix_hit_reuses_full_blocks_and_leaves_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(range(12), "a")
    admit(bm, first)
    second = make_seq(list(range(12)) + [50, 51], "b")
    assert bm.num_cached_tokens(second) == 12
    admit(bm, second)
    assert second.block_table[:3] == first.block_table
    assert second.num_cached_tokens == 12
    # identical prompt: the last block stays uncached so its last token is computed
    third = make_seq(range(12), "c")
    assert bm.num_cached_tokens(third) == 8
    assert bm.prefix_cache_hit_rate > 0


def test_no_prefix_hit_when_disabled_or_prompt_logprobs():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    admit(bm, make_seq(range(12), "a"))
    assert bm.num_cached_tokens(make_seq(range(13), "b")) == 0
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, make_seq(range(12), "a"))
    assert bm.num_cached_tokens(make_seq(range(13), "b", prompt_logprobs=1)) == 0


def test_prefix_differs_in_first_block_is_miss():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, make_seq(range(12), "a"))
    assert bm.num_cached_tokens(make_seq([7] + list(range(1, 13)), "b")) == 0


def test_freed_cached_blocks_stay_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(8), "a")
    admit(bm, a)
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    assert bm.num_cached_tokens(make_seq(range(9), "x")) == 8  # still cached after free
    b = make_seq(range(100, 116), "b")  # needs all 4 blocks: evicts a's cached blocks
    admit(bm, b)
    assert bm.num_free_blocks == 0
    assert bm.num_cached_tokens(make_seq(range(9), "y")) == 0


def test_shared_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(9), "a")
    admit(bm, a)
    b = make_seq(range(9), "b")
    admit(bm, b)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    assert all(bm.ref_counts[x] == 2 for x in shared)
    bm.deallocate(a)
    assert all(bm.ref_counts[x] == 1 for x in shared)
    bm.deallocate(b)
    assert bm.num_free_blocks == 8


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(range(8), "a")
    admit(bm, a)
    bm.deallocate(a)  # 2 cached evictable + 1 free
    b = make_seq(list(range(8)) + [1, 2, 3, 4, 5], "b")  # 8 cached + 5 new -> 4 blocks in all
    assert not bm.can_allocate(b, 5)
    assert bm.can_allocate(b, 4)
