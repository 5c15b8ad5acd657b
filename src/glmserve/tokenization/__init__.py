"""Text <-> token ids for one model, from a Hugging Face folder or a GGUF file.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a folder with tokenizer.json
    tok.encode("Hi <|im_start|>")                     # specials in user text stay plain text
    tok.encode("<|im_start|>user\\nHi", parse_special=True)   # raw prompts may write them
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # -> list[int]

Every format becomes a `tokenizers.Tokenizer`; a GGUF file's vocabulary, merges and token types
are rebuilt into one with the pre-tokenizer llama.cpp uses for its `tokenizer.ggml.pre`. ChatGLM's
own formats (SentencePiece, tiktoken; folder or `chatglm` GGUF) have their classes in glm_tokenizers.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import tokenizers
from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from glmserve.chat.template import render_chat, render_segments, special_pattern
from glmserve.gguf_file import open_gguf_file
from glmserve.tokenization.baichuan import is_baichuan_tokenizer_folder, load_baichuan_tokenizer
from glmserve.tokenization.glm import is_glm_tokenizer_folder, load_glm_tokenizer
from glmserve.tokenization.glm_gguf import is_glm_gguf, load_glm_gguf_tokenizer

# Special tokens that end a chat turn in common templates; they stop generation when present.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS/EOS handling, stop ids
    and the chat template. Build one with `load_tokenizer`."""

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
        self._special_ids = {token.content: i for i, token in added.items() if token.special}
        self._special_pattern = special_pattern(self._special_ids)
        self.stop_token_ids = self._stop_ids(extra_stop_ids)

    @property
    def vocab_size(self) -> int:
        return self._parsing.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> set[int]:
        named = {self.bos_token_id, self.eos_token_id} - {None}
        return set(self._special_ids.values()) | named

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
            ids += [self._special_ids[text]] if is_special else self.encode(text, add_special_tokens=False)
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
        end_of_turn = [self._special_ids.get(token) for token in END_OF_TURN_TOKENS]
        ids = [self.eos_token_id, *extra_stop_ids, *end_of_turn]
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a `.gguf` file or of a model folder (see FOLDER_LOADERS)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if path.is_dir():
        for marker, load in FOLDER_LOADERS:
            if marker(path) if callable(marker) else (path / marker).is_file():
                return load(path)
        found = sorted(p.name for p in path.iterdir())
        wanted = [marker.__doc__ if callable(marker) else marker for marker, _ in FOLDER_LOADERS]
        raise ValueError(f"no supported tokenizer in {path}: it holds {found}, expected one of {wanted}")
    raise ValueError(f"cannot load a tokenizer from {path}: expected a .gguf file or a model folder")


# ---------------------------------------------------------------- Hugging Face folders


