"""Tool-call parsing without eval: whole outputs and streams, well-formed, malformed, adversarial."""

import json

import pytest

from glmserve.chat.tool_parsers import ChatGLM3ToolParser, GLM4ToolParser

CALL = 'get_weather\n```python\ntool_call(city="北京", days=[1, 2], detail={"wind": True}, unit=None)\n```'
ARGUMENTS = {"city": "北京", "days": [1, 2], "detail": {"wind": True}, "unit": None}
ADVERSARIAL = [
    'get_weather\n```python\ntool_call(city=__import__("os").system("id"))\n```',  # code, not a literal
    'get_weather\n```python\ntool_call("Paris")\n```',  # positional
    "get_weather\n```python\ntool_call(**{'city': 'x'})\n```",  # **kwargs
    "get_weather\n```python\ntool_call(x=1e999)\n```",  # inf is not JSON
    "get_weather\n```python\ntool_call(x=b'bytes')\n```",  # not JSON-serialisable
    "get_weather\n```python\ntool_call(x={1, 2})\n```",
    "get_weather\n```python\ntool_call(\n```",  # truncated
    "get_weather\n" + "[" * 50_000,  # parser recursion
    "get_weather\n" + "x" * 200_000,  # oversized
    "get_weather\n```python\nimport os; os.system('id')\n```",
    "get_weather\n\x00\ud800",
    "",
    "\n",
    "not a tool\n```python\ntool_call(a=1)\n```",
    "x" * 100 + "\ntool_call(a=1)",
]


def stream(parser, text, step=3):
    streamer, deltas = parser.streamer(), []
    for i in range(0, len(text), step):
        deltas += streamer.feed(text[i : i + step])
    return deltas + streamer.finish(), streamer


def test_chatglm3_call():
    [call] = ChatGLM3ToolParser({"get_weather"}).parse(CALL).tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == ARGUMENTS


def test_plain_answer_drops_the_empty_metadata_line():
    parsed = ChatGLM3ToolParser({"get_weather"}).parse("\n  Hello\nworld  ")
    assert (parsed.content, parsed.tool_calls) == ("Hello\nworld", [])


def test_interpreter_metadata_is_a_code_call():
    [call] = ChatGLM3ToolParser().parse("interpreter\n```python\nprint(1)\n```").tool_calls
    assert (call.name, json.loads(call.arguments)) == ("interpreter", {"code": "print(1)"})


def test_glm4_json_call():
    [call] = GLM4ToolParser({"get_weather"}).parse('get_weather\n{"city": "Paris"}').tool_calls
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert GLM4ToolParser({"get_weather"}).parse("get_weather\n[1, 2]").tool_calls == []


@pytest.mark.parametrize("text", ADVERSARIAL)
@pytest.mark.parametrize("parser_class", [ChatGLM3ToolParser, GLM4ToolParser])
def test_unparseable_output_is_plain_content(parser_class, text):
    parser = parser_class({"get_weather"})
    parsed = parser.parse(text)
    assert parsed.tool_calls == []
    deltas, _ = stream(parser, text[:3000])
    assert all("tool_calls" not in d for d in deltas)


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_streamed_call_is_held_back_then_sent(step):
    deltas, streamer = stream(ChatGLM3ToolParser({"get_weather"}), CALL, step)
    assert [list(d) for d in deltas] == [["tool_calls"]]
    function = deltas[0]["tool_calls"][0]["function"]
    assert function["name"] == "get_weather" and json.loads(function["arguments"]) == ARGUMENTS
    assert streamer.tool_calls[0].id == deltas[0]["tool_calls"][0]["id"]


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_streamed_plain_text_flows(step):
    text = "\nThe weather is fine.\nBye. "
    deltas, _ = stream(ChatGLM3ToolParser({"get_weather"}), text, step)
    assert "".join(d["content"] for d in deltas) == "The weather is fine.\nBye."
    prose = "Sure, here is the answer without a metadata line."
    deltas, _ = stream(ChatGLM3ToolParser({"get_weather"}), prose, 5)
    assert len(deltas) > 1 and "".join(d["content"] for d in deltas) == prose  # not held to the end


@pytest.mark.parametrize(
    ("parser", "calls"),
    [
        (GLM4ToolParser({"a", "b"}), ['a\n{"x": 1}', 'b\n{"y": [true, null]}']),
        (ChatGLM3ToolParser({"a", "b"}), [' a\n```python\ntool_call(x=1)\n```', 'b\n```python\ntool_call(y=[true, null])\n```']),
    ],
)
def test_parallel_calls_split_on_assistant_whole_and_streamed(parser, calls):
    text = "<|assistant|>".join(calls)
    expected = [("a", {"x": 1}), ("b", {"y": [True, None]})]
    assert [(c.name, json.loads(c.arguments)) for c in parser.parse(text).tool_calls] == expected
    streamer = parser.streamer()
    first = streamer.feed(text[: len(calls[0]) + len("<|assistant|>") + 1])
    assert [d["tool_calls"][0]["function"]["name"] for d in first] == ["a"]  # sent once complete
    rest = streamer.feed(text[len(calls[0]) + len("<|assistant|>") + 1 :]) + streamer.finish()
    assert [(d["tool_calls"][0]["index"], d["tool_calls"][0]["function"]["name"]) for d in rest] == [(1, "b")]


def test_a_parallel_turn_with_prose_is_content():
    text = 'a\n{"x": 1}<|assistant|>\nsome prose'
    assert GLM4ToolParser({"a"}).parse(text).content == text
