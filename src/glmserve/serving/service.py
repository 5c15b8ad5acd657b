"""The chat service: messages (or prompt ids) + options -> a stream of (choice index, output).

The HTTP routes and the web UI both call this, so admission (queue limit), defaults, prompt
building, context checks and latency metrics live in one place. It works on any AsyncEngine and
knows nothing of HTTP.

Every level closes the async generator it iterates (`aclosing`): an abandoned one would run its
`finally` (the engine abort that frees KV blocks) only whenever the event loop finalizes it.

    service = ChatService(registry, max_queue=256)
    async for index, out in service.stream_chat([{"role": "user", "content": "你好"}], temperature=0):
        print(out.text_delta, end="")
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from glmserve.engine.outputs import CompletionOutput, StreamOutput
from glmserve.engine.sampling_params import SamplingParams
from glmserve.serving.errors import APIError, InvalidRequest, ModelNotFound, QueueFull, ServerError
from glmserve.serving.metrics import ServerMetrics
from glmserve.serving.registry import ModelRegistry, ServedModel

Event = tuple[int, StreamOutput]  # (choice index, what the engine produced for that choice)


@dataclass
class Completion(CompletionOutput):
    """One choice, accumulated from its stream, with its prompt's counts (a completions request may
    hold several prompts)."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None  # [None, {token_id: logprob}, ...] when requested

    def add(self, out: StreamOutput) -> None:
        super().add(out)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)


async def collect(events: AsyncIterator[Event], num_choices: int) -> list[Completion]:
    completions = [Completion(i) for i in range(num_choices)]
    async with aclosing(events):
        async for index, out in events:
            completions[index].add(out)
    return completions


