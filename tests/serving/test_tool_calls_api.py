"""Tool calls through a real server on 127.0.0.1, read by the official `openai` client. The model
is the TEST-ONLY scripted decoder (tests/serving/scripted_decoder.py): it emits a fixed
ChatGLM3-format answer through the real tokenizer, because random weights only emit noise."""

import json

import openai
import pytest
from scripted_decoder import OBSERVATION_ID, ScriptedDecoderEngine, ServerThread

from glmserve.devtools import PRESETS_DIR
from glmserve.tokenization.glm import load_glm_tokenizer

CHATGLM3_DIR = PRESETS_DIR / "chatglm3"
CALL_TEXT = 'get_weather\n```python\ntool_call(city="Paris", unit="c")\n```'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_glm_tokenizer(CHATGLM3_DIR)


@pytest.fixture(scope="module")
def server(tokenizer):
    state = {"text": CALL_TEXT}

    def script(prompt_ids: list[int]) -> list[int]:
        ids = tokenizer.encode(state["text"], add_special_tokens=False) + [OBSERVATION_ID]
        header = tokenizer.encode("get_weather\n", add_special_tokens=False)
        # A forced call: the header is already in the prompt, the model writes what follows.
        return ids[len(header) :] if prompt_ids[-len(header) :] == header else ids

    engine = ScriptedDecoderEngine(tokenizer, script)
    with ServerThread({"chatglm3-scripted": engine}) as running:
        running.state, running.engine = state, engine
        yield running


@pytest.fixture()
def client(server):
    server.state["text"] = CALL_TEXT
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=60, max_retries=0)


def test_whole_tool_call(client):
    answer = client.chat.completions.create(model="chatglm3-scripted", messages=QUESTION, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(
        model="chatglm3-scripted", messages=QUESTION, tools=TOOLS, stream=True
    )
    chunks = list(stream)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls if c.function.name] == ["get_weather"]
    arguments = "".join(c.function.arguments or "" for c in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "c"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # nothing leaked as text


def test_named_tool_choice_prefills_the_header(client, server, tokenizer):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(
        model="chatglm3-scripted", messages=QUESTION, tools=TOOLS, tool_choice=choice
    )
    header = tokenizer.encode("get_weather\n", add_special_tokens=False)
    assert server.engine.prompts[-1][-len(header) - 1 :] == [64796, *header]  # <|assistant|> name\n
    assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tool_choice_none_and_plain_answers(client, server):
    server.state["text"] = "\nIt is sunny."
    answer = client.chat.completions.create(
        model="chatglm3-scripted", messages=QUESTION, tools=TOOLS, tool_choice="none"
    )
    assert answer.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="chatglm3-scripted", messages=QUESTION, tools=TOOLS, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == "It is sunny."


@pytest.mark.parametrize(
    "text",
    [
        'get_weather\n```python\ntool_call(city=__import__("os").system("id"))\n```',
        "get_weather\n```python\ntool_call(\n```",
        "get_weather\n" + "(" * 5000,
        "unknown_tool\n```python\ntool_call(a=1)\n```",
    ],
)
def test_malformed_calls_come_back_as_content(client, server, text):
    server.state["text"] = text
    answer = client.chat.completions.create(model="chatglm3-scripted", messages=QUESTION, tools=TOOLS)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content.strip()
    stream = client.chat.completions.create(
        model="chatglm3-scripted", messages=QUESTION, tools=TOOLS, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream).strip()


def test_tool_results_replay_into_the_prompt(client, server, tokenizer):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]  # fmt: skip
    client.chat.completions.create(model="chatglm3-scripted", messages=messages, tools=TOOLS)
    text = tokenizer.decode(server.engine.prompts[-1], skip_special_tokens=False)
    assert (
        '<|assistant|>get_weather\n ```python\ntool_call(city="Paris")\n```<|observation|>\n {"temp_c": 21}'
        in text
    )


def test_bad_tool_choice_is_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="chatglm3-scripted", messages=QUESTION, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip
