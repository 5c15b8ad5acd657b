"""Two models in one process: the bundled GGUF served under two names."""

import openai
import pytest
import requests
from server_process import SMALL_ENGINE, running_server

from glmserve.model_path import find_bundled_model

NAMES = ("smol-a", "smol-b")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    path = str(find_bundled_model())
    with running_server(
        *SMALL_ENGINE, "--model", f"{NAMES[0]}={path}", "--model", f"{NAMES[1]}={path}"
    ) as server:
        yield server


def classic(server, path: str) -> dict:
    body = {"prompt": "What is the capital of France?", "history": [], "temperature": 0, "max_length": 64}
    response = requests.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_both_are_listed(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == list(NAMES)


def test_each_answers_on_its_classic_route(server):
    answers = {path: classic(server, path)["response"] for path in ("/smol-a", "/smol-b", "/", "/chatglm")}
    assert len(set(answers.values())) == 1 and "Paris" in answers["/smol-a"]  # same weights, greedy


def test_each_answers_by_model_name(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=60, max_retries=0)
    for name in NAMES:
        reply = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=8)
        assert reply.model == name and "Paris" in reply.choices[0].message.content


def test_each_has_its_own_engine(server):
    stats = requests.get(server.base_url + "/health", timeout=10).json()["models"]
    assert sorted(stats) == sorted(NAMES)
    assert all(s["num_generated_tokens"] > 0 for s in stats.values())
    metrics = requests.get(server.base_url + "/metrics", timeout=10).text
    assert all(f'glmserve_kv_cache_blocks{{model="{name}"}}' in metrics for name in NAMES)
