"""A real `glmserve serve` per module and headless Debian chromium driven by Playwright.

No browser is downloaded: Playwright launches /usr/bin/chromium (CI installs it with
.ci/install-system-packages). A missing chromium fails these tests rather than skipping them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))  # server_process.py, shared with the API tests

from server_process import SMALL_ENGINE, running_server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 120_000  # a busy 2-core machine


@pytest.fixture(scope="module")
def server():
    with running_server(*SMALL_ENGINE) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One browser profile (so one localStorage) for the module, fresh for each run."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run .ci/install-system-packages"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        yield context
        context.close()
