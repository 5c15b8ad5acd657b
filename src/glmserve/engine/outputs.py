"""What the engine gives back: vLLM-shaped final outputs and incremental stream outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: {token_id: logprob}, holding the chosen token and the top-k.
PositionLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # None for the first prompt token (nothing predicts it), then {token_id: logprob} per position.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0


@dataclass
class StreamOutput:
    """What one engine step produced for one request: the new tokens and text since the last one."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[PositionLogprobs] | None = None  # one entry per new token, if requested
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # once, with the first tokens
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
