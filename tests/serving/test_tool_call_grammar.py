"""Tool calls generated under their tools' schemas, on random-weight ChatGLM3 and GLM-4 checkpoints
(real tokenizers and call formats) behind a real server: random weights write noise, so every call
parsing and validating shows the grammar, not the model, at work."""

import json

import jsonschema
import openai
import pytest
import torch
from server_process import running_server

from glmserve.devtools.random_checkpoint import (
    CheckpointSpec,
    load_config,
    scale_config,
    write_random_checkpoint,
)

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "1024"]
SIZES = dict(num_layers=1, hidden_size=32, num_attention_heads=2, multi_query_group_num=1, ffn_hidden_size=48)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 16}, "exact": {"type": "boolean"}},
    "required": ["query", "exact"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
ASK = [{"role": "user", "content": "What's the weather in Beijing? 北京天气怎么样"}]
MODELS = ["chatglm3", "glm4"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-grammar")
    paths = {}
    for name, preset in (("chatglm3", "chatglm3-6b"), ("glm4", "glm4-9b")):
        config, tokenizer_dirs = load_config(preset)
        spec = CheckpointSpec(scale_config(config, **SIZES), root / name, dtype=torch.float32, std=0.5,
                              tokenizer_dirs=tokenizer_dirs)  # fmt: skip
        write_random_checkpoint(spec)
        paths[name] = spec.out
    models = [arg for name, path in paths.items() for arg in ("--model", f"{name}={path}")]
    with running_server(*ENGINE, *models) as server:
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0) as client:
            yield client


def assert_valid(calls):
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", MODELS)
def test_required_calls_always_parse_and_validate(client, model):
    for seed in range(3):
        answer = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            temperature=1, n=4, seed=seed, max_tokens=200,
        )  # fmt: skip
        for choice in answer.choices:
            assert choice.finish_reason == "tool_calls", choice.message
            assert len(choice.message.tool_calls) == 1
            assert_valid(choice.message.tool_calls)


@pytest.mark.parametrize("model", MODELS)
def test_named_tool_is_called_with_valid_arguments(client, model):
    choice = {"type": "function", "function": {"name": "search"}}
    answer = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1, n=4, seed=7, max_tokens=200
    )
    for c in answer.choices:
        assert [call.function.name for call in c.message.tool_calls] == ["search"]
        assert_valid(c.message.tool_calls)


@pytest.mark.parametrize("model", MODELS)
def test_parallel_calls_come_back_as_several_entries(client, model):
    """With parallel calls allowed the model may write several (`<|assistant|>` between them): each is
    its own tool_calls entry, whole and streamed alike."""
    answer = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, n=8, seed=3, max_tokens=400
    )
    counts = []
    for choice in answer.choices:
        if choice.finish_reason == "tool_calls":
            assert_valid(choice.message.tool_calls)
            counts.append(len(choice.message.tool_calls))
    assert counts and max(counts) > 1, counts
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, n=8, seed=3, max_tokens=400,
        stream=True,
    )  # fmt: skip
    streamed: dict[int, dict[int, dict]] = {}
    finish = {}
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = streamed.setdefault(choice.index, {}).setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    for index, choice in enumerate(answer.choices):  # same seed: the same calls
        if choice.finish_reason == "tool_calls":
            whole = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
            parts = [streamed[index][i] for i in sorted(streamed[index])]
            assert [(p["name"], json.loads(p["arguments"])) for p in parts] == whole
            assert finish[index] == "tool_calls"


@pytest.mark.parametrize("model", MODELS)
def test_auto_answers_or_calls_validly(client, model):
    answer = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, temperature=1, n=8, seed=11, max_tokens=120
    )
    for choice in answer.choices:
        if choice.message.tool_calls:
            assert_valid(choice.message.tool_calls)
        else:
            assert choice.message.content is not None
