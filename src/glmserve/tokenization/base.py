"""The Tokenizer protocol every tokenizer implements, and the pieces tokenizers with a chat format in
code (ChatGLM, GLM-4, Baichuan) share. No torch."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: tuple[int, ...]  # ids that end an answer
    special_ids: dict[str, int]  # special token text -> id
    chat_template: str | None  # Jinja, or None where the chat format is code (chat/)
    supports_input_budget: bool  # apply_chat_template(max_input_tokens=...) drops old rounds

    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> set[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """Special-token strings in `text` are plain text unless `parse_special`; add_special_tokens
        adds what the model's own config puts around a text (BOS, ChatGLM's [gMASK] sop)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping], tools: list | None = None, add_generation_prompt: bool = True, **kwargs
    ) -> list[int]:
        """Prompt ids: special tokens by id only, message text always encoded as text (no role forging)."""
        ...

    def render_chat_template(
        self, messages: Sequence[Mapping], tools: list | None = None, add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """The prompt as text, for debugging; `apply_chat_template` gives the ids to run."""
        ...


class CodeChatFormat:
    """For tokenizers whose chat format is code: no Jinja template, the prompt text is its ids decoded."""

    chat_template = None
    supports_input_budget = False

    def render_chat_template(
        self, messages: Sequence[Mapping], tools: list | None = None, add_generation_prompt: bool = True, **kwargs
    ) -> str:
        ids = self.apply_chat_template(messages, tools, add_generation_prompt, **kwargs)
        return self.decode(ids, skip_special_tokens=False)


def encode_with_specials(
    text: str, pattern: re.Pattern, special_ids: Mapping[str, int], encode: Callable[[str, bool], list[int]]
) -> list[int]:
    """`text` whose special-token strings (matched by `pattern`) become their ids; the text between
    them goes to encode(piece, is_start)."""
    ids, start = [], 0
    for found in pattern.finditer(text):
        ids += encode(text[start : found.start()], start == 0) + [special_ids[found.group()]]
        start = found.end()
    return ids + encode(text[start:], start == 0)
