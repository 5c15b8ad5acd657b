"""Continuous batching: which sequences prefill (in chunks) and which decode, each step. No torch.

Each step spends a token budget (`max_num_batched_tokens`) on, in order: running sequences
(oldest first; a decode costs one token, an unfinished prefill its next chunk), then waiting
sequences first-come first-served while seats (`max_num_seqs`) and blocks last. When blocks
run out, the newest running sequence is preempted: its blocks go back and it is recomputed
later (its prompt and output so far), usually largely from the prefix cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glmserve.engine.block_manager import BlockManager
from glmserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens to compute, per sequence
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 1 << 30
    ):
        self.block_manager = block_manager
        self.max_loras = max_loras  # distinct LoRA adapters among running sequences
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.num_preempted:  # don't admit new work while the cache is short
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, num_new):
                # running[i:] are not scheduled yet; the newest of them gives its blocks back.
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    return budget
            self.block_manager.allocate(seq, num_new)
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        loras = {s.lora for s in self.running if s.lora is not None}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.lora is not None and seq.lora not in loras and len(loras) >= self.max_loras:
                break  # its adapter needs a slot that running sequences hold; first-come first-served
            cached = self.block_manager.cached_prefix(seq)  # hashed once per admission attempt
            num_new = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(seq, num_new, cached):
                break  # first-come first-served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if seq.lora is not None:
                loras.add(seq.lora)
            self.block_manager.allocate_prefix(seq, cached)
            self.block_manager.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch) -> None:
        """Record the KV computed this step and register full blocks in the prefix cache."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stopped, at its limit, or aborted) and free its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
