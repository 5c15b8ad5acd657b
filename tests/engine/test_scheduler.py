from glmserve.engine.block_manager import BlockManager
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.sequence import Sequence, SequenceStatus


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=32, prefix=True):
    return Scheduler(BlockManager(num_blocks, block_size, prefix), max_num_seqs, max_tokens)


def make_seq(rid, n, start=0):
    return Sequence(rid, list(range(start, start + n)), SamplingParams())


def run_step(sched: Scheduler, token=7):
    """One engine step without a model: compute what was scheduled, sample `token` where due."""
    batch = sched.schedule()
    sched.postprocess(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(token)
    return batch


def test_prefill_then_decode():
    sched = make_scheduler()
    seq = make_seq("a", 10)
    sched.add(seq)
    batch = run_step(sched)
    assert batch.num_new_tokens == [10] and seq.status is SequenceStatus.RUNNING
    batch = run_step(sched)
    assert batch.num_new_tokens == [1]


def test_chunked_prefill_under_token_budget_and_decode_first():
    sched = make_scheduler(max_tokens=8)
    a = make_seq("a", 3)
    sched.add(a)
    run_step(sched)
    b = make_seq("b", 20, start=100)
    sched.add(b)
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 7]  # a decodes, b prefills a chunk in what is left
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 7]
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 6]  # b's last chunk, which samples its first token
    assert b.num_output_tokens == 1


def test_new_requests_join_running_batch_fcfs():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add(make_seq(rid, 4, start=ord(rid) * 10))
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"]  # seat cap
    assert [s.request_id for s in sched.waiting] == ["c"]
    sched.finish(batch.seqs[0], "stop")
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["b", "c"]


def test_preemption_of_newest_and_recompute():
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=64, prefix=False)
    a, b = make_seq("a", 7), make_seq("b", 7, start=50)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, pool full, 8 tokens each
    batch = run_step(sched)  # both decode within their second blocks
    assert len(batch.seqs) == 2
    batch = run_step(sched)  # a needs a 3rd block -> b (newest) is preempted
    assert batch.num_preempted == 1 and [s.request_id for s in batch.seqs] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    sched.finish(a, "stop")
    num_tokens = b.num_tokens  # 7 prompt + 2 output
    batch = run_step(sched)
    assert batch.seqs == [b] and batch.num_new_tokens == [num_tokens] == [9]  # all recomputed


def test_finish_frees_blocks_and_abort_waiting():
    sched = make_scheduler()
    a, b = make_seq("a", 5), make_seq("b", 5, start=40)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(b, "abort")
    assert b.is_finished and not sched.waiting
    sched.finish(a, "stop")
    assert sched.block_manager.num_free_blocks == 64 and not sched.has_unfinished
