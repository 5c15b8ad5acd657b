"""ChatGLM3-6B shape, random weights: glmserve bf16 / int8 / int4 vs transformers bf16 on the same weights.

    .venv/bin/python benchmarks/glm_shape.py [--dir /tmp/glmserve-bench/chatglm3-6b] [--num-layers 28]
        [--prompt-tokens 256] [--new-tokens 32] [--runs 3] [--only glmserve-int4 ...]

Writes (or reuses) a random checkpoint of the real ChatGLM3-6B config in THUDM's layout
(safetensors shards, bf16, ~12.5 GB at full size; --num-layers scales it down), then measures each
configuration in its own subprocess, never two models in memory at once:
- prefill tok/s: one prompt of --prompt-tokens, to the first token (prefix caching off);
- decode tok/s: --new-tokens single-stream greedy steps after the first token;
- peak RSS while loading, RSS in steady state (after the runs) and peak RSS overall, and load time;
- decode against the memory-bandwidth limit: the bytes of weights one decode step reads (as each
  layer stores them; the embedding reads one row) divided into this machine's read bandwidth
  (measured here: a sum over a 2 GiB buffer, all threads) gives the tok/s a step could reach if
  it only streamed the weights; the table shows the measured decode as a fraction of that.
The transformers model is built on the meta device and takes the same tensors (q/k/v split from
query_key_value, dense_h_to_4h as gate_up_proj). Prints one table and writes
benchmarks/results/glm_shape.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import median_of, print_table, save_json

from glmserve import LLM, SamplingParams
from glmserve.devtools.glm_layout import glm_config, to_glm_layout
from glmserve.devtools.random_checkpoint import (
    CheckpointSpec,
    load_config,
    scale_config,
    write_random_checkpoint,
)
from glmserve.engine.checkpoint.hf import open_hf_folder
from glmserve.engine.device import num_physical_cores

SPEC_FILE = "bench_spec.json"  # what the folder holds, so a later run can reuse it


def ensure_checkpoint(folder: Path, num_layers: int | None) -> dict:
    config, tokenizer_dirs = load_config("chatglm3-6b")
    config = scale_config(config, num_layers=num_layers)
    spec = {"preset": "chatglm3-6b", "num_layers": config["num_layers"], "dtype": "bfloat16", "seed": 0}
    if (folder / SPEC_FILE).is_file() and json.loads((folder / SPEC_FILE).read_text()) == spec:
        return spec
    print(f"writing a random {config['num_layers']}-layer ChatGLM3-6B checkpoint to {folder} ...", flush=True)
    start = time.perf_counter()
    num_shards = max(1, config["num_layers"] // 4)  # the official release has 7 shards for 28 layers
    write_random_checkpoint(
        CheckpointSpec(
            config, folder, "safetensors", num_shards, 0, torch.bfloat16, tokenizer_dirs=tokenizer_dirs
        )
    )
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    return spec


def prompt_ids(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [64790, 64792] + torch.randint(100, 60000, (n - 2,), generator=generator).tolist()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20


def read_bandwidth_gbs(gib: int = 2, runs: int = 5) -> float:
    """Bytes per second a reduction streams from memory (float32, all threads), in GB/s."""
    torch.set_num_threads(num_physical_cores())
    buffer = torch.ones(gib * 2**28)  # gib GiB of float32, pages made resident by the fill

    def once() -> float:
        start = time.perf_counter()
        buffer.sum()
        return buffer.nbytes / (time.perf_counter() - start) / 1e9

    once()
    return median_of(runs, once)


def decode_weight_bytes(model: torch.nn.Module, embedding: torch.nn.Module) -> int:
    """Bytes of weights one single-token step reads: every parameter as stored (packed 4/8-bit
    layers by their packed tensors), the embedding by one row."""
    from glmserve.engine.layers.linear import Linear

    total = embedding.weight[0].nbytes
    for module in model.modules():
        if module is embedding:
            continue
        if isinstance(module, Linear) and module.packed is not None:
            total += sum(t.nbytes for t in vars(module.packed).values() if isinstance(t, torch.Tensor))
            total += module.bias.nbytes if module.bias is not None else 0
        elif isinstance(module, Linear) and module.prepacked is not None:  # dense, in oneDNN's layout
            total += module.prepacked.nbytes + (module.bias.nbytes if module.bias is not None else 0)
        else:
            total += sum(p.nbytes for p in module.parameters(recurse=False) if p is not None)
    return total


# ---------------------------------------------------------------- workers (one per process)


def run_glmserve(folder: Path, n_prompt: int, n_new: int, runs: int, quantization: str) -> dict:
    start = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", quantization=quantization, kv_cache_memory=256 * 2**20,
              max_model_len=n_prompt + n_new + 16, enable_prefix_caching=False)  # fmt: skip
    load_s = time.perf_counter() - start
    load_peak = peak_rss_gib()
    model = llm.engine.runner.model
    weight_bytes = decode_weight_bytes(model, model.transformer.embedding.word_embeddings)
    seeds = iter(range(1, 1000))

    def prefill() -> float:
        params = SamplingParams(temperature=0, max_tokens=1)
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt_ids(n_prompt, next(seeds))}, params)
        return n_prompt / (time.perf_counter() - start)

    def decode() -> float:
        params = SamplingParams(temperature=0, max_tokens=n_new + 1, ignore_eos=True)
        times = [time.perf_counter() for _ in llm.stream(prompt_ids(n_prompt, next(seeds)), params)]
        return (len(times) - 1) / (times[-1] - times[0])

    llm.generate(
        {"prompt_token_ids": prompt_ids(32, 0)}, SamplingParams(temperature=0, max_tokens=4)
    )  # warm-up
    return {
        "load_s": load_s,
        "load_peak_rss_gib": load_peak,
        "prefill_tok_s": median_of(runs, prefill),
        "decode_tok_s": median_of(runs, decode),
        "steady_rss_gib": current_rss_gib(),
        "decode_weight_bytes": weight_bytes,
    }


def load_transformers(folder: Path):
    from transformers import GlmConfig, GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    checkpoint = open_hf_folder(folder)
    thudm_config = checkpoint.config.extra
    with torch.device("meta"):
        model = GlmForCausalLM(GlmConfig(**glm_config(thudm_config, "bfloat16")))
    state = {}
    for name, tensor in checkpoint.iter_tensors(torch.bfloat16):  # the RoPE buffer is skipped
        state |= dict(to_glm_layout(name, tensor, thudm_config))
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = GlmRotaryEmbedding(model.config)  # its buffers were left on meta
    return model.eval()


def run_transformers(folder: Path, n_prompt: int, n_new: int, runs: int) -> dict:
    torch.set_num_threads(num_physical_cores())  # as the engine does
    start = time.perf_counter()
    model = load_transformers(folder)
    load_s = time.perf_counter() - start
    load_peak = peak_rss_gib()
    weight_bytes = decode_weight_bytes(model, model.model.embed_tokens)
    seeds = iter(range(1, 1000))

    @torch.inference_mode()
    def prefill() -> float:
        ids = torch.tensor([prompt_ids(n_prompt, next(seeds))])
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        return n_prompt / (time.perf_counter() - start)

    @torch.inference_mode()
    def decode() -> float:
        out = model(torch.tensor([prompt_ids(n_prompt, next(seeds))]), use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        for _ in range(n_new):  # greedy, one token per step through transformers' KV cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return n_new / (time.perf_counter() - start)

    with torch.inference_mode():
        model(torch.tensor([prompt_ids(32, 0)]), logits_to_keep=1)  # warm-up
    return {
        "load_s": load_s,
        "load_peak_rss_gib": load_peak,
        "prefill_tok_s": median_of(runs, prefill),
        "decode_tok_s": median_of(runs, decode),
        "steady_rss_gib": current_rss_gib(),
        "decode_weight_bytes": weight_bytes,
    }


WORKERS = {
    "glmserve-bf16": lambda *args: run_glmserve(*args, quantization="none"),
    "glmserve-int8": lambda *args: run_glmserve(*args, quantization="int8"),
    "glmserve-int4": lambda *args: run_glmserve(*args, quantization="int4"),
    "transformers-bf16": run_transformers,
}


def run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--dir", str(args.dir), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, spec: dict, bandwidth_gbs: float, results: dict[str, dict]) -> None:
    base = results.get("glmserve-bf16")
    for r in results.values():
        r["bandwidth_limit_tok_s"] = bandwidth_gbs * 1e9 / r["decode_weight_bytes"]
        r["decode_fraction_of_limit"] = r["decode_tok_s"] / r["bandwidth_limit_tok_s"]
    header = ["measure", *results]
    measures = [
        ("prefill (tok/s)", "prefill_tok_s", "{:.1f}"),
        ("decode (tok/s)", "decode_tok_s", "{:.2f}"),
        ("decode vs glmserve bf16", None, "{:.2f}x"),
        ("weights read per token (GB)", "decode_weight_bytes", "{:.2f}"),
        ("decode at bandwidth limit (tok/s)", "bandwidth_limit_tok_s", "{:.2f}"),
        ("decode / limit", "decode_fraction_of_limit", "{:.0%}"),
        ("peak RSS while loading (GiB)", "load_peak_rss_gib", "{:.2f}"),
        ("RSS, steady state (GiB)", "steady_rss_gib", "{:.2f}"),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
        ("load (s)", "load_s", "{:.1f}"),
    ]
    rows = []
    for label, key, fmt in measures:
        if key is None:
            cells = [
                fmt.format(r["decode_tok_s"] / base["decode_tok_s"]) if base else "-"
                for r in results.values()
            ]
        elif key == "decode_weight_bytes":
            cells = [fmt.format(r[key] / 1e9) for r in results.values()]
        else:
            cells = [fmt.format(r[key]) for r in results.values()]
        rows.append([label, *cells])
    title = (f"ChatGLM3-6B shape ({spec['num_layers']} layers), random weights, {args.prompt_tokens}-token prompt, "
             f"{args.new_tokens} new tokens, median of {args.runs}; read bandwidth {bandwidth_gbs:.1f} GB/s")  # fmt: skip
    print_table(title, header, rows)
    payload = {
        "shape": spec,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "read_bandwidth_gbs": bandwidth_gbs,
    }
    print(f"\nwrote {save_json('glm_shape', {**payload, **results})}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/glmserve-bench/chatglm3-6b"))
    parser.add_argument(
        "--num-layers", type=int, help="scale the 28-layer model down (e.g. 2 to try the script)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(WORKERS), help="run only these configurations")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args.dir, args.prompt_tokens, args.new_tokens, args.runs)
        print(json.dumps({**result, "peak_rss_gib": peak_rss_gib()}))
        return
    spec = ensure_checkpoint(args.dir, args.num_layers)
    bandwidth = read_bandwidth_gbs()
    results = {}
    for name in args.only or WORKERS:
        print(f"running {name} ...", flush=True)
        results[name] = run_worker(name, args)
    report(args, spec, bandwidth, results)


if __name__ == "__main__":
    main()
