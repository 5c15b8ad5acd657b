"""ChatGLM2/3 (SentencePiece) and GLM-4 (tiktoken) tokenizers, read from a model folder's own files
with no remote code, implementing the `Tokenizer` protocol (tokenization/base.py).

    tok = load_glm_tokenizer(folder)   # tokenizer_config.json names ChatGLMTokenizer / ChatGLM4Tokenizer
    tok.encode("你好")                  # [gMASK] sop + ids, as THUDM's tokenizers do
    tok.apply_chat_template(messages)  # ids by chat/chatglm.py (ChatGLM2/3) or chat/glm4.py (GLM-4)

Both vocabularies number their special tokens right after the ordinary ones (ChatGLM2/3:
[MASK]=64789 ... <|observation|>=64797 after 64789 pieces; GLM-4: <|endoftext|>=151329 ... after
151329 ranks). Text is always encoded as text: special tokens come only from the chat format, or
from a raw prompt with parse_special=True. Ids past the vocabulary (the embedding is padded to
65024 / 151552 rows) decode to "".
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from glmserve.chat.chatglm import CHATGLM3_STOP_TOKENS, chatglm2_prompt, chatglm3_prompt
from glmserve.chat.glm4 import GLM4_STOP_TOKENS, glm4_prompt
from glmserve.chat.template import special_pattern
from glmserve.model_path import read_json
from glmserve.tokenization.base import CodeChatFormat, encode_with_specials

CHATGLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")  # ChatGLM2; ChatGLM3 adds the roles
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", *ROLE_TOKENS,
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
# THUDM's split regex (tokenization_chatglm.py of glm-4-9b-chat), the same as Llama 3's.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GLMTokenizer(CodeChatFormat):
    """The shared half: special tokens numbered after `num_ordinary` ordinary tokens, the
    `[gMASK] sop` prefix, stop ids and the chat format (code: chat/chatglm.py, chat/glm4.py).
    Subclasses encode and decode text."""

    def __init__(
        self,
        num_ordinary: int,
        special_ids: dict[str, int],
        prefix: Sequence[str],
        eos_token_id: int,
        stop_tokens: Sequence[str],
        chat_format,
    ):
        self.num_ordinary = num_ordinary
        self.special_ids = special_ids
        self.special_tokens = {i: token for token, i in special_ids.items()}
        self._special_pattern = special_pattern(special_ids)
        self._prefix_ids = [special_ids[token] for token in prefix]
        self.bos_token_id: int | None = None
        self.eos_token_id = eos_token_id
        self.stop_token_ids = (eos_token_id, *(special_ids[t] for t in stop_tokens))
        self._chat_format = chat_format  # (messages, tools, add_generation_prompt) -> ids after the prefix

    @property
    def vocab_size(self) -> int:
        return self.num_ordinary + len(self.special_ids)

    @property
    def all_special_ids(self) -> set[int]:
        return set(self.special_tokens) | {self.eos_token_id}

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """Ids of `text` (special-token strings in it stay text unless parse_special), after the
        `[gMASK] sop` prefix when add_special_tokens."""
        if parse_special:
            ids = encode_with_specials(text, self._special_pattern, self.special_ids, lambda t, _: self.encode_text(t))
        else:
            ids = self.encode_text(text)
        return self._prefix_ids + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Runs of ordinary ids are decoded together (so multi-token characters come out whole)."""
        text, run = "", []
        for i in ids:
            if 0 <= i < self.num_ordinary:
                run.append(i)
                continue
            text, run = text + self.decode_ordinary(run), []
            if i in self.special_tokens and not skip_special_tokens:
                text += self.special_tokens[i]
        return text + self.decode_ordinary(run)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.special_tokens.get(i) or self.ordinary_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        tools: list | None = None,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> list[int]:
        """Prompt ids for a conversation: special tokens by id only, message text as text."""
        return self._prefix_ids + self._chat_format(messages, tools, add_generation_prompt)

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_ordinary(self, ids: list[int]) -> str:
        raise NotImplementedError

    def ordinary_token(self, token_id: int) -> str:
        raise NotImplementedError


