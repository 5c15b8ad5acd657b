"""ChatGLM3 and GLM-4 tokenizers rebuilt from the vocabulary of a llama.cpp `chatglm` GGUF file, giving
the same ids as the folder tokenizers of glm_tokenizers.py (and the same chat formats).

What llama.cpp's convert_hf_to_gguf.py (`ChatGLMModel`) writes, one token per embedding row:
- ChatGLM3-6B: tokenizer.ggml.model "llama" (pre "chatglm-spm"). Ids 0..64788 are the SentencePiece
  pieces with their scores and types (ids 0, 1, 2 renamed <unk>, <bos>, <eos>); then [MASK], [gMASK],
  [sMASK], sop, eop and the four role tokens as CONTROL tokens; then `[PAD{id}]` (UNUSED) up to 65024.
- GLM-4-9B: tokenizer.ggml.model "gpt2" (pre "chatglm-bpe"). Ids 0..151328 are tiktoken's ranks in
  order, each token's bytes written in GPT-2's byte-to-unicode alphabet; then <|endoftext|> ... as
  CONTROL tokens; then `[PAD{id}]`. Its merges are not read: tiktoken's BPE follows from the ranks.

Rebuilt here: a SentencePiece model (the pieces, scores and types are all its BPE encoder reads; the
normalizer settings are ChatGLM3's, which are llama.cpp's defaults for such vocabularies) and a
tiktoken rank table, handed to the same tokenizer classes as the folders' files.
"""

from __future__ import annotations

import struct

from gguf import TokenType

from glmserve.gguf_file import GGUFFile
from glmserve.tokenization.glm import (
    CHATGLM_SPECIALS,
    GLM4_SPECIALS,
    ROLE_TOKENS,
    ChatGLMTokenizer,
    GLM4Tokenizer,
    GLMTokenizer,
)

GGUF_ARCH = "chatglm"  # llama.cpp's name for ChatGLM3-6B and GLM-4-9B(-Chat)
GLM4_PRE_TOKENIZERS = ("chatglm-bpe",)  # llama.cpp's name for THUDM's split regex (GLM4_PATTERN)


def is_glm_gguf(gguf_file: GGUFFile) -> bool:
    return gguf_file.fields.get("general.architecture") == GGUF_ARCH


def load_glm_gguf_tokenizer(gguf_file: GGUFFile, name: str) -> GLMTokenizer:
    meta = {key: value for key, value in gguf_file.fields.items() if key.startswith("tokenizer.ggml.")}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        if key not in meta:
            raise ValueError(f"{name}: chatglm GGUF has no {key!r}, so its tokenizer cannot be rebuilt")
    kind = meta["tokenizer.ggml.model"]
    if kind == "llama":
        return chatglm3_tokenizer(meta, name)
    if kind == "gpt2":
        return glm4_tokenizer(meta, name)
    raise ValueError(
        f"{name}: chatglm GGUF with tokenizer.ggml.model={kind!r}; expected 'llama' (ChatGLM3) or 'gpt2' (GLM-4)"
    )


# ---------------------------------------------------------------- ChatGLM3: SentencePiece


def chatglm3_tokenizer(meta: dict, name: str) -> ChatGLMTokenizer:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    specials = CHATGLM_SPECIALS + ROLE_TOKENS
    num_pieces = _first_special(tokens, specials, name)
    if "tokenizer.ggml.scores" not in meta or "tokenizer.ggml.eos_token_id" not in meta:
        raise ValueError(f"{name}: ChatGLM3 GGUF lacks tokenizer.ggml.scores or tokenizer.ggml.eos_token_id")
    scores = meta["tokenizer.ggml.scores"]
    proto = sentencepiece_model_proto(
        list(zip(tokens[:num_pieces], scores, types, strict=False)),
        eos_piece=tokens[meta["tokenizer.ggml.eos_token_id"]],
        # ChatGLM3's config.json has no bos_token_id, so neither has its GGUF; id 1 is the converter's <bos>.
        bos_piece=tokens[meta.get("tokenizer.ggml.bos_token_id", 1)],
        add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
        remove_extra_whitespaces=meta.get("tokenizer.ggml.remove_extra_whitespaces", False),
    )
    return ChatGLMTokenizer(proto, is_chatglm2=False)


