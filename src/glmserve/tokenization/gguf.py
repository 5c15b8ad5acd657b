"""Tokenizers rebuilt from a GGUF file's vocabulary, merges and token types into a Hugging Face
`tokenizers.Tokenizer`, with the pre-tokenizer llama.cpp uses for its `tokenizer.ggml.pre`. ChatGLM3 /
GLM-4 (`chatglm`) files have their own classes (tokenization/glm_gguf.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tokenizers
from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from glmserve.gguf_file import open_gguf_file
from glmserve.tokenization.base import Tokenizer
from glmserve.tokenization.glm_gguf import is_glm_gguf, load_glm_gguf_tokenizer
from glmserve.tokenization.hf import HFTokenizer


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
    return HFTokenizer(
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

