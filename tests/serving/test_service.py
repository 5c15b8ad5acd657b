"""The chat service in process, as the web UI uses it, and create_app with engines handed in."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from glmserve.config import EngineConfig
from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.llm_engine import LLMEngine
from glmserve.serving.app import create_app
from glmserve.serving.errors import InvalidRequest, QueueFull
from glmserve.serving.registry import ModelRegistry, wrap_engines
from glmserve.serving.service import ChatService
from glmserve.serving.settings import ServeSettings
from glmserve.tokenization import load_tokenizer
from glmserve.tokenization.detokenize import TextDetokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(bundled_gguf):
    config = EngineConfig(dtype="float32", kv_cache_memory=64 * 2**20, max_model_len=512, activation_precision="float")
    tokenizer = load_tokenizer(bundled_gguf)
    engine = AsyncEngine(lambda: LLMEngine(bundled_gguf, config, TextDetokenizer(tokenizer)))
    yield engine, tokenizer  # as create_app and wrap_engines take them
    engine.shutdown()


def service_for(engine, max_queue: int = 8) -> ChatService:
    return ChatService(ModelRegistry(wrap_engines({"smol": engine})), max_queue=max_queue)


def test_chat_and_stream_agree(engine):
    service = service_for(engine)

    async def main():
        [whole] = await service.chat(QUESTION, temperature=0, max_tokens=8)
        pieces = [
            out.text_delta async for _, out in service.stream_chat(QUESTION, temperature=0, max_tokens=8)
        ]
        return whole, "".join(pieces)

    whole, streamed = asyncio.run(main())
    assert "Paris" in whole.text and streamed == whole.text
    assert whole.finish_reason in ("stop", "length") and whole.num_prompt_tokens > 10


def test_defaults_fill_the_context(engine):
    service = service_for(engine)
    model = service.model()
    params = service.sampling_params(model, num_prompt_tokens=100)
    assert params.max_tokens == model.max_sequence_len - 100
    assert (params.temperature, params.top_p) == (model.defaults.temperature, model.defaults.top_p)
    assert service.sampling_params(model, 100, max_length=150).max_tokens == 50
    with pytest.raises(InvalidRequest, match=r"prompt \(600 tokens\).*512"):
        service.sampling_params(model, num_prompt_tokens=600)


def test_queue_limit(engine):
    service = service_for(engine, max_queue=2)

    async def main():
        holder = service.stream_chat(QUESTION, n=2, max_tokens=200, ignore_eos=True)
        await anext(holder)  # both slots taken
        with pytest.raises(QueueFull):
            await service.chat(QUESTION, max_tokens=4)
        await holder.aclose()  # leaving aborts both choices
        [answer] = await service.chat(QUESTION, max_tokens=4)
        return answer

    assert asyncio.run(main()).finish_reason is not None
    assert service.model().num_unfinished == 0


def test_create_app_with_engines(engine):
    app = create_app(ServeSettings(), engines={"smol": engine})
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["smol"]
        answer = client.post("/smol", json={"prompt": "Hi", "max_length": 60, "temperature": 0}).json()
        assert answer["status"] == 200 and answer["response"]
    # Handed-in engines are left running for their owner.
    [answer] = asyncio.run(service_for(engine).chat(QUESTION, max_tokens=4))
    assert answer.finish_reason is not None
