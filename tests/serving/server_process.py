"""Helpers to run a real `glmserve serve` on 127.0.0.1 per test module, with the bundled model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 180  # model load on a busy 2-core machine
STOP_TIMEOUT_S = 60
# Small KV pool and context: quick to allocate, plenty for 8-16-token answers.
# Float activations: tests read greedy answers, which 8-bit activations may flip at near-ties
# (the bundled model's first token for "What is the capital of France?" is one) and differently
# on machines with other SIMD widths.
SMALL_ENGINE = ["--dtype", "float32", "--kv-cache-memory", "128MiB", "--max-model-len", "1024",
                "--activation-precision", "float"]  # fmt: skip


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, env: dict | None = None) -> Server:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="glmserve-test-", suffix=".log")[1])
    command = [
        sys.executable,
        "-m",
        "glmserve.cli.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    wait_until_healthy(server)
    return server


def wait_until_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()[-3000:]}")


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None) -> Iterator[Server]:
    server = start_server(*args, env=env)
    try:
        yield server
    finally:
        stop_server(server)
        server.log_path.unlink(missing_ok=True)


def wait_for(predicate, timeout_s: float = 30, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
