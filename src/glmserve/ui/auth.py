"""Login for the UI when the server has API keys: Gradio's login form, the API key as password.

Browsers cannot send `Authorization: Bearer`, so the page asks once for the key; Gradio then
keeps an HttpOnly session cookie and refuses every UI route (page, config, queue) without it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence


def key_login(keys: Sequence[str]) -> Callable[[str, str], bool] | None:
    """Gradio `auth`: any user name, one of `keys` as password; None (no login) without keys."""
    if not keys:
        return None
    encoded = [key.encode() for key in keys]

    def check(_username: str, password: str) -> bool:
        given = password.encode()
        return any([hmac.compare_digest(given, key) for key in encoded])  # every key: constant time

    return check
