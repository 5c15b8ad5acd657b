"""One sequence's token ids, status and block table: one choice of a request (n choices are n
sequences sharing the request id, told apart by `index`). No torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from glmserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVPrefix:
    """P-Tuning v2: keys and values that precede every prompt of a model or adapter, computed once and
    held in KV-cache blocks. A sequence's block table starts with them: the full blocks shared
    read-only, the last `num_slots % block_size` slots (if any) copied into a block of its own, where
    its first tokens follow. Cache index of token position p = num_slots + p; its rotary position is
    p + position_offset."""

    num_slots: int
    shared_blocks: tuple[int, ...]
    partial_block: int | None  # the tail of the prefix, copied per sequence
    position_offset: int = 0  # rotary position of the first token (THUDM's code: 0; peft's: num_slots)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Every block the prefix holds, in cache order."""
        return self.shared_blocks + ((self.partial_block,) if self.partial_block is not None else ())


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n choices
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (computed, or found in the prefix cache).
    num_computed_tokens: int = 0
    # Of those, how many the prefix cache supplied at the last allocation (stats only).
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # [None, {token_id: logprob}, ...] filled as prefill chunks run; kept across preemptions.
    prompt_logprobs: list | None = None
    # Structured output: the grammar's matcher (llguidance), advanced by each output token. It
    # lives with the sequence, so preemption (which recomputes KV, never tokens) leaves it valid.
    grammar: Any = None
    # Fine-tuning: the LoRA adapter this sequence runs with (None: the base model), and what salts
    # its prefix-cache hashes (the adapter's registration id), so KV of different adapters never mixes.
    lora: str | None = None
    cache_salt: int | None = None
    kv_prefix: KVPrefix | None = None  # P-Tuning v2 keys/values before the prompt

    @property
    def num_prefix_slots(self) -> int:
        return self.kv_prefix.num_slots if self.kv_prefix is not None else 0

    @property
    def seq_id(self) -> tuple[str, int]:
        """Unique among live sequences: what per-sequence state (seeds, text) is keyed by."""
        return self.request_id, self.index

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token still needs its KV computed."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_at(self, position: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < num_prompt else self.output_token_ids[position - num_prompt]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone; prompt and output so far are recomputed later."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
