"""What the engine gives back: vLLM-shaped final outputs and incremental stream outputs, and the
one way a stream is accumulated into them (used by LLM and the server alike)."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: {token_id: logprob}, holding the chosen token and the top-k.
PositionLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: StreamOutput) -> None:
        """Append one step's output of this choice."""
        self.text += out.text_delta
        self.token_ids += out.new_token_ids
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
            chosen = sum(entry[t] for entry, t in zip(out.logprobs, out.new_token_ids, strict=True))
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + chosen
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


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

    def add(self, out: StreamOutput) -> None:
        """Append one step's output to its choice; finished once every choice is."""
        self.outputs[out.index].add(out)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        self.finished = all(c.finished for c in self.outputs)


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
    index: int = 0  # which of the request's n choices

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
