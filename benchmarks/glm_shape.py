"""ChatGLM3-6B shape, random weights: glmserve bf16 / int8 / int4 (8-bit activations, the default, and
float activations) vs transformers bf16 on the same weights, and glmserve vs llama.cpp on the same
weights written as llama.cpp's chatglm GGUF in Q4_0 and Q8_0.

    .venv/bin/python benchmarks/glm_shape.py [--dir /tmp/glmserve-bench/chatglm3-6b] [--num-layers 28]
        [--prompt-tokens 256] [--new-tokens 32] [--runs 3] [--only glmserve-int4 ...]

Writes (or reuses) a random checkpoint of the real ChatGLM3-6B config in THUDM's layout
(safetensors shards, bf16, ~12.5 GB at full size; --num-layers scales it down) and its Q4_0 and
Q8_0 GGUF files (devtools/chatglm_gguf.py, as llama.cpp's converter writes them), then measures
each configuration in its own subprocess, never two models in memory at once:
- prefill tok/s: one prompt of --prompt-tokens, to the first token (prefix caching off);
- decode tok/s: --new-tokens single-stream greedy steps after the first token;
- peak RSS while loading, RSS in steady state (after the runs) and peak RSS overall, and load time;
- decode against the memory-bandwidth limit: the bytes of weights one decode step reads (as each
  layer stores them; the embedding reads one row) divided into this machine's read bandwidth
  (measured here: a sum over a 2 GiB buffer, all threads) gives the tok/s a step could reach if
  it only streamed the weights; the table shows the measured decode as a fraction of that.
The transformers model is built on the meta device and takes the same tensors (q/k/v split from
query_key_value, dense_h_to_4h as gate_up_proj). llama.cpp is llama-cpp-python (a source build; skipped
when absent) with 2 threads on the GGUF files, which glmserve loads too (their blocks kept exactly).
Prints one table and writes benchmarks/results/glm_shape.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import median_of, print_table, save_json

from glmserve import LLM, SamplingParams
from glmserve.devtools.chatglm_gguf import write_chatglm_gguf
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


def ensure_gguf(folder: Path, qtype: str) -> Path:
    """The checkpoint as a chatglm GGUF of `qtype` (Q4_0, Q8_0): every 2-D weight in that type."""
    from gguf import GGMLQuantizationType

    path = folder / f"chatglm3-{qtype.lower()}.gguf"
    stamp = path.with_suffix(".json")
    spec = json.loads((folder / SPEC_FILE).read_text())
    if not (path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec):
        print(f"writing {path.name} ...", flush=True)
        start = time.perf_counter()
        write_chatglm_gguf(path, folder, GGMLQuantizationType[qtype])
        stamp.write_text(json.dumps(spec))
        print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def prompt_ids(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [64790, 64792] + torch.randint(100, 60000, (n - 2,), generator=generator).tolist()


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


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


def run_glmserve(
    folder: Path, n_prompt: int, n_new: int, runs: int, quantization: str | None, precision: str = "int8",
    gguf: str | None = None,
) -> dict:
    start = time.perf_counter()
    model_path = ensure_gguf(folder, gguf) if gguf else folder
    llm = LLM(model_path, dtype="bfloat16", quantization=quantization, kv_cache_memory=256 * 2**20,
              max_model_len=n_prompt + n_new + 16, enable_prefix_caching=False,
              activation_precision=precision)  # fmt: skip
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


def run_llama_cpp(folder: Path, n_prompt: int, n_new: int, runs: int, gguf: str) -> dict:
    """llama.cpp (llama-cpp-python), 2 threads, greedy, on the same GGUF file."""
    from llama_cpp import Llama

    path = ensure_gguf(folder, gguf)
    start = time.perf_counter()
    model = Llama(str(path), n_threads=num_physical_cores(), n_threads_batch=num_physical_cores(),
                  n_ctx=n_prompt + n_new + 16, n_batch=512, verbose=False)  # fmt: skip
    load_s = time.perf_counter() - start
    load_peak = peak_rss_gib()
    seeds = iter(range(1, 1000))

    def prefill() -> float:
        model.reset()
        start = time.perf_counter()
        model.eval(prompt_ids(n_prompt, next(seeds)))
        return n_prompt / (time.perf_counter() - start)

    def decode() -> float:
        times = []
        for _ in model.generate(prompt_ids(n_prompt, next(seeds)), top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == n_new + 1:
                break
        return (len(times) - 1) / (times[-1] - times[0])

    model.eval(prompt_ids(32, 0))  # warm-up
    return {
        "load_s": load_s,
        "load_peak_rss_gib": load_peak,
        "prefill_tok_s": median_of(runs, prefill),
        "decode_tok_s": median_of(runs, decode),
        "steady_rss_gib": current_rss_gib(),
        "decode_weight_bytes": gguf_weight_bytes(path),
    }


def gguf_weight_bytes(path: Path) -> int:
    """Bytes one decode step reads from a GGUF's tensors: all of them, the embedding by one row."""
    from glmserve.gguf_file import open_gguf_file

    total = 0
    for tensor in open_gguf_file(path).tensors:
        rows = int(tensor.shape[-1]) if len(tensor.shape) == 2 else 1  # GGUF lists dims innermost first
        total += int(tensor.n_bytes) // rows if tensor.name == "token_embd.weight" else int(tensor.n_bytes)
    return total