def sentencepiece_model_proto(
    pieces: list[tuple[str, float, int]],
    eos_piece: str,
    bos_piece: str,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
) -> bytes:
    """A serialized sentencepiece ModelProto (sentencepiece_model.proto) of a BPE model: pieces
    (text, score, type; gguf's TokenType numbers are SentencePiece's), byte fallback when there
    are byte pieces, identity normalization with escaped whitespace. Written by hand so that no
    protobuf package is needed; field numbers are the .proto file's."""
    unk_piece = next((text for text, _, kind in pieces if kind == TokenType.UNKNOWN), None)
    if unk_piece is None:
        raise ValueError("SentencePiece vocabulary has no UNKNOWN piece")
    has_bytes = any(kind == TokenType.BYTE for _, _, kind in pieces)
    trainer_spec = b"".join([
        _varint_field(3, 2),  # model_type: BPE
        _varint_field(4, len(pieces)),  # vocab_size
        _varint_field(35, int(has_bytes)),  # byte_fallback
        _bytes_field(45, unk_piece.encode()),
        _bytes_field(46, bos_piece.encode()),
        _bytes_field(47, eos_piece.encode()),
    ])  # fmt: skip
    normalizer_spec = b"".join([
        _bytes_field(1, b"identity"),  # name
        _varint_field(3, int(add_dummy_prefix)),
        _varint_field(4, int(remove_extra_whitespaces)),
        _varint_field(5, 1),  # escape_whitespaces: " " -> "▁"
    ])  # fmt: skip
    encoded_pieces = [
        _bytes_field(1, _bytes_field(1, text.encode()) + _float_field(2, score) + _varint_field(3, int(kind)))
        for text, score, kind in pieces
    ]
    return b"".join([*encoded_pieces, _bytes_field(2, trainer_spec), _bytes_field(3, normalizer_spec)])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)  # wire type 0


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value  # wire type 2: length-delimited


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)  # wire type 5: 32-bit


# ---------------------------------------------------------------- GLM-4: tiktoken


def glm4_tokenizer(meta: dict, name: str) -> GLM4Tokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in GLM4_PRE_TOKENIZERS:
        raise ValueError(f"{name}: chatglm GGUF with tokenizer.ggml.pre={pre!r}; GLM-4's is 'chatglm-bpe'")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    num_ranks = _first_special(tokens, GLM4_SPECIALS, name)
    if any(kind != TokenType.NORMAL for kind in types[:num_ranks]):
        raise ValueError(f"{name}: GLM-4 GGUF has non-NORMAL tokens before <|endoftext|>")
    decoder = _unicode_to_byte()
    try:
        ranks = {
            bytes(decoder[char] for char in token): rank for rank, token in enumerate(tokens[:num_ranks])
        }
    except KeyError as error:
        raise ValueError(f"{name}: GLM-4 GGUF token with {error} outside GPT-2's byte alphabet") from None
    special_ids = {tokens[i]: i for i in range(num_ranks, len(tokens)) if types[i] == TokenType.CONTROL}
    return GLM4Tokenizer(ranks, special_ids)


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68
    are moved to U+0100 onwards in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _first_special(tokens: list[str], specials: tuple[str, ...], name: str) -> int:
    """Id of the first special token; the family's specials must follow it in their fixed order."""
    try:
        first = tokens.index(specials[0])
    except ValueError:
        first = -1
    if first < 0 or tuple(tokens[first : first + len(specials)]) != specials:
        raise ValueError(
            f"{name}: chatglm GGUF vocabulary lacks the special tokens {', '.join(specials)} in that order "
            "(as convert_hf_to_gguf.py writes them for ChatGLM3-6B / GLM-4-9B)"
        )
    return first