class ChatGLMTokenizer(GLMTokenizer):
    """ChatGLM2-6B / ChatGLM3-6B: SentencePiece (tokenizer.model, or the serialized model as bytes),
    ids 0..64788; eos 2."""

    def __init__(self, model: Path | bytes, is_chatglm2: bool):
        import sentencepiece  # a dependency of ChatGLM2/3 support only

        source = {"model_proto": model} if isinstance(model, bytes) else {"model_file": str(model)}
        self.sp = sentencepiece.SentencePieceProcessor(**source)
        n = self.sp.vocab_size()
        names = CHATGLM_SPECIALS if is_chatglm2 else CHATGLM_SPECIALS + ROLE_TOKENS
        special_ids = {token: n + i for i, token in enumerate(names)}
        encode = self.encode_text
        if is_chatglm2:
            chat_format = partial(_chatglm2_format, encode=encode)
        else:
            chat_format = partial(chatglm3_prompt, encode=encode, special_ids=special_ids)
        stops = () if is_chatglm2 else CHATGLM3_STOP_TOKENS
        super().__init__(n, special_ids, ("[gMASK]", "sop"), self.sp.eos_id(), stops, chat_format)
        self.bos_token_id = self.sp.bos_id()

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode_ordinary(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if ids else ""

    def ordinary_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.num_ordinary else ""


def _chatglm2_format(messages, tools, add_generation_prompt, *, encode) -> list[int]:
    return chatglm2_prompt(messages, tools, encode)  # every round ends in "答：" already


class GLM4Tokenizer(GLMTokenizer):
    """GLM-4-9B: byte-level BPE with tiktoken over the ranks of tokenizer.model ({token bytes: id})."""

    def __init__(self, ranks: dict[bytes, int], special_ids: dict[str, int]):
        import tiktoken  # a dependency of GLM-4 support only

        self.bpe = tiktoken.Encoding(
            name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        self._token_bytes = {rank: token for token, rank in ranks.items()}
        encode = self.encode_text
        chat_format = partial(glm4_prompt, encode=encode, special_ids=special_ids)
        eos = special_ids["<|endoftext|>"]
        super().__init__(len(ranks), special_ids, ("[gMASK]", "<sop>"), eos, GLM4_STOP_TOKENS, chat_format)

    def encode_text(self, text: str) -> list[int]:
        return self.bpe.encode(text, disallowed_special=()) if text else []

    def decode_ordinary(self, ids: list[int]) -> str:
        return self.bpe.decode(ids, errors="replace") if ids else ""

    def ordinary_token(self, token_id: int) -> str:
        return self._token_bytes.get(token_id, b"").decode("utf-8", errors="replace")

    def ranks(self) -> dict[bytes, int]:
        """{token bytes: id} of the ordinary tokens (tiktoken's mergeable ranks)."""
        return {token: rank for rank, token in self._token_bytes.items()}


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's file format: one `base64(token bytes) rank` per line."""
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# ---------------------------------------------------------------- folders


def glm_tokenizer_class(folder: Path) -> str | None:
    """THUDM's tokenizer class named by the folder's tokenizer_config.json, if it is one of ours."""
    config = read_json(folder / "tokenizer_config.json")
    name = config.get("tokenizer_class")
    return (
        name
        if name in ("ChatGLMTokenizer", "ChatGLM4Tokenizer") and (folder / "tokenizer.model").is_file()
        else None
    )


def is_glm_tokenizer_folder(folder: Path) -> bool:
    """tokenizer.model + a tokenizer_config.json naming ChatGLMTokenizer or ChatGLM4Tokenizer"""
    return glm_tokenizer_class(folder) is not None


def load_glm_tokenizer(folder: Path) -> GLMTokenizer:
    folder = Path(folder)
    name = glm_tokenizer_class(folder)
    if name is None:
        raise ValueError(f"{folder} has no ChatGLM tokenizer (tokenizer.model + tokenizer_config.json)")
    model_file = folder / "tokenizer.model"
    if name == "ChatGLM4Tokenizer":
        return GLM4Tokenizer(_read_tiktoken_ranks(model_file), _glm4_special_ids(folder))
    return ChatGLMTokenizer(model_file, is_chatglm2=_is_chatglm2(folder))


def _glm4_special_ids(folder: Path) -> dict[str, int]:
    """From tokenizer_config.json's added_tokens_decoder; else THUDM's list after the 151329 ranks."""
    added = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    special_ids = {entry["content"]: int(i) for i, entry in added.items() if entry.get("special")}
    return special_ids or {token: 151329 + i for i, token in enumerate(GLM4_SPECIALS)}


def _is_chatglm2(folder: Path) -> bool:
    """ChatGLM2-6B and ChatGLM3-6B share tokenizer.model and tokenizer_config.json but for the
    repository name they were saved from; the chat formats differ (rounds vs role tokens)."""
    names = (
        read_json(folder / "tokenizer_config.json").get("name_or_path", ""),
        read_json(folder / "config.json").get("_name_or_path", ""),
    )
    return any("chatglm2" in str(name).lower() for name in names)

