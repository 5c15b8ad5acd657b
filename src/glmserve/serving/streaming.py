"""Streaming plumbing shared by both APIs: start a stream only once the engine has accepted the
request (so a refused request still gets its 400/429), and stop working for clients that left.

A streamed body is cancelled by Starlette when the client disconnects (uvicorn speaks ASGI 2.3,
so StreamingResponse listens for http.disconnect); the cancellation reaches AsyncEngine.generate,
whose `finally` aborts the request. Waiting for a non-streamed answer, or for the first token,
is covered by `until_disconnected`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from glmserve.serving.middleware import CLIENT_CLOSED_REQUEST
from glmserve.serving.service import Event

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"
# Headers that stop proxies (nginx) from buffering a token stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The client left before the answer started; the app answers it with a bare 499."""


def client_disconnected_response(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def sse(obj: dict) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and so aborting its engine requests) if the client leaves."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


Render = Callable[[Event, AsyncIterator[Event]], AsyncIterator[bytes]]


async def start_stream(
    request: Request, events: AsyncIterator[Event], render: Render, media_type: str
) -> Response:
    """Wait for the first event (errors before it become ordinary error responses), then stream
    `render(first, rest)`; the events are closed (aborting the requests) however the body ends."""
    first = await until_disconnected(request, anext(events))

    async def body() -> AsyncIterator[bytes]:
        async with aclosing(events):
            async for chunk in render(first, events):
                yield chunk

    return StreamingResponse(body(), media_type=media_type, headers=STREAM_HEADERS)


async def with_first(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in events:
        yield event
