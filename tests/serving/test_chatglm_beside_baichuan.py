"""A ChatGLM3-format and a Baichuan2-format checkpoint (random weights, real tokenizers, written by the
random-checkpoint tool) served by one process, as the seed deployment did with `/chatglm` beside
`/baichuan`. The weights are random, so only status, shapes and routing are checked: each route
must reach its own model, which shows in prompt token counts (the tokenizers differ)."""

import openai
import pytest
import requests
import torch
from server_process import running_server

from glmserve.chat.defaults import generation_defaults
from glmserve.devtools.random_checkpoint import (
    CheckpointSpec,
    load_config,
    scale_config,
    write_random_checkpoint,
)
from glmserve.tokenization import load_tokenizer

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "256"]
SIZES = {
    "chatglm3-6b": dict(
        num_layers=1, hidden_size=32, num_attention_heads=2, multi_query_group_num=1, ffn_hidden_size=48
    ),
    "baichuan2-13b": dict(num_layers=1, hidden_size=40, num_attention_heads=5, ffn_hidden_size=48),
}
QUESTION = "你好，介绍一下你自己 please"


def write_checkpoint(out, preset):
    config, tokenizer_dirs = load_config(preset)
    spec = CheckpointSpec(
        scale_config(config, **SIZES[preset]), out, dtype=torch.float32, tokenizer_dirs=tokenizer_dirs
    )
    write_random_checkpoint(spec)
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-families")
    return {
        "chatglm": write_checkpoint(root / "chatglm3", "chatglm3-6b"),
        "baichuan": write_checkpoint(root / "baichuan2", "baichuan2-13b"),
    }


@pytest.fixture(scope="module")
def server(paths):
    with running_server(
        *ENGINE, "--model", f"chatglm={paths['chatglm']}", "--model", f"baichuan={paths['baichuan']}"
    ) as server:
        yield server


def expected_prompt_tokens(paths, name: str, history: list | None = None) -> int:
    messages = [
        {"role": role, "content": text}
        for q, a in history or []
        for role, text in (("user", q), ("assistant", a))
    ]
    return len(
        load_tokenizer(paths[name]).apply_chat_template([*messages, {"role": "user", "content": QUESTION}])
    )


def test_both_are_listed(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["chatglm", "baichuan"]


def test_each_answers_on_its_classic_route(server, paths):
    history = [["你好", "你好！"]]
    for name in ("chatglm", "baichuan"):
        body = {"prompt": QUESTION, "history": history, "max_length": 64, "temperature": 0.5}
        response = requests.post(f"{server.base_url}/{name}", json=body, timeout=120)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["status"] == 200 and isinstance(reply["response"], str)
        assert reply["history"][:-1] == history and reply["history"][-1][0] == QUESTION


def test_each_answers_by_model_name(server, paths):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0)
    counts = {}
    for name in ("chatglm", "baichuan"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0
        )
        assert reply.model == name and reply.usage.completion_tokens <= 4
        counts[name] = reply.usage.prompt_tokens
        assert counts[name] == expected_prompt_tokens(paths, name)
    assert counts["chatglm"] != counts["baichuan"]


def test_each_has_its_own_engine(server):
    stats = requests.get(server.base_url + "/health", timeout=10).json()["models"]
    assert sorted(stats) == ["baichuan", "chatglm"]


def test_baichuan_defaults_are_its_official_ones(paths):
    defaults = generation_defaults("baichuan", 256, {}, vocab_size=125696)
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.repetition_penalty) == (
        0.3,
        5,
        0.85,
        1.05,
    )
    assert generation_defaults("baichuan", 256, {}, vocab_size=64000).repetition_penalty == 1.1


def test_baichuan_drops_oldest_rounds_to_fit_the_budget(server):
    """context 256 - max_tokens 16: whole rounds beyond 240 prompt tokens are dropped, newest kept."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0)
    messages = [{"role": "system", "content": "你是一个助手。"}]
    for i in range(30):
        messages.append({"role": "user", "content": f"第{i}个问题：今天天气怎么样？"})
        messages.append({"role": "assistant", "content": f"第{i}个回答：今天天气很好。"})
    messages.append({"role": "user", "content": QUESTION})
    reply = client.chat.completions.create(model="baichuan", messages=messages, max_tokens=16, temperature=0)
    assert 0 < reply.usage.prompt_tokens <= 256 - 16
    with pytest.raises(openai.BadRequestError):  # ChatGLM's format has no budget: a clear 400
        client.chat.completions.create(model="chatglm", messages=messages, max_tokens=16)
