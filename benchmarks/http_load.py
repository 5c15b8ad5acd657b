"""N concurrent HTTP streaming clients against `glmserve serve`, next to the same load run in
process through AsyncEngine (benchmarks/serving.py's figure) and against llama.cpp's server.

    .venv/bin/python benchmarks/http_load.py [--clients 1 4 16] [--new-tokens 64] [--dtype auto]

Each client streams one chat completion (greedy, `new_tokens` tokens) from /v1/chat/completions.
For each N: aggregate generated tok/s, time to first token p50/p99 and inter-token latency
p50/p99 over all streams, and HTTP tok/s as a fraction of the in-process AsyncEngine figure.
The peer, llama-cpp-python's OpenAI server (`python -m llama_cpp.server`), runs when llama_cpp is
importable, on the same GGUF, prompts and client load. Servers run one at a time on 127.0.0.1.
Writes benchmarks/results/http_load.json. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from common import percentile, print_table, save_json

from glmserve.model_path import find_bundled_model
from serving import QUESTIONS, TOPICS, run_load

STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


def questions(count: int) -> list[str]:
    """The texts behind serving.py's prompts, so both runs decode the same prompt ids."""
    return [QUESTIONS[i % 4].format(TOPICS[i % 8]) + f" (request {i})" for i in range(count)]


# -- clients ------------------------------------------------------------------------------------


async def one_stream(http: httpx.AsyncClient, url: str, body: dict) -> list[float]:
    """Send one streamed chat completion; the start time, then the arrival time of each token."""
    times = [time.perf_counter()]
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and _has_text(json.loads(line[6:])):
                times.append(time.perf_counter())
    return times


def _has_text(chunk: dict) -> bool:
    """A chunk carrying generated text (not the role-only opener or a usage summary)."""
    choices = chunk.get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def http_load(base_url: str, texts: list[str], new_tokens: int, extra: dict) -> dict:
    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        bodies = [
            {
                "messages": [{"role": "user", "content": t}],
                "max_tokens": new_tokens,
                "temperature": 0,
                "stream": True,
                **extra,
            }
            for t in texts
        ]
        await one_stream(http, "/v1/chat/completions", {**bodies[0], "max_tokens": 4})  # warm up
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(http, "/v1/chat/completions", b) for b in bodies))
        elapsed = time.perf_counter() - start
    return summarize(runs, elapsed)


def summarize(runs: list[list[float]], elapsed: float) -> dict:
    ttft = [t[1] - t[0] for t in runs if len(t) > 1]
    itl = [b - a for t in runs for a, b in zip(t[1:], t[2:], strict=False)]
    num_tokens = sum(len(t) - 1 for t in runs)
    return {
        "streams": len(runs),
        "tokens": num_tokens,
        "tokens_per_s": num_tokens / elapsed,
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "itl_p50_ms": 1000 * percentile(itl, 50) if itl else 0.0,
        "itl_p99_ms": 1000 * percentile(itl, 99) if itl else 0.0,
    }


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(command: list[str], port: int, ready_path: str) -> Iterator[str]:
    """Start a server, wait until `ready_path` answers 200, stop it with SIGTERM afterwards."""
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(process, base_url + ready_path, log)
            yield base_url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def wait_ready(process: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read().decode()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s")


def glmserve_command(args: argparse.Namespace, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "glmserve.cli.serve",
        "--model",
        str(args.model),
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--kv-cache-memory",
        "1GiB",
        "--max-queue",
        "4096",
        "--log-level",
        "warning",
    ]


def llama_cpp_command(args: argparse.Namespace, port: int) -> list[str]:
    threads = str(os.cpu_count() or 2)
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        threads,
        "--n_ctx",
        "4096",
    ]


def run_server_loads(command: list[str], port: int, ready: str, args, extra: dict) -> list[dict]:
    texts = questions(max(args.clients))
    with server_process(command, port, ready) as base_url:
        return [asyncio.run(http_load(base_url, texts[:n], args.new_tokens, extra)) for n in args.clients]


# -- the in-process figure ----------------------------------------------------------------------


def engine_loads(args: argparse.Namespace) -> list[dict]:
    from glmserve.config import EngineConfig
    from glmserve.engine.async_engine import AsyncEngine
    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.tokenization import load_tokenizer
    from glmserve.tokenization.detokenize import TextDetokenizer

    config = EngineConfig(dtype=args.dtype, kv_cache_memory=1 << 30)
    tok = load_tokenizer(args.model)
    engine = AsyncEngine(lambda: LLMEngine(args.model, config, TextDetokenizer(tok)))  # loads on its thread
    batch = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in questions(max(args.clients))]
    try:
        asyncio.run(run_load(engine, batch[:2], 4, "warmup"))
        return [asyncio.run(run_load(engine, batch[:n], args.new_tokens, f"n{n}")) for n in args.clients]
    finally:
        engine.shutdown()


# -- report -------------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    baseline = {r["streams"]: r["tokens_per_s"] for r in results.get("asyncengine", [])}
    rows = []
    for target, runs in results.items():
        for r in runs:
            n = r["streams"]
            ratio = f"{r['tokens_per_s'] / baseline[n]:.2f}" if n in baseline else "-"
            rows.append(
                [
                    target,
                    n,
                    f"{r['tokens_per_s']:.1f}",
                    ratio,
                    f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}",
                    f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}",
                ]
            )
    print_table(
        f"HTTP streaming load, {args.model.name}, dtype {args.dtype}, {args.new_tokens} new tokens per client",
        ["target", "clients", "tok/s", "vs AsyncEngine", "TTFT p50/p99 ms", "ITL p50/p99 ms"],
        rows,
    )
    path = save_json(
        "http_load",
        {"model": str(args.model), "dtype": args.dtype, "new_tokens": args.new_tokens, "results": results},
    )
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", type=os.path.abspath, default=None, help="a .gguf file [default: bundled]")
    parser.add_argument(
        "--no-engine-baseline", action="store_true", help="skip the in-process AsyncEngine run"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp's server")
    args = parser.parse_args()
    args.model = Path(args.model) if args.model else find_bundled_model()

    results: dict[str, list[dict]] = {}
    if not args.no_engine_baseline:
        results["asyncengine"] = engine_loads(args)
    port = free_port()
    results["glmserve-http"] = run_server_loads(
        glmserve_command(args, port), port, "/health", args, {"ignore_eos": True}
    )
    if args.no_peer:
        pass
    elif importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped, llama_cpp is not importable (pip install 'llama-cpp-python[server]')")
    else:
        port = free_port()
        results["llama.cpp-http"] = run_server_loads(
            llama_cpp_command(args, port), port, "/v1/models", args, {}
        )
    report(args, results)


if __name__ == "__main__":
    main()
