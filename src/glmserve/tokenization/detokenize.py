"""Token ids -> text while they stream: UTF-8 safe, O(new tokens) per step, stop strings honoured.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\nUser:"])
    for ids in engine_steps:
        send(detok.add(ids))
        if detok.is_stopped: break
    send(detok.flush())

Only a window of ids is decoded each step (vLLM's prefix/read offsets): the new text is
decode(ids[prefix:]) minus decode(ids[prefix:read]). The tokens before `read` are context, so a
SentencePiece decoder keeps the leading space of a word and a byte-level one can finish a
character begun in an earlier token; a window whose text ends in U+FFFD waits for the rest of its
last character's bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens decoded before the first output token, as context (vLLM uses 5 as well).
NUM_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"  # what decode gives for bytes of a character not yet complete


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's output ids into text deltas. `text` is everything emitted so far;
    once a stop string appears, `is_stopped` is set, `stop_reason` names it, and the text ends
    before it (or after it, with include_stop_str_in_output)."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max(map(len, self._stop), default=0)
        self._ids = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: context for the decoder
        self._read_offset = len(self._ids)  # ids before this are already in _decoded
        self._decoded = ""  # all output text decoded so far, stop strings included
        self._num_searched = 0  # chars of _decoded already searched for stop strings
        self.text = ""
        self.stop_reason: str | None = None
        self.is_stopped = False

    def add(self, new_token_ids: Sequence[int]) -> str:
        """The text the new ids complete; may be "" while a character or a possible stop string
        is incomplete."""
        if self.is_stopped:
            return ""
        self._ids.extend(new_token_ids)
        self._decoded += self._decode_window(is_final=False)
        return self._release(is_final=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back, unless a stop string ended it."""
        if self.is_stopped:
            return ""
        self._decoded += self._decode_window(is_final=True)
        return self._release(is_final=True)

    def _decode_window(self, is_final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        is_partial = window_text.endswith(REPLACEMENT_CHAR) and not is_final
        if len(window_text) <= len(prefix_text) or is_partial:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _release(self, is_final: bool) -> str:
        end = self._find_stop()
        if end is None:
            end = len(self._decoded) - (0 if is_final else self._partial_stop_len())
        delta = self._decoded[len(self.text) : end]
        self.text += delta
        return delta

    def _find_stop(self) -> int | None:
        """Where the released text ends if a stop string has appeared (and mark the stop)."""
        if not self._stop:
            return None
        # A match may begin up to max_stop_len - 1 chars before the text not yet searched.
        start = max(0, self._num_searched - self._max_stop_len + 1)
        self._num_searched = len(self._decoded)
        found = [(index, stop) for stop in self._stop if (index := self._decoded.find(stop, start)) >= 0]
        if not found:
            return None
        index, stop = min(found, key=lambda hit: (hit[0], -len(hit[1])))
        self.is_stopped, self.stop_reason = True, stop
        return index + len(stop) if self._include_stop else index

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        text = self._decoded
        return max(
            (
                n
                for stop in self._stop
                for n in range(1, min(len(stop), len(text) + 1))
                if text.endswith(stop[:n])
            ),
            default=0,
        )


class TextDetokenizer:
    """The engine's Detokenizer (engine/detokenizer.py) for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = tuple(tokenizer.stop_token_ids)

    def start(self, prompt_token_ids: Sequence[int], **options) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, **options)

    def grammar_tokenizer(self, vocab_size: int, eos_ids: Sequence[int]):
        """The tokenizer as the grammar library sees it (tokenization/grammar_vocab.py)."""
        from glmserve.tokenization.grammar_vocab import grammar_tokenizer

        return grammar_tokenizer(self.tokenizer, vocab_size, eos_ids)
