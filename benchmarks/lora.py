"""Mixed LoRA batches on the bundled model: 16 concurrent requests spread over 4 adapters vs the same 16
on the base model, in one run, and the memory the adapters add.

    .venv/bin/python benchmarks/lora.py [--new-tokens 128] [--runs 3] [--rank 8]

The adapters are random (glmserve.devtools.random_lora), rank --rank on all seven linear layers of every
decoder layer (q/k/v/o/gate/up/down: the most work an adapter can add). Both sides generate exactly
--new-tokens tokens per request, greedy; throughput = generated tokens / wall time of the batch
(prefill included, the same on both sides). Prints a table, writes benchmarks/results/lora.json. Run it
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, save_json

from glmserve import LLM, SamplingParams
from glmserve.devtools.random_lora import write_random_lora
from glmserve.model_path import find_bundled_model

TOPICS = [
    "Japan", "birthdays", "moving house", "science fairs", "weddings", "camping", "product launches", "school",
    "gardens", "marathons", "hackathons", "family dinners", "book clubs", "road trips", "conferences", "puppies",
]  # fmt: skip
NUM_ADAPTERS = 4


def run_batch(llm: LLM, prompts: list[list[int]], params: SamplingParams, loras) -> float:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora=loras)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == len(prompts) * params.max_tokens
    return tokens / elapsed


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def lora_bytes(llm: LLM) -> int:
    stacks = llm.engine.runner.lora.stacks.values()
    return sum(s.a.numel() * s.a.element_size() + s.bt.numel() * s.bt.element_size() for s in stacks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    model = find_bundled_model()
    # A KV pool of fixed size, touched whole before measuring: the memory compared is the adapters',
    # not KV pages the mixed batches touch first (they cannot reuse the base's cached prefixes).
    llm = LLM(model, dtype=args.dtype, max_num_seqs=16, kv_cache_memory=512 * 2**20)
    llm.engine.runner.zero_new_blocks(llm.engine.block_manager.num_blocks)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}]) for t in TOPICS]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    run_batch(llm, prompts, params, None)  # warm-up: the KV blocks a batch uses are touched
    base_rss = rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(NUM_ADAPTERS):
            llm.add_lora(f"adapter{i}", write_random_lora(model, Path(tmp) / f"a{i}", rank=args.rank, seed=i))
    adapter_bytes = sum(a.num_bytes for a in llm.engine.loras.values())
    mixed = [f"adapter{i % NUM_ADAPTERS}" for i in range(len(prompts))]
    run_batch(llm, prompts, params, mixed)  # warm-up
    base_tps, mixed_tps = [], []
    for _ in range(args.runs):  # interleaved, so drifts of the machine hit both sides alike
        base_tps.append(run_batch(llm, prompts, params, None))
        mixed_tps.append(run_batch(llm, prompts, params, mixed))
    base, lora = sorted(base_tps)[len(base_tps) // 2], sorted(mixed_tps)[len(mixed_tps) // 2]
    print_table(
        f"16 concurrent requests, {args.new_tokens} tokens each, greedy, {args.dtype} ({torch.get_num_threads()} threads)",
        ["", "tok/s", "vs base"],
        [["base model", f"{base:.1f}", "1.00x"],
         [f"{NUM_ADAPTERS} LoRA adapters (rank {args.rank}), mixed", f"{lora:.1f}", f"{lora / base:.2f}x"]],
    )  # fmt: skip
    stacks, lora_rss = lora_bytes(llm), rss_bytes()
    budget = (base_rss + adapter_bytes) * 1.1
    print_table(
        "memory (resident set of this process)",
        ["what", "MiB"],
        [["base model serving (after a 16-request batch)", f"{base_rss / 2**20:.1f}"],
         [f"{NUM_ADAPTERS} adapters' weights (in {args.dtype})", f"{adapter_bytes / 2**20:.1f}"],
         ["adapter stacks resident", f"{stacks / 2**20:.1f}"],
         [f"with the {NUM_ADAPTERS} adapters, after mixed batches", f"{lora_rss / 2**20:.1f}"],
         ["target: (base + adapters) x 1.1", f"{budget / 2**20:.1f} ({'met' if lora_rss <= budget else 'MISSED'})"]],
    )  # fmt: skip
    path = save_json("lora", {
        "new_tokens": args.new_tokens, "dtype": args.dtype, "runs": args.runs, "rank": args.rank,
        "base_tok_s": base_tps, "mixed_lora_tok_s": mixed_tps, "ratio": lora / base,
        "base_rss_bytes": base_rss, "adapter_bytes": adapter_bytes, "stack_bytes": stacks, "lora_rss_bytes": lora_rss,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
