"""Structured output cost on the bundled model: 16 concurrent requests decoding under a JSON schema vs
the same 16 unconstrained, in one run, and the grammar compile time of a 50-field schema.

    .venv/bin/python benchmarks/structured.py [--new-tokens 128] [--runs 3]

Both sides generate exactly --new-tokens tokens per request (the schema asks for a long array, so
its grammar never ends first; the free side ignores EOS), greedy, so the work differs only by the
grammar: a bitmask per constrained row per step (llguidance), applied in the sampler, and each token
fed to its matcher. Throughput = generated tokens / wall time of the batch (prefill included, the
same on both sides). Compile time: a fresh engine's first request with a never-seen 50-field schema
(tokenizer build reported apart), then the same schema again (cached). Prints a table, writes
benchmarks/results/structured.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import median_of, print_table, save_json

from glmserve import LLM, SamplingParams
from glmserve.engine.sampling_params import StructuredOutputsParams
from glmserve.engine.structured_output import fill_bitmasks

TOPICS = [
    "a trip to Japan", "a birthday party", "moving house", "a science fair", "a wedding", "a camping weekend",
    "a product launch", "a school year", "a garden", "a marathon", "a hackathon", "a family dinner",
    "a book club", "a road trip", "a conference", "a new puppy",
]  # fmt: skip
LONG_LIST = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "tasks": {
            "type": "array",
            "minItems": 200,  # longer than any run: the grammar never ends before max_tokens
            "items": {
                "type": "object",
                "properties": {"task": {"type": "string", "maxLength": 60}, "done": {"type": "boolean"}},
                "required": ["task", "done"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "tasks"],
    "additionalProperties": False,
}


def fifty_fields(salt: int) -> dict:
    kinds = [{"type": "string", "maxLength": 40}, {"type": "integer", "minimum": 0}, {"type": "boolean"},
             {"enum": ["low", "medium", "high"]}, {"type": "array", "items": {"type": "number"}}]  # fmt: skip
    properties = {f"field_{salt}_{i}": kinds[i % len(kinds)] for i in range(50)}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def run_batch(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == len(prompts) * params.max_tokens, "a request ended early: the sides did unequal work"
    return tokens / elapsed


def mask_ms(llm: LLM, prompts: list[list[int]]) -> float:
    """One step's bitmasks for 16 rows, each a few tokens into the schema."""
    compiler = llm.engine.grammars
    matchers = [compiler.matcher(StructuredOutputsParams(json=LONG_LIST)) for _ in prompts]
    tok = llm.get_tokenizer()
    for i, m in enumerate(matchers):
        m.consume_tokens(tok.encode('{"title": "Plan ' + "x" * i, add_special_tokens=False))
    vocab = llm.engine.model_config.vocab_size
    fill_bitmasks(matchers, vocab)
    return median_of(20, lambda: _timed(lambda: fill_bitmasks(matchers, vocab))) * 1e3


def compile_times(llm_options: dict) -> dict:
    llm = LLM(**llm_options)
    start = time.perf_counter()
    llm.engine.grammars.tokenizer  # noqa: B018 - built on first use
    tokenizer_s = time.perf_counter() - start
    first = _timed(lambda: llm.engine.grammars.matcher(StructuredOutputsParams(json=fifty_fields(0))))
    cached = _timed(lambda: llm.engine.grammars.matcher(StructuredOutputsParams(json=fifty_fields(0))))
    other = _timed(lambda: llm.engine.grammars.matcher(StructuredOutputsParams(json=fifty_fields(1))))
    return {"tokenizer_build_ms": tokenizer_s * 1e3, "compile_50_fields_ms": first * 1e3,
            "compile_50_fields_other_ms": other * 1e3, "cached_ms": cached * 1e3}  # fmt: skip


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    options = {"dtype": args.dtype, "max_num_seqs": 16}
    llm = LLM(**options)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Plan {t} as a JSON to-do list."}]) for t in TOPICS]
    free = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.new_tokens, structured_outputs={"json": LONG_LIST})
    run_batch(llm, prompts, free), run_batch(llm, prompts, constrained)  # warm-up, grammar compiled
    free_tps, constrained_tps = [], []
    for _ in range(args.runs):  # interleaved, so drifts of the machine hit both sides alike
        free_tps.append(run_batch(llm, prompts, free))
        constrained_tps.append(run_batch(llm, prompts, constrained))
    free_best, constrained_best = sorted(free_tps)[len(free_tps) // 2], sorted(constrained_tps)[len(constrained_tps) // 2]
    step_mask_ms = mask_ms(llm, prompts)
    compiles = compile_times(options)
    cost = 1 - constrained_best / free_best
    print_table(
        f"16 concurrent requests, {args.new_tokens} tokens each, greedy, {args.dtype} ({torch.get_num_threads()} threads)",
        ["", "tok/s", "vs unconstrained"],
        [["unconstrained", f"{free_best:.1f}", "1.00x"],
         ["JSON schema", f"{constrained_best:.1f}", f"{constrained_best / free_best:.2f}x ({cost:+.1%} cost)"]],
    )  # fmt: skip
    print_table(
        "grammar work",
        ["what", "ms"],
        [["bitmasks of 16 rows, one step", f"{step_mask_ms:.2f}"],
         ["grammar tokenizer build (once per engine)", f"{compiles['tokenizer_build_ms']:.0f}"],
         ["compile a 50-field schema (first)", f"{compiles['compile_50_fields_ms']:.1f}"],
         ["compile another 50-field schema", f"{compiles['compile_50_fields_other_ms']:.1f}"],
         ["the same schema again (cached)", f"{compiles['cached_ms']:.2f}"]],
    )  # fmt: skip
    path = save_json("structured", {
        "new_tokens": args.new_tokens, "dtype": args.dtype, "runs": args.runs,
        "unconstrained_tok_s": free_tps, "json_schema_tok_s": constrained_tps,
        "median_cost": cost, "mask_16_rows_ms": step_mask_ms, **compiles,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
