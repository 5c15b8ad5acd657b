"""The classic ChatGLM API (ChatGLM2's api.py) against a real server, as its clients call it."""

import json
import time

import pytest
import requests


def post(server, path: str = "/", **body):
    return requests.post(server.base_url + path, json=body, timeout=60)


def test_the_seed_client_call(server):
    # Exactly what the seed's client sends: blank strings mean "the model's defaults".
    response = requests.post(
        server.base_url,
        json={"prompt": "你好", "history": [], "max_length": "", "top_p": "", "temperature": ""},
        timeout=120,
    )
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == 200 and isinstance(answer["response"], str) and answer["response"]
    assert answer["history"] == [["你好", answer["response"]]]
    time.strptime(answer["time"], "%Y-%m-%d %H:%M:%S")


def test_numbers_as_strings_and_history(server):
    history = [["What is 2+2?", "4."]]
    body = dict(prompt="And 3+3?", history=history, max_length="200", top_p="0.9", temperature="0")
    first, second = post(server, "/chatglm", **body).json(), post(server, "/chatglm", **body).json()
    assert first["response"] == second["response"]  # temperature "0" is greedy
    assert first["history"] == [*history, ["And 3+3?", first["response"]]]


def test_routes_answer_the_same(server):
    body = dict(prompt="Name a colour.", history=[], temperature=0, max_length=120)
    answers = {path: post(server, path, **body).json()["response"] for path in ("/", "/chatglm")}
    named = post(server, "/SmolLM2-135M-Instruct.Q4_1", **body).json()["response"]
    assert answers["/"] == answers["/chatglm"] == named


def test_system_prompt(server):
    answer = post(
        server,
        prompt="Who are you?",
        system="You are a pirate. Answer in one word.",
        temperature=0,
        max_length=120,
    ).json()
    assert answer["status"] == 200 and answer["history"] == [["Who are you?", answer["response"]]]


def test_stream_is_ndjson_ending_with_the_full_answer(server):
    body = dict(prompt="Count from one to five.", history=[], temperature=0, max_length=100)
    whole = post(server, **body).json()
    with requests.post(
        server.base_url + "/", json={**body, "stream": True}, stream=True, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *deltas, last = lines
    assert "".join(d["delta"] for d in deltas) == last["response"] == whole["response"]
    assert last["history"] == [[body["prompt"], whole["response"]]] and last["status"] == 200


def test_max_length_counts_the_prompt(server):
    response = post(server, prompt="Tell me a long story about dragons.", temperature=0, max_length=20)
    assert response.status_code == 400
    assert "max_length (20 tokens)" in response.json()["error"]["message"]
    answer = post(server, prompt="Tell me a long story.", temperature=0, max_length=60).json()
    assert answer["finish_reason"] == "length"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"history": []}, "prompt"),
        ({"prompt": "hi", "temperature": "warm"}, "temperature"),
        ({"prompt": "hi", "max_length": "1.5"}, "max_length"),
        ({"prompt": "hi", "history": [["only the question"]]}, "history.0"),
    ],
)
def test_bad_fields_name_the_field(server, body, param):
    response = post(server, **body)
    assert response.status_code == 422
    assert response.json()["error"]["param"].startswith(param)


def test_out_of_range_is_400(server):
    response = post(server, prompt="hi", top_p="1.5")
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_p"
