"""Request models: the classic API's loose numbers, OpenAI's prompt shapes, unsupported options."""

import pytest
from pydantic import ValidationError

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


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_structured_output_is_refused(kind):
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], response_format={"type": kind})
    with pytest.raises(InvalidRequest, match=kind):
        body.check_supported()
