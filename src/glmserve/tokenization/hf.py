"""Tokenizers built on Hugging Face `tokenizers`: a folder's tokenizer.json, or a GGUF file's
vocabulary rebuilt into one (tokenization/gguf.py). BOS/EOS as the model's config says, stop ids,
and the chat template rendered with text always encoded as text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tokenizers

from glmserve.chat.template import render_chat, render_segments, special_pattern
from glmserve.model_path import read_json

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS/EOS handling, stop ids
    and the Jinja chat template. Build one with `load_tokenizer`."""

    supports_input_budget = False

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ):
        # Two copies, so that encode never flips shared state under concurrent callers: one finds
        # special-token strings in the text, the other reads them as plain characters.
        self._parsing = backend
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self._prefix_ids = list(prefix_ids)  # what add_special_tokens puts around a text
        self._suffix_ids = list(suffix_ids)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = {token.content: i for i, token in added.items() if token.special}
        self._special_pattern = special_pattern(self.special_ids)
        self.stop_token_ids = self._stop_ids(extra_stop_ids)

    @property
    def vocab_size(self) -> int:
        return self._parsing.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> set[int]:
        named = {self.bos_token_id, self.eos_token_id} - {None}
        return set(self.special_ids.values()) | named

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings are plain text unless `parse_special`;
        `add_special_tokens` adds BOS/EOS only where the model's own config asks for them."""
        backend = self._parsing if parse_special else self._plain
        ids = backend.encode(text, add_special_tokens=False).ids
        return self._prefix_ids + ids + self._suffix_ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._parsing.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._parsing.id_to_token(i) for i in ids]

    def backend_json(self) -> str:
        """The serialized `tokenizers.Tokenizer` (tokenizer.json's format)."""
        return self._parsing.to_str()

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        tools: list | None = None,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> list[int]:
        """Prompt ids for a conversation. Special tokens come only from the template; message
        text is always encoded as plain text, so it cannot forge a role."""
        variables = self._template_variables(tools, add_generation_prompt, kwargs)
        segments = render_segments(self._require_template(), messages, self._special_pattern, **variables)
        ids: list[int] = []
        for text, is_special in segments:
            ids += [self.special_ids[text]] if is_special else self.encode(text, add_special_tokens=False)
        return ids

    def render_chat_template(
        self,
        messages: Sequence[Mapping],
        tools: list | None = None,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> str:
        """The prompt as text, for debugging; `apply_chat_template` gives the ids to run."""
        variables = self._template_variables(tools, add_generation_prompt, kwargs)
        return render_chat(self._require_template(), messages, **variables)

    def _template_variables(self, tools: list | None, add_generation_prompt: bool, kwargs: dict) -> dict:
        return {
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            **kwargs,
        }

    def _require_template(self) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template: use a raw completion prompt instead")
        return self.chat_template

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._parsing.id_to_token(token_id)

    def _stop_ids(self, extra_stop_ids: Iterable[int]) -> tuple[int, ...]:
        end_of_turn = [self.special_ids.get(token) for token in END_OF_TURN_TOKENS]
        ids = [self.eos_token_id, *extra_stop_ids, *end_of_turn]
        return tuple(dict.fromkeys(i for i in ids if i is not None))



def load_hf_tokenizer(folder: Path) -> HFTokenizer:
    """tokenizer.json, with tokenizer_config.json for BOS/EOS and the chat template, and
    generation_config.json for the extra ids that end an answer."""
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = read_json(folder / "tokenizer_config.json")
    bos_id = _token_id(backend, config.get("bos_token"))
    eos_id = _token_id(backend, config.get("eos_token"))
    prefix_ids, suffix_ids = _post_processor_affixes(backend)
    if "add_bos_token" in config or "add_eos_token" in config:
        # As transformers does: explicit flags replace what the post-processor adds.
        prefix_ids = [bos_id] if config.get("add_bos_token") and bos_id is not None else []
        suffix_ids = [eos_id] if config.get("add_eos_token") and eos_id is not None else []
    eos_ids = read_json(folder / "generation_config.json").get("eos_token_id", [])
    return HFTokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        extra_stop_ids=[eos_ids] if isinstance(eos_ids, int) else eos_ids,
        chat_template=_hf_chat_template(folder, config),
    )



def _token_id(backend: tokenizers.Tokenizer, token: str | dict | None) -> int | None:
    # tokenizer_config.json writes a token as "<s>" or as a serialized AddedToken {"content": "<s>", ...}.
    content = token.get("content") if isinstance(token, dict) else token
    return backend.token_to_id(content) if content else None


def _post_processor_affixes(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """What tokenizer.json's post-processor puts around a text, e.g. ([bos], []) for Llama."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


# What a model folder holds (a file name, or a test of the folder) -> how to read its tokenizer;
