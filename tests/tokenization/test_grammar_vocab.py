"""Each tokenizer family as llguidance sees it: the model's own tokenization of a text is accepted by a
grammar for that text, special tokens never appear inside grammar text, every stop id may end it."""

import pytest
from llguidance import LLMatcher

from glmserve.devtools import PRESETS_DIR
from glmserve.engine.structured_output import allowed_tokens, fill_bitmasks
from glmserve.tokenization import load_tokenizer
from glmserve.tokenization.grammar_vocab import grammar_tokenizer

TEXT = 'Hello, 世界! {"city": "北京"}\n  indented\tline é ü 😀'
FAMILIES = {  # tokenizer -> the model's vocabulary (embeddings padded past the tokenizer)
    "chatglm3": 65024,  # SentencePiece
    "glm4": 151552,  # tiktoken
    "baichuan2-7b": 125696,  # SentencePiece
}


@pytest.fixture(params=[*FAMILIES, "bundled"])
def family(request, bundled_gguf):
    if request.param == "bundled":  # a GGUF vocabulary rebuilt as a Hugging Face tokenizer
        tokenizer = load_tokenizer(bundled_gguf)
        return tokenizer, tokenizer.vocab_size
    return load_tokenizer(PRESETS_DIR / request.param), FAMILIES[request.param]


def test_the_models_tokens_spell_grammar_text(family):
    tokenizer, vocab_size = family
    ll = grammar_tokenizer(tokenizer, vocab_size, tokenizer.stop_token_ids)
    assert ll.vocab_size == vocab_size
    # SentencePiece starts a text with a space (its dummy prefix)
    matcher = LLMatcher(ll, LLMatcher.grammar_from_lark(f'start: " "? {_lark_string(TEXT)}'), log_level=0)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert all(matcher.consume_token(i) for i in ids), matcher.get_error()
    assert matcher.is_accepting()
    allowed = allowed_tokens(fill_bitmasks([matcher], vocab_size), vocab_size)[0]
    assert sorted(allowed.nonzero().flatten().tolist()) == sorted(set(tokenizer.stop_token_ids))


def test_special_tokens_are_not_text(family):
    tokenizer, vocab_size = family
    ll = grammar_tokenizer(tokenizer, vocab_size, tokenizer.stop_token_ids)
    matcher = LLMatcher(ll, LLMatcher.grammar_from_regex(r"(?s:.{1,50})"), log_level=0)
    allowed = allowed_tokens(fill_bitmasks([matcher], vocab_size), vocab_size)[0]
    assert not any(allowed[i] for i in tokenizer.all_special_ids if i < vocab_size)
    assert not allowed[tokenizer.vocab_size :].any()  # padding rows of the embedding
    assert allowed.sum() > 0.9 * tokenizer.vocab_size - len(tokenizer.all_special_ids)


def test_a_tokenizer_larger_than_the_model_is_refused(family):
    tokenizer, _ = family
    with pytest.raises(ValueError, match="exceed"):
        grammar_tokenizer(tokenizer, tokenizer.vocab_size - 1, tokenizer.stop_token_ids)


def _lark_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)
