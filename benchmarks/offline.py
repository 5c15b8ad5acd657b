"""Offline generation on the bundled model: glmserve vs transformers `generate`, same dtype, same run.

    .venv/bin/python benchmarks/offline.py [--dtype bfloat16] [--new-tokens 128] [--runs 3]

Measures single-stream decode tok/s (after the first token) and the throughput of 16 prompts
in one call (generated tokens / wall time, prefill included). Peers in the same run:
transformers `generate` (same dtype, weights dequantized from the GGUF) and, when llama_cpp is
importable (`pip install llama-cpp-python`, a source build), llama.cpp on the same GGUF with 2
threads: single stream through `Llama.generate`, and the 16 prompts as 16 parallel sequences of one
context through llama.cpp's batch API (`llama_batch` with one seq_id per prompt, every step one
`llama_decode` of all live sequences, greedy), as its `batched` example does. Prints a table with
ratios and writes benchmarks/results/offline.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time

import torch
from common import median_of, print_table, save_json

from glmserve import LLM, SamplingParams
from glmserve.model_path import find_bundled_model

TOPICS = [
    "the history of the printing press",
    "how vaccines train the immune system",
    "why the sky is blue",
    "the rules of chess",
    "how a bicycle stays upright",
    "the water cycle",
    "how compilers work",
    "the life of honeybees",
    "photosynthesis",
    "the French revolution",
    "black holes",
    "how to bake bread",
    "plate tectonics",
    "the invention of the telephone",
    "how neural networks learn",
    "the Silk Road",
]


def chat_prompts(llm: LLM) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.apply_chat_template([{"role": "user", "content": f"Explain {t} in detail."}]) for t in TOPICS]


def ours_single(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    times = [time.perf_counter() for _ in llm.stream(prompt, params)]
    return (len(times) - 1) / (times[-1] - times[0])


def ours_batch(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Left-padded batch generate; returns seconds."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - start


def hf_single(model, prompt, new_tokens, pad_id) -> float:
    first = hf_generate(model, [prompt], 1, pad_id)
    full = hf_generate(model, [prompt], new_tokens, pad_id)
    return (new_tokens - 1) / (full - first)


def hf_batch(model, prompts, new_tokens, pad_id) -> float:
    return len(prompts) * new_tokens / hf_generate(model, prompts, new_tokens, pad_id)


def llama_cpp_single(prompt: list[int], new_tokens: int, runs: int) -> float | None:
    """llama.cpp greedy decode tok/s after the first token, same GGUF, 2 threads; None if absent."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    model = Llama(str(find_bundled_model()), n_threads=2, n_threads_batch=2, n_ctx=1024, verbose=False)

    def once() -> float:
        times = []
        for _ in model.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops by itself
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return (len(times) - 1) / (times[-1] - times[0])

    once()  # warm-up
    return median_of(runs, once)


def llama_cpp_batch(prompts: list[list[int]], new_tokens: int, runs: int) -> float | None:
    """llama.cpp, the prompts as parallel sequences of one context: generated tok/s, prefill included."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    model = Llama(str(find_bundled_model()), n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = len(prompts) * (max(map(len, prompts)) + new_tokens + 16)
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = len(prompts), 2, 2
    ctx = llama_cpp.llama_init_from_model(model._model.model, params)
    batch = llama_cpp.llama_batch_init(512, 0, len(prompts))
    n_vocab = model.n_vocab()

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """(token, position, seq_id, wants logits) in chunks of 512; the argmax of each wanted row."""
        picks = []
        for start in range(0, len(entries), 512):
            chunk = entries[start : start + 512]
            batch.n_tokens = len(chunk)
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                batch.seq_id[i][0] = seq
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, _, logits) in enumerate(chunk):
                if logits:
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                    picks.append(int(row.argmax()))
        return picks

    def once() -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        tokens = decode(entries)
        for step in range(new_tokens - 1):
            tokens = decode([(t, len(p) + step, s, True) for s, (t, p) in enumerate(zip(tokens, prompts, strict=True))])
        return len(prompts) * new_tokens / (time.perf_counter() - start)

    try:
        once()  # warm-up
        return median_of(runs, once)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def load_transformers(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = find_bundled_model()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


def measure_ours(dtype: str, n: int, runs: int) -> tuple[dict, list[list[int]]]:
    llm = LLM(dtype=dtype, kv_cache_memory=512 * 2**20)
    prompts = chat_prompts(llm)
    ours_batch(llm, prompts[:4], 8)  # warm-up: allocator, caches
    single = median_of(runs, lambda: ours_single(llm, prompts[0], n))
    return {"single": single, "batch16": median_of(runs, lambda: ours_batch(llm, prompts, n))}, prompts


def measure_transformers(dtype: str, prompts: list[list[int]], n: int, runs: int) -> dict:
    model = load_transformers(getattr(torch, dtype))
    hf_generate(model, prompts[:2], 4, 2)  # warm-up
    return {"single": median_of(runs, lambda: hf_single(model, prompts[0], n, 2)),
            "batch16": median_of(runs, lambda: hf_batch(model, prompts, n, 2))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    n, runs = args.new_tokens, args.runs

    ours, prompts = measure_ours(args.dtype, n, runs)
    gc.collect()

    peer = measure_transformers(args.dtype, prompts, n, runs)
    gc.collect()
    llama_cpp = {"single": llama_cpp_single(prompts[0], n, runs), "batch16": llama_cpp_batch(prompts, n, runs)}

    def ratio(ours_value: float, peer_value: float | None) -> str:
        return f"{ours_value / peer_value:.2f}x" if peer_value else "-"

    def value(v: float | None) -> str:
        return f"{v:.1f}" if v else "skipped" if llama_cpp["single"] is None else "-"

    rows = [
        ["single-stream decode (tok/s)", f"{ours['single']:.1f}", f"{peer['single']:.1f}", ratio(ours["single"], peer["single"]),
         value(llama_cpp["single"]), ratio(ours["single"], llama_cpp["single"])],
        ["16 prompts, one call (tok/s)", f"{ours['batch16']:.1f}", f"{peer['batch16']:.1f}", ratio(ours["batch16"], peer["batch16"]),
         value(llama_cpp["batch16"]), ratio(ours["batch16"], llama_cpp["batch16"])],
    ]  # fmt: skip
    print_table(
        f"Offline generation, SmolLM2-135M-Instruct, {args.dtype}, {n} new tokens, median of {runs}",
        ["measure", "glmserve", "transformers", "ratio", "llama.cpp", "ratio"],
        rows,
    )
    path = save_json("offline", {"dtype": args.dtype, "new_tokens": n, "runs": runs, "glmserve": ours,
                                 "transformers": peer, "llama.cpp": llama_cpp})  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
