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
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {
            f"adapter{i}": write_random_lora(model, Path(tmp) / f"a{i}", rank=args.rank, seed=i) for i in range(NUM_ADAPTERS)
        }
        llm = LLM(model, dtype=args.dtype, max_num_seqs=16, lora_modules=adapters)
    weights_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    adapter_bytes = sum(a.num_bytes for a in llm.engine.loras.values())
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}]) for t in TOPICS]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    mixed = [f"adapter{i % NUM_ADAPTERS}" for i in range(len(prompts))]
    run_batch(llm, prompts, params, None), run_batch(llm, prompts, params, mixed)  # warm-up
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
    stacks = lora_bytes(llm)
    print_table(
        "memory",
        ["what", "MiB"],
        [["model weights (as loaded)", f"{weights_bytes / 2**20:.1f}"],
         [f"{NUM_ADAPTERS} adapters' files (in {args.dtype})", f"{adapter_bytes / 2**20:.1f}"],
         ["adapter stacks resident", f"{stacks / 2**20:.1f}"]],
    )  # fmt: skip
    path = save_json("lora", {
        "new_tokens": args.new_tokens, "dtype": args.dtype, "runs": args.runs, "rank": args.rank,
        "base_tok_s": base_tps, "mixed_lora_tok_s": mixed_tps, "ratio": lora / base,
        "weights_bytes": weights_bytes, "adapter_bytes": adapter_bytes, "stack_bytes": stacks,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