def load_hf_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json, with tokenizer_config.json for BOS/EOS and the chat template, and
    generation_config.json for the extra ids that end an answer."""
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    bos_id = _token_id(backend, config.get("bos_token"))
    eos_id = _token_id(backend, config.get("eos_token"))
    prefix_ids, suffix_ids = _post_processor_affixes(backend)
    if "add_bos_token" in config or "add_eos_token" in config:
        # As transformers does: explicit flags replace what the post-processor adds.
        prefix_ids = [bos_id] if config.get("add_bos_token") and bos_id is not None else []
        suffix_ids = [eos_id] if config.get("add_eos_token") and eos_id is not None else []
    eos_ids = _read_json(folder / "generation_config.json").get("eos_token_id", [])
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        extra_stop_ids=[eos_ids] if isinstance(eos_ids, int) else eos_ids,
        chat_template=_hf_chat_template(folder, config),
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


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
    template = config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


# What a model folder holds (a file name, or a test of the folder) -> how to read its tokenizer;
# the first match wins. Formats with their own files (ChatGLM's SentencePiece tokenizer.model,
# GLM-4's tiktoken file) go in front.
FOLDER_LOADERS: list[tuple[str | Callable[[Path], bool], Callable[[Path], Tokenizer]]] = [
    (is_glm_tokenizer_folder, load_glm_tokenizer),
    (is_baichuan_tokenizer_folder, load_baichuan_tokenizer),
    ("tokenizer.json", load_hf_tokenizer),
]


# ---------------------------------------------------------------- GGUF files


def load_gguf_tokenizer(path: Path) -> Tokenizer:
    gguf_file = open_gguf_file(path)
    if is_glm_gguf(gguf_file):  # ChatGLM3 / GLM-4: their own tokenizer classes and chat formats
        return load_glm_gguf_tokenizer(gguf_file, path.name)
    meta = {key: value for key, value in gguf_file.fields.items() if key.startswith("tokenizer.")}
    kind = meta.get("tokenizer.ggml.model")
    if kind not in GGUF_BUILDERS:
        raise ValueError(
            f"{path.name}: tokenizer.ggml.model={kind!r} is not supported (supported: {sorted(GGUF_BUILDERS)})"
        )
    backend = GGUF_BUILDERS[kind](meta)
    _add_gguf_added_tokens(backend, meta)
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    # llama.cpp's defaults when the file does not say: BOS for SentencePiece vocabularies only.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos_id is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos_id is not None
    end_of_turn_keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        prefix_ids=[bos_id] if add_bos else [],
        suffix_ids=[eos_id] if add_eos else [],
        extra_stop_ids=[meta[key] for key in end_of_turn_keys if key in meta],
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, meta: dict) -> None:
    """Control and unknown tokens become special tokens, user-defined ones (like `<think>`) plain
    added tokens: llama.cpp matches both whole, so they must never be cut by BPE."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or ()
    special_types = (TokenType.CONTROL, TokenType.UNKNOWN)
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t in special_types
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == TokenType.USER_DEFINED
        ]
    )


def _byte_level_bpe(meta: dict) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over bytes (SmolLM2, Llama 3, Qwen2, GLM-4): the file's tokens are already
    written in the byte-to-unicode alphabet, its merges are "left right" strings."""
    pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`. Each equals the
# Split regex of the model's own tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (  # as Llama 3, but digits one by one
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX_BY_PRE = {
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe", "chatglm-bpe"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# The GPT-2 regex, which ByteLevel(use_regex=True) applies itself.
_GPT2_PRES = ("default", "gpt2", "mpt", "olmo", "jais")
# The GPT-2 regex after splitting every digit apart (`\p{N}` first): SmolLM2's tokenizer.json has
# exactly Digits(individual_digits=True) then ByteLevel.
_DIGITS_THEN_GPT2_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLIT_REGEX_BY_PRE:
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX_BY_PRE[pre]), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre in _DIGITS_THEN_GPT2_PRES:
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence(
            [digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre in _GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    known = sorted([*_SPLIT_REGEX_BY_PRE, *_GPT2_PRES, *_DIGITS_THEN_GPT2_PRES])
    raise ValueError(f"GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported (supported: {known})")


def _sentencepiece_bpe(meta: dict) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 2, Baichuan): spaces written as "▁", unknown characters as
    <0xXX> byte pieces, merges from the file or ranked by the pieces' scores."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()] or _merges_from_scores(
        meta
    )
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    # llama.cpp puts one space before the text and after every special token; a normalizer runs
    # on each stretch of text between added tokens, so it does the same.
    has_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    prepend = [normalizers.Prepend("▁")] if has_prefix else []
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if has_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return backend


def _merges_from_scores(meta: dict) -> list[tuple[str, str]]:
    """SentencePiece BPE joins the pair whose result scores highest. As BPE merge ranks: every
    split of a normal piece into two normal pieces, best score first (ties: longer left part)."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    # Control and byte pieces stay out, so no merge can build "<s>" out of typed text.
    pieces = {token: i for i, token in enumerate(tokens) if types[i] == TokenType.NORMAL}
    ranked = [
        (-scores[index], -cut, pieces[token[:cut]], pieces[token[cut:]])
        for token, index in pieces.items()
        for cut in range(1, len(token))
        if token[:cut] in pieces and token[cut:] in pieces
    ]
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


# `tokenizer.ggml.model` -> builder of the backend for that vocabulary type.
GGUF_BUILDERS: dict[str, Callable[[dict], tokenizers.Tokenizer]] = {
    "gpt2": _byte_level_bpe,
    "llama": _sentencepiece_bpe,
}
