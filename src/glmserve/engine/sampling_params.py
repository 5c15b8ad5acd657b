"""SamplingParams: how one request is decoded (vLLM's names, so users know them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

MAX_LOGPROBS = 20
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or grammar longer than this is refused
# JSON as models are trained to write it (Python's json.dumps: ", " and ": "), with no free
# whitespace (a small model given free whitespace can pad forever). llguidance's JSON options,
# applied before a schema's own "x-guidance" ones.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputsParams:
    """What the output must match, exactly one of (vLLM's StructuredOutputsParams / older
    GuidedDecodingParams): a JSON schema, any JSON object, a regex, one of some strings, or a
    grammar (GBNF / EBNF as llama.cpp writes it, or llguidance's Lark). Enforced while decoding:
    each step only tokens that keep the output inside the grammar can be drawn."""

    json: str | dict | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        chosen = self._given()
        if len(chosen) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, regex, choice, grammar, json_object"
                + (f"; got {', '.join(chosen)}" if chosen else "")
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as error:
                raise ValueError(f"the JSON schema is not valid JSON: {error}") from None
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError("a JSON schema must be an object")
        size = len(self.key)
        if size > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the {self.kind} is too large ({size} characters; at most {MAX_GRAMMAR_CHARS})")

    @classmethod
    def of(cls, value: Any) -> StructuredOutputsParams | None:
        """From a StructuredOutputsParams, a dict of its fields, or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown structured output fields: {', '.join(sorted(unknown))}")
            return cls(**value)
        raise ValueError(f"structured outputs must be a dict or StructuredOutputsParams, not {type(value).__name__}")

    def _given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]

    @property
    def kind(self) -> str:
        return self._given()[0]

    @property
    def key(self) -> str:
        """The kind and its text: what compiled grammars are cached by."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
        return f"{self.kind}:{text}"


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy and deterministic
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (CTRL paper)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 256  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token (plus the actual one)
    skip_special_tokens: bool = True
    n: int = 1
    # The output must match a JSON schema, regex, choice or grammar (engine/structured_output.py).
    structured_outputs: StructuredOutputsParams | dict | None = None
    guided_decoding: StructuredOutputsParams | dict | None = None  # vLLM's older name for the same

    def __post_init__(self) -> None:
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding, not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for values outside their range."""
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (self.n >= 1, "n must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
