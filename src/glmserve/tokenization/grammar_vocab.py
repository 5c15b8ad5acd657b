"""Our tokenizers as llguidance's `LLTokenizer`: every token's bytes and which ids are special, so the
grammar library can tell, for each step, which tokens keep the output inside a grammar. No torch.

    ll_tokenizer = grammar_tokenizer(tokenizer, vocab_size=model_vocab, eos_ids=[2, 64795])

- Hugging Face `tokenizers` (tokenizer.json folders and the GGUF vocabularies we rebuild): llguidance
  reads the serialized tokenizer itself (byte-level BPE and SentencePiece-style alike);
- GLM-4 (tiktoken): its ranks, special tokens and split pattern;
- ChatGLM2/3 and Baichuan (SentencePiece): each piece's bytes ("▁" is a space, `<0xAB>` one byte).
Special tokens are never allowed inside grammar text; `eos_ids` (every id that ends an answer) are
allowed once the grammar is complete. `vocab_size` is the model's (embeddings are often padded past
the tokenizer), the size of every bitmask: ids past the tokenizer are never allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SPECIAL_PREFIX = b"\xff"  # llguidance's marker for a special token's bytes: b"\xff<|user|>"


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    import llguidance

    from glmserve.tokenization.glm import GLM4_PATTERN, GLM4Tokenizer
    from glmserve.tokenization.hf import HFTokenizer

    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_size} tokens exceed the model's vocabulary of {vocab_size}")
    n_vocab = vocab_size
    eos = sorted(set(eos_ids))
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=n_vocab, eos_token=eos)
    if isinstance(tokenizer, GLM4Tokenizer):
        return llguidance.LLTokenizer.from_tiktoken(
            encoder=tokenizer.ranks(),
            special_tokens=dict(tokenizer.special_ids),
            pattern=GLM4_PATTERN,
            eos_token=eos,
            n_vocab=n_vocab,
        )
    if hasattr(tokenizer, "sp"):  # ChatGLM2/3, Baichuan
        vocab = _SentencePieceVocab(tokenizer, eos[0], n_vocab)
        vocab.ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=n_vocab, eos_token=eos)
        return vocab.ll_tokenizer
    raise ValueError(f"structured output does not support {type(tokenizer).__name__} tokenizers")


class _SentencePieceVocab:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, and a way to tokenize text
    (grammar literals). That is a greedy longest match over the token bytes, not SentencePiece's
    encode: encode adds a dummy-prefix space ("\\n" -> "▁", "\\n"), which llguidance would take as
    the bytes of the text itself."""

    def __init__(self, tokenizer: Any, eos_token_id: int, n_vocab: int):
        sp = tokenizer.sp
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [_piece_bytes(sp, i) for i in range(sp.vocab_size())]
        special = {i: f"<|padding_{i}|>" for i in range(sp.vocab_size(), n_vocab)}  # the wrapper's size is len(tokens)
        special.update({i: text for text, i in tokenizer.special_ids.items()})
        special.update({i: sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)})
        for i, text in sorted(special.items()):
            self.tokens += [b""] * (i + 1 - len(self.tokens))
            self.tokens[i] = SPECIAL_PREFIX + text.encode()
        self.special_token_ids = sorted(special)
        self.ll_tokenizer = None  # set once built; only then is __call__ used

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.ll_tokenizer.greedy_tokenize(text)


def _piece_bytes(sp: Any, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):  # "<0x0A>"
        return bytes([int(piece[3:-1], 16)])
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return SPECIAL_PREFIX + piece.encode()
    return piece.replace("\u2581", " ").encode()
