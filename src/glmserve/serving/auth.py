"""API keys: `Authorization: Bearer KEY`, any of several keys. With no key configured every
request passes (settings refuse that on a non-loopback address unless --allow-no-auth)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from fastapi import Request

from glmserve.serving.errors import Unauthorized


def api_key_checker(keys: Sequence[str]) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that raises 401 unless the request carries one of `keys`."""
    encoded = [key.encode() for key in keys]

    async def require_api_key(request: Request) -> None:
        if not encoded:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # Compare with every key, so the time taken does not tell which key nearly matched.
        matches = [hmac.compare_digest(given, key) for key in encoded]
        if scheme.lower() != "bearer" or not any(matches):
            raise Unauthorized(
                "missing or invalid API key: send the header Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_api_key
