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

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from glmserve.serving.errors import APIError
from glmserve.serving.protocol import ClassicChatRequest
from glmserve.serving.service import ChatService, Completion, Event, collect
from glmserve.serving.streaming import dumps, start_stream, until_disconnected, with_first

NDJSON_MEDIA_TYPE = "application/x-ndjson"
CLASSIC_ALIASES = ("/", "/chatglm")  # the first model's routes in ChatGLM's own demos


def classic_router(model_names: list[str], aliases: bool = True) -> APIRouter:
    """POST /<name> per model (or adapter), and / and /chatglm for the first (unless a model is named chatglm)."""
    router = APIRouter()
    routes = {f"/{name}": name for name in model_names}
    for alias in CLASSIC_ALIASES if aliases else ():
        routes.setdefault(alias, model_names[0])
    for path, name in routes.items():
        router.add_api_route(path, _endpoint(name), methods=["POST"], name=f"classic:{path}")
    return router


def add_classic_route(app: FastAPI, name: str) -> None:
    """POST /<name> for a model or adapter served from now on, behind the app's API-key check."""
    app.include_router(classic_router([name], aliases=False), dependencies=app.state.classic_dependencies)


def remove_classic_route(app: FastAPI, name: str) -> None:
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "name", None) != f"classic:/{name}"]


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
