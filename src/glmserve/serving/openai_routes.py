"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Thin handlers: validate (protocol), hand the request to the chat service, format its events
(openai_format) as one JSON body or as SSE chunks ending in `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from glmserve.serving import openai_format as fmt
from glmserve.serving.errors import APIError, InvalidRequest, NotFound
from glmserve.serving.protocol import ChatCompletionRequest, CompletionRequest
from glmserve.serving.registry import ServedModel
from glmserve.serving.service import ChatService, Event, collect
from glmserve.serving.streaming import (
    SSE_DONE,
    Render,
    sse,
    start_stream,
    until_disconnected,
    with_first,
)
from glmserve.serving.tool_calls import ToolPlan, plan_tools

router = APIRouter()
SSE_MEDIA_TYPE = "text/event-stream"


def _service(request: Request) -> ChatService:
    return request.app.state.service


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(m) for m in _service(request).registry]}


@router.get("/v1/models/{name}")
async def get_model(request: Request, name: str) -> dict:
    registry = _service(request).registry
    if name not in registry.models:
        raise NotFound(f"model {name!r} is not served", param="model")
    return _model_card(registry.models[name])


def _model_card(model: ServedModel) -> dict:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "glmserve",
        "root": model.name,
        "parent": model.base.name if model.base else None,  # a LoRA adapter's base model (as vLLM)
        "max_model_len": model.max_model_len,
    }


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    body.check_supported()
    service = _service(request)
    model = service.model(body.model)
    options = body.sampling_options()
    plan = plan_tools(model.tokenizer, body.tools, body.tool_choice, body.parallel_tool_calls, options["structured_outputs"])
    plan.apply(options)
    prompt_ids = service.chat_prompt_ids(model, body.message_dicts(), plan.tools, options["max_tokens"])
    prompt_ids += plan.prompt_suffix_ids(model.tokenizer)  # a forced call's header
    params = service.sampling_params(model, len(prompt_ids), **options)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    events = service.generate(model, [prompt_ids], [params], request_id)
    if body.stream:
        render = _chat_chunks(request_id, created, model, body.top_logprobs or 0, body.include_usage, plan)
        return await start_stream(request, events, render, SSE_MEDIA_TYPE)
    completions = await until_disconnected(request, collect(events, params.n))
    k = body.top_logprobs or 0
    return JSONResponse(fmt.chat_response(request_id, created, model, completions, k, plan.message))


def _chat_chunks(
    request_id: str, created: int, model: ServedModel, k: int, include_usage: bool, plan: ToolPlan
) -> Render:
    header = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model.name}

    async def render(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        tally, streams = _Tally(), {}
        try:
            async for index, out in with_first(first, events):
                is_new = tally.add(index, out)
                stream = streams.setdefault(index, plan.streamer())
                deltas = stream.deltas(out.text_delta, out.finished)
                if not (deltas or out.finished or out.logprobs is not None or is_new):
                    continue  # held back (a token inside a character, a possible tool call)
                deltas = deltas or [{"content": ""}]
                if is_new:
                    deltas[0] = {"role": "assistant", **deltas[0]}
                logprobs = (
                    fmt.chat_logprobs(model, out.new_token_ids, out.logprobs, k) if out.logprobs else None
                )
                for i, delta in enumerate(deltas):
                    is_last = i == len(deltas) - 1
                    choice = {"index": index, "delta": delta, "logprobs": logprobs if is_last else None}
                    choice["finish_reason"] = (
                        stream.finish_reason(fmt.finish_reason(out.finish_reason)) if is_last else None
                    )
                    yield sse({**header, "choices": [choice], **({"usage": None} if include_usage else {})})
            if include_usage:
                yield sse({**header, "choices": [], "usage": tally.usage()})
        except APIError as error:
            yield sse(error.body())
        yield SSE_DONE

    return render


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    body.check_supported()
    service = _service(request)
    model = service.model(body.model)
    prompts = [service.text_prompt_ids(model, p) if isinstance(p, str) else p for p in body.prompt_list()]
    options = body.sampling_options()  # one parse of the request's fields (its schema too) for every prompt
    params = [service.sampling_params(model, len(ids), **options) for ids in prompts]
    echoes = _echoes(model, body, prompts)
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    events = service.generate(model, prompts, params, request_id)
    if body.stream:
        render = _completion_chunks(request_id, created, model, body, echoes, len(prompts))
        return await start_stream(request, events, render, SSE_MEDIA_TYPE)
    done = await until_disconnected(request, collect(events, len(echoes)))
    body_json = fmt.completion_response(request_id, created, model, done, echoes, body.logprobs, len(prompts))
    return JSONResponse(body_json)


def _echoes(model: ServedModel, body: CompletionRequest, prompts: list[list[int]]) -> list[str]:
    """Per choice, the prompt text to put before the answer (`echo`), else ""."""
    texts = body.prompt_list()
    if any(not ids for ids in prompts):
        raise InvalidRequest("the prompt is empty", param="prompt")
    echoes = []
    for text, ids in zip(texts, prompts, strict=True):
        echo = (text if isinstance(text, str) else model.tokenizer.decode(ids)) if body.echo else ""
        echoes += [echo] * body.n
    return echoes


def _completion_chunks(
    request_id: str,
    created: int,
    model: ServedModel,
    body: CompletionRequest,
    echoes: list[str],
    num_prompts: int,
) -> Render:
    header = {"id": request_id, "object": "text_completion", "created": created, "model": model.name}
    include_usage = body.include_usage

    async def render(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        tally = _Tally()
        offsets = [len(echo) for echo in echoes]  # text_offset of each choice's next token
        try:
            async for index, out in with_first(first, events):
                is_new = tally.add(index, out)
                text = echoes[index] + out.text_delta if is_new else out.text_delta
                logprobs = None
                if out.logprobs:
                    logprobs = fmt.completion_logprobs(
                        model, out.new_token_ids, out.logprobs, body.logprobs, offsets[index]
                    )
                offsets[index] += len(out.text_delta)
                choice = {"index": index, "text": text, "logprobs": logprobs}
                choice["finish_reason"] = fmt.finish_reason(out.finish_reason)
                yield sse({**header, "choices": [choice], **({"usage": None} if include_usage else {})})
            if include_usage:
                yield sse({**header, "choices": [], "usage": tally.usage(num_prompts)})
        except APIError as error:
            yield sse(error.body())
        yield SSE_DONE

    return render


class _Tally:
    """Token counts of a stream, for its closing usage chunk."""

    def __init__(self) -> None:
        self.num_completion_tokens = 0
        self.prompt_tokens: dict[int, tuple[int, int]] = {}  # choice -> (prompt, cached) tokens

    def add(self, index: int, out) -> bool:
        """Count `out`; True if it is the choice's first output."""
        self.num_completion_tokens += len(out.new_token_ids)
        is_new = index not in self.prompt_tokens
        if is_new or out.finished:
            self.prompt_tokens[index] = (out.num_prompt_tokens, out.num_cached_tokens)
        return is_new

    def usage(self, num_prompts: int = 1) -> dict:
        counts = [self.prompt_tokens[i] for i in sorted(self.prompt_tokens)]
        n = max(len(counts) // num_prompts, 1)
        firsts = counts[::n]  # each prompt once, however many choices it has
        prompt, cached = sum(c[0] for c in firsts), sum(c[1] for c in firsts)
        return fmt.usage(prompt, self.num_completion_tokens, cached)
