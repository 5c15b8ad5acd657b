"""The bundled model behind a real `glmserve serve` (one per test module that asks for it), and the
official client on it. Modules that need another server define their own `server` fixture."""

import openai
import pytest
from server_process import SMALL_ENGINE, running_server


@pytest.fixture(scope="module")
def server():
    with running_server(*SMALL_ENGINE) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=60, max_retries=0) as client:
        yield client
