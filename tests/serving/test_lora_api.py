"""LoRA adapters through a real `glmserve serve --lora ...`: chosen by `model` on every route, listed with
their base as parent, loaded and unloaded at run time by admin keys, unknown names a 404 in OpenAI's shape.
The answers must equal the offline engine's with the same adapter (greedy)."""

from __future__ import annotations

import openai
import pytest
from server_process import SMALL_ENGINE, running_server

from glmserve import LLM, SamplingParams
from glmserve.devtools.random_lora import write_random_lora
from glmserve.model_path import find_bundled_model

KEY, ADMIN = "user-key", "admin-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = find_bundled_model()
    return {name: write_random_lora(model, root / name, rank=8, seed=i) for i, name in enumerate(["support", "legal", "extra"])}


@pytest.fixture(scope="module")
def server(adapters):
    args = [*SMALL_ENGINE, "--model", f"smol={find_bundled_model()}", "--lora", f"smol:support={adapters['support']}",
            "--lora", f"legal={adapters['legal']}", "--api-key", KEY, "--admin-key", ADMIN, "--no-ui"]  # fmt: skip
    with running_server(*args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, timeout=60, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def offline(adapters):
    llm = LLM(find_bundled_model(), dtype="float32", activation_precision="float", kv_cache_memory=64 * 2**20,
              lora_modules=adapters)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=12)
    return {lora: llm.chat(QUESTION, params, lora=lora)[0].outputs[0].text for lora in (None, *adapters)}


def ask(client, model: str) -> str:
    out = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    return out.choices[0].message.content


def test_models_lists_adapters_with_their_base(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"smol", "support", "legal"}
    assert cards["support"].parent == "smol" and cards["legal"].parent == "smol" and cards["smol"].parent is None


def test_each_adapter_answers_as_offline(client, offline):
    assert ask(client, "smol") == offline[None]
    assert ask(client, "support") == offline["support"]
    assert ask(client, "legal") == offline["legal"]
    assert offline["support"] != offline[None]


def test_concurrent_mixed_requests(client, offline):
    import concurrent.futures

    models = ["smol", "support", "legal"] * 3
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: ask(client, m), models))
    assert answers == [offline[None if m == "smol" else m] for m in models]


def test_classic_route_by_adapter_name(server, offline):
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        reply = http.post("/support", json={"prompt": QUESTION[0]["content"], "history": [], "temperature": 0.01,
                                            "top_p": 0.01, "max_length": 200})  # fmt: skip
        assert reply.status_code == 200 and reply.json()["response"]
        missing = http.post("/nobody", json={"prompt": "hi", "history": []})
    assert missing.status_code == 404


def test_unknown_adapter_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        ask(client, "nope")
    assert error.value.body["code"] == "model_not_found"


def test_load_and_unload_at_run_time(server, client, adapters, offline):
    body = {"lora_name": "extra", "lora_path": str(adapters["extra"])}
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as user:
        assert user.post("/v1/load_lora_adapter", json=body).status_code == 403
    with server.client(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        reply = admin.post("/v1/load_lora_adapter", json=body)
        assert reply.status_code == 200, reply.text
        assert "extra" in {m.id for m in client.models.list().data}
        assert ask(client, "extra") == offline["extra"]
        classic = {"prompt": "hi", "history": [], "max_length": 40}
        assert admin.post("/extra", json=classic).status_code == 200  # its classic route, added while serving
        again = admin.post("/v1/load_lora_adapter", json=body)
        assert again.status_code == 400 and "already served" in again.json()["error"]["message"]
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            ask(client, "extra")
        assert admin.post("/extra", json=classic).status_code == 404
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 404
        bad = admin.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(find_bundled_model().parent)})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        assert "bad" not in {m.id for m in client.models.list().data}


def test_an_adapter_that_does_not_fit_stops_the_start_in_one_line(tmp_path):
    """An adapter of a 4096-wide model on the 576-wide bundled one."""
    import json

    import torch
    from safetensors.torch import save_file
    from server_process import start_server

    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{layer}.lora_A.weight": torch.zeros(8, 4096), f"{layer}.lora_B.weight": torch.zeros(576, 8)},
              tmp_path / "adapter_model.safetensors")  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    with pytest.raises(RuntimeError, match="exited with 3") as error:
        start_server(*SMALL_ENGINE, "--no-ui", "--lora", f"wide={tmp_path}")
    lines = [line for line in str(error.value).splitlines() if "--lora wide" in line]
    assert len(lines) == 1 and "4096 -> 576 features in the adapter but 576 -> 576 in the model" in lines[0]
    assert "Traceback" not in str(error.value)
