"""Request models: the classic API's loose numbers, OpenAI's prompt shapes, unsupported options."""

import pytest
from pydantic import ValidationError

from glmserve.engine.sampling_params import StructuredOutputsParams
from glmserve.serving.errors import InvalidRequest
from glmserve.serving.protocol import ChatCompletionRequest, ClassicChatRequest, CompletionRequest


def test_classic_blank_fields_mean_defaults():
    body = ClassicChatRequest(prompt="你好", history=[], max_length="", top_p="", temperature=" ")
    assert (body.max_length, body.top_p, body.temperature) == (None, None, None)


def test_classic_numbers_may_be_strings():
    body = ClassicChatRequest(prompt="hi", max_length="2048", top_p="0.7", temperature=0.95)
    assert (body.max_length, body.top_p, body.temperature) == (2048, 0.7, 0.95)
    with pytest.raises(ValidationError):
        ClassicChatRequest(prompt="hi", temperature="warm")


def test_classic_messages_keep_turn_order():
    body = ClassicChatRequest(prompt="q2", history=[["q1", "a1"]], system="be brief")
    assert [m["role"] for m in body.messages()] == ["system", "user", "assistant", "user"]
    assert body.messages()[-1]["content"] == "q2"


def test_completion_prompt_shapes():
    assert CompletionRequest(prompt="a").prompt_list() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompt_list() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2]).prompt_list() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompt_list() == [[1], [2, 3]]


def test_max_completion_tokens_wins():
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], max_tokens=5, max_completion_tokens=7
    )
    assert body.sampling_options()["max_tokens"] == 7


def test_logprobs_options():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2)
    assert body.sampling_options()["logprobs"] == 2
    plain = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    assert plain.sampling_options()["logprobs"] is None
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=2).check_supported()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "integer"}}}},
         StructuredOutputsParams(json={"type": "integer"})),
        ({"guided_json": '{"type": "string"}'}, StructuredOutputsParams(json={"type": "string"})),
        ({"guided_regex": "[a-z]+"}, StructuredOutputsParams(regex="[a-z]+")),
        ({"guided_choice": ["a", "b"]}, StructuredOutputsParams(choice=["a", "b"])),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutputsParams(grammar='root ::= "a"')),
        ({"structured_outputs": {"regex": "x+"}}, StructuredOutputsParams(regex="x+")),
    ],
)  # fmt: skip
def test_structured_output_fields(fields, expected):
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields)
    assert body.sampling_options()["structured_outputs"] == expected
    assert CompletionRequest(prompt="x", **fields).sampling_options()["structured_outputs"] == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
        {"response_format": {"type": "yaml"}},
        {"guided_regex": "a", "response_format": {"type": "json_object"}},
        {"guided_choice": ["", "b"]},
    ],
)
def test_structured_output_mistakes_are_400(fields):
    with pytest.raises(InvalidRequest):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields).sampling_options()
