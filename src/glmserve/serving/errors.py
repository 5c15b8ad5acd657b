"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every route.

The chat service raises these too, so the web UI and the routes report the same messages.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# SamplingParams and the engine start their messages with the field's name ("top_p must be ...").
_LEADING_FIELD = re.compile(r"^([a-z_]+) (must|requires|is)\b")


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"

    @classmethod
    def from_value_error(cls, error: ValueError) -> InvalidRequest:
        message = str(error)
        match = _LEADING_FIELD.match(message)
        return cls(message, param=match.group(1) if match else None)


class InvalidFields(InvalidRequest):
    status_code = 422


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class QueueFull(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after_s = 1


class ServerError(APIError):
    """The engine failed or stopped while serving a request."""


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of pydantic errors -> one message naming the first bad field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest(
            f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    where = f"field '{param}'" if param else "the body"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return InvalidFields(f"{where}: {first['msg']}{more}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Anything else unhandled becomes a 500 in RequestContextMiddleware, with the request id."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        error = APIError(str(exc.detail), headers=getattr(exc, "headers", None))
        error.status_code = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            error.message = f"no route {request.method} {request.url.path}"
        return error_response(error)
