"""API keys: `Authorization: Bearer KEY`, any of several keys. With no key configured every
request passes (settings refuse that on a non-loopback address unless --allow-no-auth)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from fastapi import Request

from glmserve.serving.errors import Forbidden, Unauthorized


def api_key_checker(keys: Sequence[str]) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that raises 401 unless the request carries one of `keys`."""
    encoded = [key.encode() for key in keys]

    async def require_api_key(request: Request) -> None:
        if not encoded:
            return
        if not _carries_one_of(request, encoded):
            raise Unauthorized(
                "missing or invalid API key: send the header Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_api_key


def admin_checker(api_keys: Sequence[str], admin_keys: Sequence[str], open_when_keyless: bool) -> Callable:
    """A dependency for routes that change what is served: 403 unless the request carries an admin
    key. With no key configured at all they are open only where `open_when_keyless` (a loopback host)."""
    encoded = [key.encode() for key in admin_keys]

    async def require_admin(request: Request) -> None:
        if not encoded and not api_keys and open_when_keyless:
            return
        if not encoded:
            raise Forbidden("this server has no admin keys: start it with --admin-key KEY to load or unload adapters")
        if not _carries_one_of(request, encoded):
            raise Forbidden("this route needs an admin key (--admin-key)")

    return require_admin


def _carries_one_of(request: Request, encoded: list[bytes]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # Compare with every key, so the time taken does not tell which key nearly matched.
    matches = [hmac.compare_digest(given, key) for key in encoded]
    return scheme.lower() == "bearer" and any(matches)
