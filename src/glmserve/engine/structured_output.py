"""Constrained decoding with llguidance: grammars compiled once per schema, one matcher per sequence,
and each step's token bitmasks for the rows that have one.

llguidance rather than xgrammar: one small abi3 wheel with no dependencies (xgrammar pulls in
transformers and triton), JSON schema + regex + Lark + GBNF in one library, masks computed in Rust
off the GIL (tens of microseconds per row), and it is what vLLM's `guidance` backend and llama.cpp's
`--llguidance` use. The tokenizer side comes from our own tokenizers (tokenization/grammar_vocab.py).

    compiler = GrammarCompiler(lambda: detokenizer.grammar_tokenizer(vocab_size, stop_ids))
    matcher = compiler.matcher(StructuredOutputsParams(json=schema))   # ValueError for a bad schema
    bitmask = fill_bitmasks([matcher, ...])    # [M, ceil(V / 32)] int32, bit set = token allowed
    matcher.consume_token(sampled_id)          # after each accepted token
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from glmserve.engine.sampling_params import JSON_OPTIONS, StructuredOutputsParams

MAX_CACHED_GRAMMARS = 256


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for `params` (not yet checked: LLMatcher reports errors)."""
    from llguidance import LLMatcher, grammar_from

    if params.json is not None:
        return LLMatcher.grammar_from_json_schema(params.json, defaults=JSON_OPTIONS)
    if params.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if params.regex is not None:
        return LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
    return grammar_from("grammar", params.grammar)  # Lark as is; GBNF converted to Lark


class GrammarCompiler:
    """Compiled grammars by schema (an LRU of matchers in their start state; each sequence gets a
    copy). The tokenizer is built on first use: ~0.2-0.6 s for a 50k-150k vocabulary."""

    def __init__(self, make_tokenizer: Callable[[], Any]):
        self._make_tokenizer = make_tokenizer
        self._tokenizer = None
        self._cache: OrderedDict[str, Any] = OrderedDict()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher for `params`; ValueError naming the problem if it does not compile."""
        from llguidance import LLMatcher

        key = params.key
        template = self._cache.get(key)
        if template is None:
            try:
                grammar = grammar_text(params)
            except (ValueError, TypeError) as error:
                raise ValueError(f"invalid {params.kind}: {error}") from None
            template = LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"invalid {params.kind}: {_first_line(template.get_error())}")
            self._cache[key] = template
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return template.deep_copy()


def fill_bitmasks(matchers: Sequence[Any], vocab_size: int) -> torch.Tensor:
    """[M, ceil(V / 32)] int32 on CPU (V: the model's vocabulary, which the grammar tokenizer is sized
    to): bit j of word w set when token 32 w + j may come next. Rows are filled in parallel by
    llguidance's thread pool, off the GIL."""
    from llguidance.torch import fill_next_token_bitmask_par

    bitmask = torch.empty(len(matchers), (vocab_size + 31) // 32, dtype=torch.int32)
    fill_next_token_bitmask_par(_executor(), [(m, i) for i, m in enumerate(matchers)], bitmask)
    return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[M, W] int32 bitmask -> [M, V] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [M, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


_EXECUTOR = None


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        from llguidance import LLExecutor

        _EXECUTOR = LLExecutor()
    return _EXECUTOR


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "the grammar does not compile"
