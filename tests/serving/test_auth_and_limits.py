"""API keys, the request queue limit and CORS, against a real server."""

import httpx
import openai
import pytest
from server_process import SMALL_ENGINE, running_server, wait_for

KEYS = ("key-one", "key-two")
ORIGIN = "http://ui.example.test"
QUESTION = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server():
    # Keys from the environment, as a container passes them (--api-key K1 --api-key K2 is the same).
    args = [*SMALL_ENGINE, "--max-queue", "2", "--cors-origin", ORIGIN]
    with running_server(*args, env={"GLMSERVE_API_KEY": " ".join(KEYS)}) as server:
        yield server


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, timeout=60, max_retries=0)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_required(server):
    with server.client() as http:
        response = http.post("/v1/chat/completions", json={"messages": QUESTION})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/", json={"prompt": "hi"}).status_code == 401  # classic routes too
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200  # liveness probes carry no key


def test_wrong_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "not-a-key").models.list()


def test_right_key_works(server):
    reply = client(server, KEYS[0]).chat.completions.create(messages=QUESTION, model="", max_tokens=4)
    assert reply.choices[0].message.content is not None
    with server.client(headers=bearer(KEYS[0])) as http:
        assert http.post("/", json={"prompt": "hi", "max_length": 64}).json()["status"] == 200


def test_each_key_works(server):
    for key in KEYS:
        assert client(server, key).models.list().data


def test_full_queue_is_429_with_retry_after(server):
    body = {"messages": QUESTION, "stream": True, "n": 2, "max_tokens": 400, "ignore_eos": True}
    with server.client(headers=bearer(KEYS[0])) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as holder:  # takes both slots
            lines = holder.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)
            response = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_error"
        too_many = http.post("/v1/chat/completions", json={"messages": QUESTION, "n": 3, "max_tokens": 4})
        assert too_many.status_code == 400 and "queue limit of 2" in too_many.json()["error"]["message"]
        assert wait_for(lambda: http.get("/health").json()["models"].popitem()[1]["num_unfinished"] == 0)
        assert (
            http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4}).status_code == 200
        )


def test_cors_preflight(server):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    response = httpx.options(server.base_url + "/v1/chat/completions", headers=headers, timeout=10)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        server.base_url + "/v1/chat/completions", headers={**headers, "Origin": "http://evil.test"}
    )
    assert "access-control-allow-origin" not in other.headers
