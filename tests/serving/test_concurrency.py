"""Many clients at once each get their own answer; a client that leaves frees its KV blocks."""

import asyncio

import httpx
import openai
import pytest
from server_process import SMALL_ENGINE, running_server, wait_for

NUM_STREAMS = 32
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server():
    with running_server(*SMALL_ENGINE) as server:
        yield server


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write the number {i * 7 + 3} in words, then say why it is nice."}]


async def stream_answer(client: openai.AsyncOpenAI, model: str, i: int) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(model=model, messages=messages(i), stream=True, **GREEDY)
    text, finish_reason = "", None
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return text, finish_reason


def test_concurrent_streams_get_their_own_answers(server):
    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0
        ) as client:
            model = (await client.models.list()).data[0].id
            checked = (0, 13, NUM_STREAMS - 1)
            solo = [await stream_answer(client, model, i) for i in checked]
            together = await asyncio.wait_for(
                asyncio.gather(*(stream_answer(client, model, i) for i in range(NUM_STREAMS))), timeout=300
            )
            return checked, solo, together

    checked, solo, together = asyncio.run(main())
    assert len(together) == NUM_STREAMS
    assert all(text and reason in ("stop", "length") for text, reason in together)
    assert [together[i] for i in checked] == solo
    assert len({text for text, _ in together}) > NUM_STREAMS // 2  # distinct prompts, mostly distinct answers


def health(server) -> dict:
    return next(iter(httpx.get(server.base_url + "/health", timeout=10).json()["models"].values()))


def is_idle(server) -> bool:
    stats = health(server)
    return (
        stats["num_unfinished"] == 0
        and stats["num_running"] == 0
        and stats["num_free_blocks"] == stats["num_blocks"]
    )


def test_disconnect_mid_stream_frees_blocks(server):
    assert wait_for(lambda: is_idle(server), timeout_s=30)
    generated_before = health(server)["num_generated_tokens"]
    body = {"messages": messages(1), "stream": True, "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            chunks = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in chunks)
            during = health(server)
            assert during["num_unfinished"] == 1 and during["num_free_blocks"] < during["num_blocks"]
        # Leaving the `with` closes the connection mid-stream.
    assert wait_for(lambda: is_idle(server), timeout_s=30), health(server)
    assert health(server)["num_generated_tokens"] - generated_before < 300  # aborted, not run to the end


def test_disconnect_while_waiting_for_a_whole_answer_frees_blocks(server):
    assert wait_for(lambda: is_idle(server), timeout_s=30)
    generated_before = health(server)["num_generated_tokens"]
    body = {"messages": messages(2), "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert wait_for(lambda: is_idle(server), timeout_s=30), health(server)
    assert health(server)["num_generated_tokens"] - generated_before < 300
