"""What the engine needs from the text side, declared here so that the engine imports no tokenizer:
the caller hands LLMEngine a Detokenizer (tokenization/detokenize.py's TextDetokenizer wraps a
tokenizer). Without one the engine works on token ids alone. No torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SequenceDetokenizer(Protocol):
    """One sequence's output ids -> text deltas, cut at the first stop string."""

    is_stopped: bool
    stop_reason: str | None

    def add(self, new_token_ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


class Detokenizer(Protocol):
    stop_token_ids: Sequence[int]  # ids that end an answer, beyond the checkpoint's EOS ids

    def start(
        self,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool,
        stop: Sequence[str],
        include_stop_str_in_output: bool,
    ) -> SequenceDetokenizer: ...
