import random

import pytest
import tokenizers
from tokenizers import decoders

from glmserve.tokenization import load_tokenizer
from glmserve.tokenization.detokenize import IncrementalDetokenizer
from glmserve.tokenization.hf import HFTokenizer

REAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and 3.14159 rounds to 3.14!",
    "你好，世界。今天天气很好，我们去公园散步吧。机器学习很有趣。",
    "emoji 🌍👋🏽 🇫🇷 👨‍👩‍👧 — naïve café résumé",
    "def f(x):\n    if x:\n        return x  # comment\n\n\treturn None\n",
    "Mixed 中文 and English with ｆｕｌｌｗｉｄｔｈ and 한국어 and العربية.",
]


@pytest.fixture(scope="module")
def tok(bundled_gguf):
    return load_tokenizer(bundled_gguf)


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return tok.apply_chat_template([{"role": "user", "content": "Say something."}])


def stream(detok, ids, chunk_sizes):
    """Feed ids in the given chunk sizes; return the deltas, flush included."""
    deltas, start = [], 0
    for size in chunk_sizes:
        deltas.append(detok.add(ids[start : start + size]))
        start += size
    return [*deltas, detok.add(ids[start:]), detok.flush()]


def test_multibyte_characters_are_never_split(tok, prompt_ids):
    ids = tok.encode("你好 🌍👋🏽")
    # The test only means something if some tokens hold part of a character.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = stream(detok, ids, [1] * len(ids))
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == detok.text == "你好 🌍👋🏽"


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_deltas_join_to_the_full_decode(tok, prompt_ids, text):
    ids = tok.encode(text)
    rng = random.Random(0)
    for _ in range(5):
        chunk_sizes = [rng.randint(1, 4) for _ in range(len(ids) // 2)]
        deltas = stream(IncrementalDetokenizer(tok, prompt_ids), ids, chunk_sizes)
        assert "".join(deltas) == tok.decode(ids) == text


def test_random_token_streams_match_decode(tok, prompt_ids):
    # Arbitrary ids, even ones that never form valid UTF-8: text must still equal decode(all).
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
        deltas = stream(IncrementalDetokenizer(tok, prompt_ids), ids, [1] * len(ids))
        assert "".join(deltas) == tok.decode(ids)


def test_sentencepiece_keeps_leading_spaces_and_byte_pieces():
    # Llama-2 style decoding: "▁" is a space, <0xXX> pieces are bytes, one leading space is stripped.
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "<0xE4>": 4, "<0xBD>": 5, "<0xA0>": 6}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spm = HFTokenizer(backend)
    detok = IncrementalDetokenizer(spm, prompt_token_ids=[1])
    # The prompt is context: " world" keeps the space a decode of the output alone would strip.
    assert [detok.add([i]) for i in (2, 4, 5, 6, 3)] == [" world", "", "", "你", "!"]
    assert spm.decode([1, 2, 4, 5, 6, 3]) == "Hello" + detok.text


def test_special_tokens_skipped_or_kept(tok, prompt_ids):
    ids = [*tok.encode("Hi there"), tok.eos_token_id]
    assert "".join(stream(IncrementalDetokenizer(tok, prompt_ids), ids, [1, 1])) == "Hi there"
    kept = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=False)
    assert "".join(stream(kept, ids, [1, 1])) == "Hi there<|im_end|>"


def test_stop_string_across_tokens_is_never_streamed(tok, prompt_ids):
    text = "The answer is <END of it> and <END> then more"
    ids = tok.encode(text)
    assert "<END>" not in [tok.decode([i]) for i in ids]  # "<END>" spans several tokens
    expected = "The answer is <END of it> and "  # "<END" was held back, then released
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["<END>"])
    emitted = ""
    for i in ids:
        emitted += detok.add([i])
        assert expected.startswith(emitted)  # never a piece of the real stop string
    assert detok.flush() == ""
    assert emitted == detok.text == expected
    assert (detok.is_stopped, detok.stop_reason) == (True, "<END>")
    assert detok.add(tok.encode(" more")) == ""


def test_partial_stop_is_released_when_it_does_not_complete(tok, prompt_ids):
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[" world peace"])
    assert "".join(detok.add([i]) for i in tok.encode("hello world")) == "hello"
    assert detok.flush() == " world"
    assert not detok.is_stopped and detok.stop_reason is None


def test_include_stop_string_and_earliest_stop_wins(tok, prompt_ids):
    ids = tok.encode("one two three four")
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["four", "two"], include_stop_str_in_output=True)
    assert "".join(stream(detok, ids, [2, 1])) == "one two"
    assert detok.stop_reason == "two"


def test_stop_found_in_text_held_until_flush(tok, prompt_ids):
    # The stop string can arrive in the same step as the text before it.
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["\n\n"])
    assert detok.add(tok.encode("first paragraph\n\nsecond")) == "first paragraph"
    assert detok.is_stopped and detok.flush() == ""


def test_each_step_decodes_a_short_window(tok, prompt_ids):
    """O(new tokens) per step: the decoded windows stay short however long the output grows."""
    windows = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(REAL_TEXTS) * 4)
    assert len(ids) > 500
    stream(IncrementalDetokenizer(Spy(), prompt_ids), ids, [1] * len(ids))
    assert max(windows) <= 12
