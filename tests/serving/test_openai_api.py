"""The OpenAI-compatible API against a real server, through the official `openai` client."""

import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 8}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def test_start_log_says_the_code_interpreter_is_sealed(server, client):
    client.models.list()  # the log is complete once the server answers
    assert "Code Interpreter: code runs sealed (bubblewrap" in server.log()


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert models[0].owned_by == "glmserve"
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat(client, model_name):
    raw = client.chat.completions.with_raw_response.create(model=model_name, messages=QUESTION, **GREEDY)
    assert raw.headers["x-request-id"]
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.model == model_name
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_equals_non_stream(client, model_name):
    whole = client.chat.completions.create(model=model_name, messages=QUESTION, **GREEDY)
    chunks = list(client.chat.completions.create(model=model_name, messages=QUESTION, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client, model_name):
    chunks = list(
        client.chat.completions.create(
            model=model_name, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == sum(1 for c in content if c.choices)
    assert last.usage.prompt_tokens > 10


def test_n_choices_with_seed(client, model_name):
    params = dict(model=model_name, messages=QUESTION, n=2, seed=7, temperature=1.0, max_tokens=8)
    first = client.chat.completions.create(**params)
    again = client.chat.completions.create(**params)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens <= 16


def test_n_choices_stream(client, model_name):
    stream = client.chat.completions.create(model=model_name, messages=QUESTION, n=2, stream=True, **GREEDY)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] and "Paris" in texts[0]  # greedy: both choices agree


def test_chat_logprobs(client, model_name):
    reply = client.chat.completions.create(
        model=model_name, messages=QUESTION, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    # The stop token (<|im_end|>) has a logprob too, though it adds no text.
    assert "".join(t.token for t in content).startswith(reply.choices[0].message.content)
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely
        assert bytes(token.bytes).decode() == token.token


def test_stop_strings(client, model_name):
    reply = client.chat.completions.create(model=model_name, messages=QUESTION, stop=[" Paris"], **GREEDY)
    assert reply.choices[0].finish_reason == "stop" and "Paris" not in reply.choices[0].message.content


def test_tools_are_accepted(client, model_name):
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    reply = client.chat.completions.create(
        model=model_name, messages=QUESTION, tools=[tool], tool_choice="auto", **GREEDY
    )
    assert reply.choices[0].message.content is not None


def test_completions(client, model_name):
    reply = client.completions.create(model=model_name, prompt="The capital of France is", **GREEDY)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens <= 8


def test_completions_batch_and_token_ids(client, model_name):
    texts = ["One, two,", "Monday, Tuesday,"]
    batch = client.completions.create(model=model_name, prompt=texts, **GREEDY)
    solo = [client.completions.create(model=model_name, prompt=t, **GREEDY).choices[0].text for t in texts]
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == solo
    ids = client.completions.create(model=model_name, prompt=[1, 2, 3], **GREEDY)  # token ids
    assert ids.usage.prompt_tokens == 3


def test_completions_logprobs_and_stream(client, model_name):
    reply = client.completions.create(model=model_name, prompt="One, two,", logprobs=2, echo=False, **GREEDY)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens).startswith(reply.choices[0].text)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    stream = client.completions.create(model=model_name, prompt="One, two,", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == reply.choices[0].text


def test_completions_echo(client, model_name):
    reply = client.completions.create(model=model_name, prompt="One, two,", echo=True, **GREEDY)
    assert reply.choices[0].text.startswith("One, two,")


# -- errors: always {"error": {"message", "type", "param", "code"}} -----------------------------


def post(server, path: str, **kwargs):
    with server.client() as http:
        return http.post(path, **kwargs)


def error_of(response) -> dict:
    return response.json()["error"]


def test_bad_json_is_400(server):
    response = post(
        server, "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]


def test_wrong_types_are_422_naming_the_field(server):
    response = post(server, "/v1/chat/completions", json={"messages": "hello"})
    assert response.status_code == 422 and error_of(response)["param"] == "messages"
    response = post(server, "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": "many"})
    assert response.status_code == 422 and error_of(response)["param"] == "max_tokens"
    response = post(server, "/v1/chat/completions", json={"messages": [{"content": "hi"}]})
    assert response.status_code == 422 and error_of(response)["param"] == "messages.0.role"


def test_out_of_range_is_400_naming_the_field(client, model_name):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_name, messages=QUESTION, temperature=-1, max_tokens=4)
    assert caught.value.body["param"] == "temperature" and ">= 0" in caught.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"


def test_too_long_prompt_is_400_with_both_numbers(client, model_name):
    long_text = "hello " * 1200  # > --max-model-len 1024
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt=long_text, max_tokens=16)
    message = caught.value.body["message"]
    assert "1024" in message and "16" in message and "tokens" in message
    with pytest.raises(openai.BadRequestError) as caught:  # no max_tokens: no room left at all
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": long_text}])
    assert "1024" in caught.value.body["message"]


def test_unknown_response_format_is_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model_name, messages=QUESTION, response_format={"type": "xml"}, max_tokens=4
        )
    assert caught.value.body["param"] == "response_format" and "xml" in caught.value.body["message"]
    ok = client.chat.completions.create(
        model=model_name, messages=QUESTION, response_format={"type": "text"}, **GREEDY
    )
    assert ok.choices[0].message.content


def test_unknown_route_is_404_in_openai_shape(server):
    with server.client() as http:
        response = http.get("/v1/nothing")
    assert response.status_code == 404 and error_of(response)["type"] == "invalid_request_error"


def test_request_id_is_echoed(server):
    with server.client() as http:
        response = http.get("/v1/models", headers={"X-Request-ID": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"
    assert "[trace-123]" in server.log()  # the access log line carries it


def test_metrics_scrape(server, client, model_name):
    client.chat.completions.create(model=model_name, messages=QUESTION, **GREEDY)
    with server.client() as http:
        text = http.get("/metrics").text
    for name in (
        'glmserve_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}',
        "glmserve_time_to_first_token_seconds_bucket",
        "glmserve_inter_token_latency_seconds_bucket",
        "glmserve_generation_tokens_total",
        "glmserve_prompt_tokens_total",
        "glmserve_num_requests_running",
        "glmserve_num_requests_waiting",
        "glmserve_kv_cache_usage_ratio",
        "glmserve_prefix_cache_hit_rate",
    ):
        assert name in text, name
