"""Request models of both APIs. Each validates types (422 naming the field) and turns itself into
SamplingParams options; value ranges are checked once, by SamplingParams (400 naming the field).

Field names follow OpenAI, plus vLLM's extras (top_k, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, ...) so clients written for vLLM work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from glmserve.engine.sampling_params import StructuredOutputsParams
from glmserve.serving.errors import InvalidRequest
from glmserve.serving.structured_outputs import GUIDED_FIELDS, structured_outputs_of


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and completions requests. Unknown fields are ignored, as OpenAI's
    newer client fields must not break older servers."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the first served model
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None  # None: the model's default
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output (serving/structured_outputs.py): OpenAI's, and vLLM's two spellings
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: there is one backend
    structured_outputs: dict[str, Any] | None = None

    def structured(self) -> StructuredOutputsParams | None:
        guided = {name: getattr(self, name) for name in GUIDED_FIELDS}
        return structured_outputs_of(self.response_format, guided, self.structured_outputs)

    def sampling_options(self) -> dict[str, Any]:
        return {
            "structured_outputs": self.structured(),
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "seed": self.seed,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id, ... go to the template

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins if both
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")

    def message_dicts(self) -> list[dict[str, Any]]:
        return [message.model_dump(exclude_none=True) for message in self.messages]

    def sampling_options(self) -> dict[str, Any]:
        return {
            **super().sampling_options(),
            "max_tokens": self.max_tokens
            if self.max_completion_tokens is None
            else self.max_completion_tokens,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
        }


TokenIds = list[int]


class CompletionRequest(SamplingFields):
    # A text, a batch of texts, token ids, or a batch of token id lists.
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of other than n is not supported", param="best_of")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo together with logprobs is not supported", param="echo")
        if not self.prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")

    def prompt_list(self) -> list[str | TokenIds]:
        """The batch of prompts: each a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def sampling_options(self) -> dict[str, Any]:
        return {**super().sampling_options(), "max_tokens": self.max_tokens, "logprobs": self.logprobs}


# -- the classic ChatGLM API --------------------------------------------------------------------


def _blank_is_default(value: Any) -> Any:
    """The seed's client sends "" for 'use the default'; numeric strings pass on to the number parser."""
    return None if isinstance(value, str) and not value.strip() else value


Number = Annotated[float | None, BeforeValidator(_blank_is_default)]
Integer = Annotated[int | None, BeforeValidator(_blank_is_default)]


class ClassicChatRequest(BaseModel):
    """ChatGLM2's api.py request, plus optional `system` and `stream`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    history: list[tuple[str, str]] | None = None  # [[query, answer], ...]
    max_length: Integer = None  # prompt plus answer tokens
    top_p: Number = None
    temperature: Number = None
    system: str | None = None
    stream: bool = False
    response_format: dict[str, Any] | None = None  # as OpenAI's (serving/structured_outputs.py)

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = []
        for query, answer in self.history or []:
            turns += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        return [*system, *turns, {"role": "user", "content": self.prompt}]

    def sampling_options(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "structured_outputs": structured_outputs_of(self.response_format),
        }