class ChatService:
    def __init__(self, registry: ModelRegistry, max_queue: int, metrics: ServerMetrics | None = None):
        self.registry = registry
        self.max_queue = max_queue
        self.metrics = metrics

    def model(self, name: str | None = None) -> ServedModel:
        return self.registry.get(name)

    # -- building a request ------------------------------------------------------------------------
    def chat_prompt_ids(
        self,
        model: ServedModel,
        messages: Sequence[Mapping],
        tools: list | None = None,
        max_new_tokens: int | None = None,
    ) -> list[int]:
        """Prompt ids from the model's chat format. Formats with an input budget (Baichuan's) keep
        whole rounds, newest first, within context - max_new_tokens (half the context when the
        request sets no max_tokens, as Baichuan's own 4096 - 2048)."""
        options = {}
        if getattr(model.tokenizer, "supports_input_budget", False):
            context = model.engine.engine.max_model_len
            options["max_input_tokens"] = context - (max_new_tokens or context // 2)
        try:
            return model.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **options)
        except (ValueError, TypeError) as error:  # the template met a message shape it cannot render
            raise InvalidRequest(f"cannot build the prompt: {error}", param="messages") from None

    def text_prompt_ids(self, model: ServedModel, text: str) -> list[int]:
        # As LLM.generate does: special-token strings in a raw completion prompt are recognised.
        return model.tokenizer.encode(text, add_special_tokens=True, parse_special=True)

    def sampling_params(
        self, model: ServedModel, num_prompt_tokens: int, max_length: int | None = None, **options: Any
    ) -> SamplingParams:
        """SamplingParams from request options; None means the model's default. Without max_tokens
        the answer may fill the rest of max_length (prompt + answer) or of the context."""
        options = {key: value for key, value in options.items() if value is not None}
        options.setdefault("temperature", model.defaults.temperature)
        options.setdefault("top_p", model.defaults.top_p)
        options.setdefault("top_k", model.defaults.top_k)
        options.setdefault("repetition_penalty", model.defaults.repetition_penalty)
        if "max_tokens" not in options:
            options["max_tokens"] = _room_for_answer(model, num_prompt_tokens, max_length)
        try:
            return SamplingParams(**options)
        except ValueError as error:
            raise InvalidRequest.from_value_error(error) from None

    # -- running it ---------------------------------------------------------------------------------
    async def generate(
        self,
        model: ServedModel,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        request_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """Run each prompt with its params, params.n choices each (the engine's parallel sampling;
        event index = prompt * n + choice). Raises InvalidRequest before the first event for a
        request the engine refuses; closing the iterator early aborts every choice and frees its
        KV blocks."""
        request_id = request_id or uuid.uuid4().hex
        num_seqs = sum(p.n for p in params)
        queue = model.base or model  # an adapter's requests queue on its base model's engine
        self._admit(queue, num_seqs)
        queue.num_unfinished += num_seqs
        try:
            streams = [
                self._request(model, f"{request_id}-{i}", ids, p, first_index=i * p.n)
                for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
            ]
            if len(streams) == 1:
                async with aclosing(streams[0]) as stream:
                    async for event in stream:
                        yield event
            else:
                async with aclosing(_merge(streams)) as events:
                    async for event in events:
                        yield event
        finally:
            queue.num_unfinished -= num_seqs

    async def stream_chat(
        self,
        messages: Sequence[Mapping],
        model: str | None = None,
        tools: list | None = None,
        max_length: int | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> AsyncIterator[Event]:
        """A conversation through the model's chat template; options are SamplingParams fields."""
        served = self.model(model)
        prompt_ids = self.chat_prompt_ids(served, messages, tools, options.get("max_tokens"))
        params = self.sampling_params(served, len(prompt_ids), max_length, **options)
        async with aclosing(self.generate(served, [prompt_ids], [params], request_id)) as events:
            async for event in events:
                yield event

    async def chat(self, messages: Sequence[Mapping], **kwargs: Any) -> list[Completion]:
        return await collect(self.stream_chat(messages, **kwargs), kwargs.get("n") or 1)

    def _admit(self, model: ServedModel, num_seqs: int) -> None:
        if num_seqs > self.max_queue:
            raise InvalidRequest(
                f"{num_seqs} sequences in one request exceed the queue limit of {self.max_queue}"
            )
        if model.num_unfinished + num_seqs > self.max_queue:
            raise QueueFull(
                f"model {model.name} has {model.num_unfinished} unfinished requests (limit {self.max_queue}): "
                "retry later",
                headers={"Retry-After": str(QueueFull.retry_after_s)},
            )

    async def _request(
        self, model: ServedModel, request_id: str, prompt_ids: list[int], params: SamplingParams, first_index: int
    ) -> AsyncIterator[Event]:
        """One engine request (its n choices), with its latencies recorded."""
        observe_first, observe_next, observe_total = self._latency_observers(model)
        start = last = time.monotonic()
        try:
            async with aclosing(model.engine.generate(request_id, prompt_ids, params, model.lora)) as outputs:
                async for out in outputs:
                    now = time.monotonic()
                    (observe_next if last > start else observe_first)(now - last)
                    last = now
                    yield first_index + out.index, out
        except ValueError as error:  # refused by the engine, before any output
            raise InvalidRequest.from_value_error(error) from None
        except LookupError:  # its adapter was unloaded since the request was routed
            raise ModelNotFound(f"model {model.name!r} is not served", param="model") from None
        except RuntimeError as error:  # the engine failed or is shutting down
            raise ServerError(f"the engine could not finish the request: {error}") from None
        observe_total(last - start)

    def _latency_observers(self, model: ServedModel):
        if self.metrics is None:
            return _ignore, _ignore, _ignore
        m = self.metrics
        return (
            m.time_to_first_token.labels(model.name).observe,
            m.inter_token_latency.labels(model.name).observe,
            m.request_latency.labels(model.name).observe,
        )


def _ignore(_: float) -> None:
    pass


def _room_for_answer(model: ServedModel, num_prompt_tokens: int, max_length: int | None) -> int:
    limit = min(max_length or model.max_sequence_len, model.max_sequence_len)
    room = limit - num_prompt_tokens
    if room >= 1:
        return room
    if max_length is not None and max_length < model.max_sequence_len:
        raise InvalidRequest(
            f"prompt ({num_prompt_tokens} tokens) leaves no room for an answer within max_length "
            f"({max_length} tokens)",
            param="max_length",
        )
    raise InvalidRequest(
        f"prompt ({num_prompt_tokens} tokens) leaves no room for an answer in the context length "
        f"of {model.max_sequence_len} tokens",
        param="messages",
    )


async def _merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """Interleave several prompts' event streams as their outputs arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                queue.put_nowait(event)
            queue.put_nowait(None)
        except APIError as error:
            queue.put_nowait(error)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    num_running = len(tasks)
    try:
        while num_running:
            item = await queue.get()
            if item is None:
                num_running -= 1
            elif isinstance(item, APIError):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
