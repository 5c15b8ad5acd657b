"""The classic ChatGLM API of ChatGLM2's api.py: POST / and /chatglm (the first model) and
POST /<name> per model. `max_length` counts prompt plus answer; blank fields take the model
family's defaults; `"stream": true` answers with newline-delimited JSON.

    {"prompt": "你好", "history": [], "max_length": "", "top_p": "", "temperature": ""}
    -> {"response": "...", "history": [["你好", "..."]], "status": 200, "time": "2024-01-01 12:00:00"}
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from glmserve.serving.errors import APIError
from glmserve.serving.protocol import ClassicChatRequest
from glmserve.serving.service import ChatService, Completion, Event, collect
from glmserve.serving.streaming import dumps, start_stream, until_disconnected, with_first

NDJSON_MEDIA_TYPE = "application/x-ndjson"
CLASSIC_ALIASES = ("/", "/chatglm")  # the first model's routes in ChatGLM's own demos


def classic_router(model_names: list[str]) -> APIRouter:
    """/ and /chatglm for the first model (unless a model is named chatglm), and POST /<name> for every
    served model or adapter, also those loaded at run time (an unknown name: 404)."""
    router = APIRouter()
    for alias in CLASSIC_ALIASES:
        if alias.lstrip("/") not in model_names:
            router.add_api_route(alias, _endpoint(model_names[0]), methods=["POST"], name=f"classic:{alias}")

    @router.post("/{model_name}", name="classic:/<name>")
    async def classic_chat_by_name(model_name: str, body: ClassicChatRequest, request: Request) -> Response:
        return await answer(request, body, model_name)

    return router


def _endpoint(model_name: str) -> Callable:
    async def classic_chat(body: ClassicChatRequest, request: Request) -> Response:
        return await answer(request, body, model_name)

    return classic_chat


async def answer(request: Request, body: ClassicChatRequest, model_name: str) -> Response:
    service: ChatService = request.app.state.service
    model = service.model(model_name)
    prompt_ids = service.chat_prompt_ids(model, body.messages())
    max_length = body.max_length or model.defaults.max_length
    params = service.sampling_params(model, len(prompt_ids), max_length=max_length, **body.sampling_options())
    events = service.generate(model, [prompt_ids], [params], f"chatglm-{uuid.uuid4().hex}")
    if body.stream:
        return await start_stream(request, events, _ndjson(body), NDJSON_MEDIA_TYPE)
    [completion] = await until_disconnected(request, collect(events, 1))
    return JSONResponse(_final(body, completion))


def _final(body: ClassicChatRequest, completion: Completion) -> dict:
    history = [list(pair) for pair in body.history or []]
    return {
        "response": completion.text,
        "history": [*history, [body.prompt, completion.text]],
        "status": 200,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "finish_reason": completion.finish_reason,
    }


def _ndjson(body: ClassicChatRequest):
    """One {"delta": ...} line per step with text, then the full answer as the last line."""

    async def render(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        completion = Completion(0)
        try:
            async for _, out in with_first(first, events):
                completion.add(out)
                if out.text_delta:
                    yield dumps({"delta": out.text_delta}) + b"\n"
            yield dumps({"delta": "", **_final(body, completion)}) + b"\n"
        except APIError as error:
            yield dumps({**error.body(), "status": error.status_code}) + b"\n"

    return render