WORKERS = {
    "glmserve-bf16": lambda *args: run_glmserve(*args, quantization="none"),
    "glmserve-int8": lambda *args: run_glmserve(*args, quantization="int8"),
    "glmserve-int8-float": lambda *args: run_glmserve(*args, quantization="int8", precision="float"),
    "glmserve-int4": lambda *args: run_glmserve(*args, quantization="int4"),
    "glmserve-int4-float": lambda *args: run_glmserve(*args, quantization="int4", precision="float"),
    "transformers-bf16": run_transformers,
    "glmserve-q4_0": lambda *args: run_glmserve(*args, quantization=None, gguf="Q4_0"),
    "llama.cpp-q4_0": lambda *args: run_llama_cpp(*args, gguf="Q4_0"),
    "glmserve-q8_0": lambda *args: run_glmserve(*args, quantization=None, gguf="Q8_0"),
    "llama.cpp-q8_0": lambda *args: run_llama_cpp(*args, gguf="Q8_0"),
}
GGUF_TYPES = {"q4_0": "Q4_0", "q8_0": "Q8_0"}  # worker suffix -> the file it reads


def has_llama_cpp() -> bool:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped, llama_cpp is not importable (pip install llama-cpp-python, a source build)")
        return False
    return True


def run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--dir", str(args.dir), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, spec: dict, bandwidth_gbs: float, results: dict[str, dict]) -> None:
    base = results.get("glmserve-bf16")
    for name, r in results.items():
        peer = results.get(name.replace("glmserve-", "llama.cpp-")) if name.startswith("glmserve-q") else None
        r["vs_llama_cpp"] = f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else "-"
    for r in results.values():
        r["bandwidth_limit_tok_s"] = bandwidth_gbs * 1e9 / r["decode_weight_bytes"]
        r["decode_fraction_of_limit"] = r["decode_tok_s"] / r["bandwidth_limit_tok_s"]
    header = ["measure", *results]
    measures = [
        ("prefill (tok/s)", "prefill_tok_s", "{:.1f}"),
        ("decode (tok/s)", "decode_tok_s", "{:.2f}"),
        ("decode vs glmserve bf16", None, "{:.2f}x"),
        ("decode vs llama.cpp, same GGUF", "vs_llama_cpp", "{}"),
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
    names = [n for n in args.only or WORKERS if not (n.startswith("llama.cpp") and not has_llama_cpp())]
    for suffix, qtype in GGUF_TYPES.items():
        if any(n.endswith(suffix) for n in names):
            ensure_gguf(args.dir, qtype)  # before any worker: writing it is no one's load time
    bandwidth = read_bandwidth_gbs()
    results = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        results[name] = run_worker(name, args)
    report(args, spec, bandwidth, results)


if __name__ == "__main__":
    main()
