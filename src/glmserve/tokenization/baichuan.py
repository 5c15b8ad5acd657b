"""Baichuan-13B and Baichuan2 tokenizers (SentencePiece, the folder's tokenizer.model) with no remote
code, implementing the `Tokenizer` protocol (tokenization/base.py).

    tok = load_baichuan_tokenizer(folder)   # tokenizer_config.json names BaichuanTokenizer
    tok.encode("你好")                       # no BOS: add_bos_token is false in all three releases
    tok.apply_chat_template(messages)       # ids by chat/baichuan.py

The role ids 195 / 196 are user-defined pieces (`<reserved_106>` / `<reserved_107>` in Baichuan2,
`<reserved_102>` / `<reserved_103>` in Baichuan-13B), which SentencePiece would match in any text.
Here text never yields them: each occurrence of their text is cut after its first character and
the rest encoded as a continuation, so it comes out as ordinary pieces. The dummy prefix ("▁" before
a text) is the model file's own setting: Baichuan-13B's adds it, Baichuan2's does not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from glmserve.chat.baichuan import ASSISTANT_TOKEN_ID, BAICHUAN_STOP_IDS, USER_TOKEN_ID, baichuan_prompt
from glmserve.tokenization.base import CodeChatFormat, encode_with_specials

# Only one piece holds a newline, so a leading "\n" never merges with what follows it.
CONTINUATION_SENTINEL = "\n"


class BaichuanTokenizer(CodeChatFormat):
    """The chat format is code (chat/baichuan.py), with an input budget that drops old rounds."""

    supports_input_budget = True

    def __init__(self, model_file: Path):
        import sentencepiece  # a dependency of ChatGLM2/3 and Baichuan support only

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.role_ids = (USER_TOKEN_ID, ASSISTANT_TOKEN_ID)
        self.stop_token_ids = BAICHUAN_STOP_IDS
        role_texts = sorted({self.sp.id_to_piece(i) for i in self.role_ids}, key=len, reverse=True)
        self._role_pattern = re.compile("|".join(re.escape(t) for t in role_texts))
        self._num_sentinel_ids = len(self.sp.encode(CONTINUATION_SENTINEL))
        self.special_ids = {
            self.sp.id_to_piece(i): i for i in (*self.role_ids, self.bos_token_id, self.eos_token_id)
        }
        self._special_pattern = re.compile("|".join(re.escape(t) for t in self.special_ids))

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def all_special_ids(self) -> set[int]:
        return set(self.special_ids.values()) | {self.sp.unk_id()}

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """Ids of `text`; role, BOS and EOS strings in it stay text unless parse_special. No BOS is
        added (the releases' add_bos_token is false), so add_special_tokens changes nothing."""
        if not parse_special:
            return self.encode_text(text)
        return encode_with_specials(text, self._special_pattern, self.special_ids, self._encode_piece)

    def encode_text(self, text: str) -> list[int]:
        """Plain text: never a role id. Chunks end one character into each role text."""
        cuts = [found.start() + 1 for found in self._role_pattern.finditer(text)]
        chunks = pairwise([0, *cuts, len(text)])
        return [i for n, (a, b) in enumerate(chunks) for i in self._encode_piece(text[a:b], n == 0)]

    def _encode_piece(self, text: str, is_start: bool) -> list[int]:
        if not text:
            return []
        if is_start:
            return self.sp.encode(text)
        # Mid-text: no dummy prefix, as if the text went on from the sentinel.
        return self.sp.encode(CONTINUATION_SENTINEL + text)[self._num_sentinel_ids :]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Runs of ordinary ids are decoded together, so multi-piece characters come out whole."""
        text, run = "", []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                continue  # past the vocabulary (a padded embedding)
            if i not in self.all_special_ids:
                run.append(i)
                continue
            text, run = text + self._decode_run(run), []
            if not skip_special_tokens:
                text += self.sp.id_to_piece(i)
        return text + self._decode_run(run)

    def _decode_run(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if ids else ""

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else "" for i in ids]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        tools: list | None = None,
        add_generation_prompt: bool = True,
        max_input_tokens: int | None = None,
        **kwargs,
    ) -> list[int]:
        """Prompt ids (chat/baichuan.py). `max_input_tokens` (context - max_new_tokens) drops the
        oldest whole rounds that do not fit. Baichuan's chat models have no tool format."""
        if tools:
            raise ValueError(
                "Baichuan chat models have no tool-calling format; send the request without tools"
            )
        return baichuan_prompt(messages, self.encode_text, add_generation_prompt, max_input_tokens)


def is_baichuan_tokenizer_folder(folder: Path) -> bool:
    """tokenizer.model + a tokenizer_config.json naming BaichuanTokenizer"""
    file = folder / "tokenizer_config.json"
    if not (file.is_file() and (folder / "tokenizer.model").is_file()):
        return False
    return json.loads(file.read_text(encoding="utf-8")).get("tokenizer_class") == "BaichuanTokenizer"


def load_baichuan_tokenizer(folder: Path) -> BaichuanTokenizer:
    folder = Path(folder)
    if not is_baichuan_tokenizer_folder(folder):
        raise ValueError(f"{folder} has no Baichuan tokenizer (tokenizer.model + tokenizer_config.json)")
    return BaichuanTokenizer(folder / "tokenizer.model")
