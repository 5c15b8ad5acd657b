"""Per-request context as plain ASGI (no BaseHTTPMiddleware, which buffers streaming bodies):
an X-Request-ID on every response and log line, the request counted by route and status, and
an OpenAI-shaped 500 for anything unhandled."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmserve.serving.errors import APIError
from glmserve.serving.logs import request_id_var

logger = logging.getLogger(__name__)
# Client-chosen ids go into log lines and headers: keep them short and printable.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, record: Callable[[str, str, int], None]):
        self.app = app
        self.record = record  # (method, route, status) -> metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = request_id_var.set(request_id)
        status = CLIENT_CLOSED_REQUEST  # stays so if the response never starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if status == CLIENT_CLOSED_REQUEST:
                status = 500
                await _send_internal_error(send_with_id)
        finally:
            route = scope.get("route")
            self.record(scope["method"], getattr(route, "path", "unmatched"), status)
            request_id_var.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SAFE_REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


async def _send_internal_error(send: Send) -> None:
    body = json.dumps(APIError("internal error").body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
