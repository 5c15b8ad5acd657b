"""AsyncEngine: many concurrent callers each get exactly their own tokens; aborts free blocks."""

import asyncio

import pytest

from glmserve import SamplingParams
from glmserve.config import EngineConfig
from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.llm_engine import LLMEngine
from glmserve.tokenization import load_tokenizer
from glmserve.tokenization.detokenize import TextDetokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(bundled_gguf):
    config = EngineConfig(dtype="float32", kv_cache_memory=64 * 2**20, activation_precision="float")
    detokenizer = TextDetokenizer(load_tokenizer(bundled_gguf))
    async_engine = AsyncEngine(lambda: LLMEngine(bundled_gguf, config, detokenizer))
    yield async_engine
    async_engine.shutdown()


async def collect(engine: AsyncEngine, request_id: str, prompt: list[int], params=GREEDY) -> list[int]:
    tokens = []
    async for out in engine.generate(request_id, prompt, params):
        tokens.extend(out.new_token_ids)
    return tokens


def prompt_for(i: int) -> list[int]:
    return [1] + [100 + (i * 37 + j) % 5000 for j in range(5 + i % 7)]


def test_concurrent_callers_get_their_own_tokens(engine):
    async def main():
        num = 24
        solo = [await collect(engine, f"solo-{i}", prompt_for(i)) for i in range(4)]
        together = await asyncio.gather(*(collect(engine, f"c-{i}", prompt_for(i)) for i in range(num)))
        return solo, together

    solo, together = asyncio.run(main())
    assert together[:4] == solo
    assert all(len(t) == 8 for t in together)
    assert engine.stats()["num_running"] == 0


def test_invalid_request_raises_before_streaming(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(engine, "bad", [])

    asyncio.run(main())


def test_abort_by_leaving_the_stream_frees_blocks(engine):
    block_manager = engine.engine.block_manager

    async def main():
        free_before = block_manager.num_free_blocks
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        async for _ in engine.generate("leaver", prompt_for(3), params):
            break
        for _ in range(100):  # the engine thread applies the abort at its next step boundary
            if block_manager.num_free_blocks == free_before and engine.num_unfinished == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())


def test_stats_report_throughput(engine):
    asyncio.run(collect(engine, "stats", prompt_for(1)))
    stats = engine.stats()
    for key in ("num_running", "num_waiting", "kv_cache_usage", "prefix_cache_hit_rate", "generation_tokens_per_s"):
        assert key in stats
    assert stats["num_generated_tokens"] >= 8
