"""N concurrent streams through AsyncEngine on the bundled model.

    .venv/bin/python benchmarks/serving.py [--streams 1 4 16 64] [--new-tokens 64] [--dtype auto]

For each N: aggregate generated tok/s, time to first token p50/p99 and inter-token latency
p50/p99 over all streams. Peer in the same run: transformers' batched `generate` on the same
GGUF (bf16) with N prompts in one batch (it has no streaming scheduler, so only its aggregate
tok/s is comparable). Writes benchmarks/results/serving.json. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import percentile, print_table, save_json

from glmserve import SamplingParams
from glmserve.config import EngineConfig
from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.llm_engine import LLMEngine
from glmserve.model_path import find_bundled_model
from glmserve.tokenization import Tokenizer, load_tokenizer
from glmserve.tokenization.detokenize import TextDetokenizer

QUESTIONS = [
    "Explain how {} works.", "Write a short story about {}.", "What are the pros and cons of {}?",
    "Describe the history of {}.",
]
TOPICS = ["rainbows", "volcanoes", "bicycles", "the internet", "coffee", "glaciers", "satellites", "bees"]


def prompts(tok: Tokenizer, count: int) -> list[list[int]]:
    texts = [QUESTIONS[i % 4].format(TOPICS[i % 8]) + f" (request {i})" for i in range(count)]
    return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


async def one_stream(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list[float]:
    times = [time.perf_counter()]
    async for _ in engine.generate(request_id, prompt, params):
        times.append(time.perf_counter())
    return times


async def run_load(engine: AsyncEngine, batch: list[list[int]], new_tokens: int, tag: str) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    runs = await asyncio.gather(*(one_stream(engine, f"{tag}-{i}", p, params) for i, p in enumerate(batch)))
    elapsed = time.perf_counter() - start
    ttft = [t[1] - t[0] for t in runs]
    itl = [b - a for t in runs for a, b in zip(t[1:], t[2:], strict=False)]
    return {
        "streams": len(batch),
        "tokens_per_s": len(batch) * new_tokens / elapsed,
        "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99),
    }


def transformers_batch(batch: list[list[int]], new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    path = find_bundled_model()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
    width = max(len(p) for p in batch)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return len(batch) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = parser.parse_args()

    config = EngineConfig(dtype=args.dtype, kv_cache_memory=1 << 30)
    tokenizer = load_tokenizer(find_bundled_model())
    detokenizer = TextDetokenizer(tokenizer)
    engine = AsyncEngine(lambda: LLMEngine(find_bundled_model(), config, detokenizer))  # loads on its thread
    all_prompts = prompts(tokenizer, max(args.streams))
    asyncio.run(run_load(engine, all_prompts[:4], 8, "warmup"))
    results = [asyncio.run(run_load(engine, all_prompts[:n], args.new_tokens, f"n{n}")) for n in args.streams]
    engine.shutdown()
    del engine

    peer = {} if args.no_peer else {r["streams"]: transformers_batch(all_prompts[: r["streams"]], args.new_tokens) for r in results}
    single = results[0]
    rows = []
    for r in results:
        n = r["streams"]
        rows.append([
            n, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / single['tokens_per_s']:.2f}x",
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}", f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}",
            f"{r['itl_p99_ms'] / single['itl_p99_ms']:.2f}x",
            f"{peer[n]:.1f}" if n in peer else "-", f"{r['tokens_per_s'] / peer[n]:.2f}x" if n in peer else "-",
        ])
    print_table(
        f"AsyncEngine, bundled SmolLM2-135M, dtype {args.dtype}, {args.new_tokens} new tokens per stream",
        ["streams", "tok/s", "vs 1 stream", "TTFT p50/p99 ms", "ITL p50/p99 ms", "ITL p99 vs 1",
         "transformers batch tok/s", "ratio"],
        rows,
    )
    path = save_json("serving", {"dtype": args.dtype, "new_tokens": args.new_tokens, "glmserve": results,
                                 "transformers_batch_tokens_per_s": peer})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
