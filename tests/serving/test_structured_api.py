"""Structured output through the real server on the bundled model: OpenAI's response_format (and the
client's `.parse()` with a Pydantic model), LangChain's with_structured_output, vLLM's guided_* and
structured_outputs fields, the classic ChatGLM route, and 400s for what cannot be enforced."""

import json
import re

import httpx
import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "weather": {"enum": ["sunny", "rainy", "cloudy"]},
        "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
    },
    "required": ["city", "weather", "temperature_c"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today? Answer in JSON."}]


class Capital(BaseModel):
    country: str = Field(max_length=40)
    capital: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=2000)


def test_json_schema_response_format(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}
    for temperature in (0, 1):
        answer = client.chat.completions.create(
            model="", messages=ASK, response_format=response_format, temperature=temperature, n=2, max_tokens=100, seed=1
        )
        for choice in answer.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), WEATHER_SCHEMA)


def test_json_object_streamed(client):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    stream = client.chat.completions.create(
        model="", messages=messages, response_format={"type": "json_object"}, temperature=0, max_tokens=120, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)


def test_openai_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(
        model="",
        messages=[{"role": "user", "content": "Tell me about France: its capital and population."}],
        response_format=Capital,
        temperature=0,
        max_tokens=100,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.capital


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model="SmolLM2-135M-Instruct.Q4_1",
                     temperature=0, max_tokens=100, timeout=120, max_retries=0)  # fmt: skip
    answer = llm.with_structured_output(Capital).invoke("Tell me about Japan: its capital and population.")
    assert isinstance(answer, Capital) and answer.capital


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"guided_regex": r"[A-Z][a-z]+ is [0-9]{1,3}"}, lambda text: re.fullmatch(r"[A-Z][a-z]+ is [0-9]{1,3}", text)),
        ({"guided_choice": ["Paris", "Lyon", "Nice"]}, lambda text: text in ("Paris", "Lyon", "Nice")),
        ({"guided_json": WEATHER_SCHEMA}, lambda text: jsonschema.validate(json.loads(text), WEATHER_SCHEMA) is None),
        ({"guided_grammar": 'root ::= "It is " ("hot" | "cold") "."'}, lambda text: text in ("It is hot.", "It is cold.")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
        ({"structured_outputs": {"json": json.dumps(WEATHER_SCHEMA)}}, lambda text: jsonschema.validate(json.loads(text), WEATHER_SCHEMA) is None),
    ],
)
def test_vllm_fields_on_chat_and_completions(client, fields, check):
    chat = client.chat.completions.create(model="", messages=ASK, temperature=1, seed=2, max_tokens=100, extra_body=fields)
    assert check(chat.choices[0].message.content), chat.choices[0].message.content
    completion = client.completions.create(
        model="", prompt="The weather in Paris:", temperature=0, max_tokens=100, extra_body=fields
    )
    assert check(completion.choices[0].text), completion.choices[0].text


def test_classic_route_accepts_response_format(server):
    body = {"prompt": "Weather in Paris? Answer in JSON.", "history": [], "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}}  # fmt: skip
    answer = requests.post(server.base_url + "/", json=body, timeout=120).json()
    jsonschema.validate(json.loads(answer["response"]), WEATHER_SCHEMA)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strange"}}}}}}, None, "invalid json"),
        ({"guided_json": {"type": "array", "uniqueItems": True}}, None, "uniqueItems"),
        ({"guided_regex": "(unclosed"}, None, "invalid regex"),
        ({"guided_grammar": "root ::= missing"}, None, "invalid grammar"),
        ({"guided_choice": []}, "guided_choice", "choice"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "one way"),
        ({"structured_outputs": {"json": {}, "xml": "<a/>"}}, "structured_outputs", "unknown"),
    ],
)
def test_what_cannot_be_enforced_is_400(server, fields, param, words):
    response = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 8, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param:
        assert error["param"] == param
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
