"""The code interpreter: one Jupyter kernel (jupyter_client + ipykernel) per conversation.

Each kernel is its own process in its own temporary working directory, started through a
launcher that sets CPU-time and address-space limits (resource.setrlimit) before ipykernel runs,
with an environment holding none of the server's variables (API keys stay out of reach). A run
that passes its wall-clock timeout is interrupted (SIGINT -> KeyboardInterrupt); a kernel that
does not come back, or that died (memory, CPU limit, os._exit), is restarted, losing its state.
Kernels idle past `idle_timeout_s` are shut down at the next call. There is no network sandbox:
code can open sockets, as in THUDM's demo; run the server where that is acceptable.

    interpreter = CodeInterpreter(timeout_s=30)
    result = interpreter.run("conversation-1", "print(1 + 1)")   # ExecutionResult(stdout="2\\n", ...)
    interpreter.shutdown()
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from jupyter_client import KernelManager

# Runs in the kernel's process before ipykernel: limits first, then the kernel itself.
LAUNCHER = (
    "import resource, runpy, sys\n"
    "cpu_s, memory_bytes = int(sys.argv[1]), int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))\n"
    "resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))\n"
    "sys.argv = ['ipykernel_launcher', *sys.argv[3:]]\n"
    "runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)\n"
)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
INTERRUPT_GRACE_S = 3.0  # how long an interrupted run may take to stop before the kernel restarts
START_TIMEOUT_S = 60.0  # kernel start-up on a busy 2-core machine


@dataclass
class ExecutionResult:
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)  # text/plain of execute_result / display_data
    images: list[str] = field(default_factory=list)  # base64 PNGs
    error: str | None = None  # traceback text, or why the run was stopped
    is_timeout: bool = False
    is_restarted: bool = False  # the kernel was restarted: earlier variables are gone

    def observation(self) -> str:
        """What the model reads: the text output, images as placeholders (it cannot see them)."""
        parts = [self.stdout, self.stderr, *self.results]
        parts += [f"[image {i + 1}]" for i in range(len(self.images))]
        if self.error:
            parts.append(self.error)
        text = "\n".join(p.rstrip("\n") for p in parts if p)
        return text or "[the code ran and printed nothing]"


class _LimitedKernelManager(KernelManager):
    """Starts ipykernel through LAUNCHER (jupyter_client 8 builds the command here, from the
    kernelspec otherwise, and no longer reads a `kernel_cmd`)."""

    limits: list[str] = []  # [cpu seconds, address-space bytes]

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        return [sys.executable, "-c", LAUNCHER, *self.limits, "-f", self.connection_file]


class _Kernel:
    """One conversation's kernel process, its working directory and a blocking client."""

    def __init__(self, cpu_s: int, memory_bytes: int):
        self.workdir = tempfile.mkdtemp(prefix="glmserve-kernel-")
        self.manager = _LimitedKernelManager()
        self.manager.limits = [str(cpu_s), str(memory_bytes)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # its warnings are not ours
        self.manager.start_kernel(cwd=self.workdir, env=_kernel_env(self.workdir), **quiet)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=START_TIMEOUT_S)
        self.lock = threading.Lock()  # one run at a time per conversation
        self.last_used = time.monotonic()

    def restart(self) -> None:
        self.client.stop_channels()
        self.manager.restart_kernel(now=True)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=START_TIMEOUT_S)

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _kernel_env(workdir: str) -> dict[str, str]:
    """A minimal environment: nothing of the server's (its API key, tokens) reaches user code."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",  # plots render to PNG, never to a display
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per thread otherwise
    }


class CodeInterpreter:
    """Kernels by conversation id; `run` is blocking (call it from a thread in async code)."""

    def __init__(
        self,
        timeout_s: float = 30.0,
        cpu_limit_s: int = 300,
        memory_limit_bytes: int = 2 * 2**30,
        idle_timeout_s: float = 600.0,
    ):
        self.timeout_s = timeout_s
        self.cpu_limit_s = cpu_limit_s  # per kernel lifetime: past it the kernel is killed, then restarted
        self.memory_limit_bytes = memory_limit_bytes  # address space: a large allocation is a MemoryError
        self.idle_timeout_s = idle_timeout_s
        self._kernels: dict[str, _Kernel] = {}
        self._lock = threading.Lock()

    def run(self, conversation_id: str, code: str, timeout_s: float | None = None) -> ExecutionResult:
        self.reap_idle()
        kernel = self._kernel(conversation_id)
        with kernel.lock:
            kernel.last_used = time.monotonic()
            result = self._execute(kernel, code, timeout_s or self.timeout_s)
            kernel.last_used = time.monotonic()
        return result

    def workdir(self, conversation_id: str) -> str:
        return self._kernel(conversation_id).workdir

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            kernel = self._kernels.pop(conversation_id, None)
        if kernel is not None:
            kernel.shutdown()

    def reap_idle(self) -> list[str]:
        """Shut down kernels idle for longer than idle_timeout_s; returns their conversation ids."""
        now = time.monotonic()
        with self._lock:
            idle = [
                cid
                for cid, k in self._kernels.items()
                if now - k.last_used > self.idle_timeout_s and not k.lock.locked()
            ]
        for cid in idle:
            self.forget(cid)
        return idle

    def shutdown(self) -> None:
        for cid in list(self._kernels):
            self.forget(cid)

    @property
    def num_kernels(self) -> int:
        return len(self._kernels)

    def _kernel(self, conversation_id: str) -> _Kernel:
        with self._lock:
            kernel = self._kernels.get(conversation_id)
            if kernel is None:
                kernel = self._kernels[conversation_id] = _Kernel(self.cpu_limit_s, self.memory_limit_bytes)
            return kernel

    def _execute(self, kernel: _Kernel, code: str, timeout_s: float) -> ExecutionResult:
        if not kernel.manager.is_alive():
            kernel.restart()
        result = ExecutionResult()
        msg_id = kernel.client.execute(code, store_history=False, allow_stdin=False)
        if _collect(kernel, msg_id, result, time.monotonic() + timeout_s):
            return result
        result.is_timeout = kernel.manager.is_alive()
        if result.is_timeout:
            kernel.manager.interrupt_kernel()
            if _collect(kernel, msg_id, result, time.monotonic() + INTERRUPT_GRACE_S):
                result.error = f"Timeout: the code ran longer than {timeout_s:g} s and was interrupted"
                return result
        kernel.restart()
        result.is_restarted = True
        reason = "did not stop after an interrupt" if result.is_timeout else "died (a limit or a crash)"
        result.error = f"The kernel {reason} and was restarted; variables from earlier runs are gone"
        return result


def _collect(kernel: _Kernel, msg_id: str, result: ExecutionResult, deadline: float) -> bool:
    """Read the run's output into `result` until the kernel is idle again: True, or False when the
    deadline passes or the kernel dies first."""
    while time.monotonic() < deadline:
        try:
            message = kernel.client.get_iopub_msg(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            if not kernel.manager.is_alive():
                return False
            continue
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if _add_message(message, result):
            return True
    return False


def _add_message(message: dict, result: ExecutionResult) -> bool:
    kind, content = message["msg_type"], message["content"]
    if kind == "stream":
        if content.get("name") == "stderr":
            result.stderr += content.get("text", "")
        else:
            result.stdout += content.get("text", "")
    elif kind in ("execute_result", "display_data"):
        data = content.get("data", {})
        if "image/png" in data:
            result.images.append(data["image/png"])
        elif "text/plain" in data:
            result.results.append(data["text/plain"])
    elif kind == "error":
        result.error = ANSI_ESCAPE.sub("", "\n".join(content.get("traceback", [])))
    return kind == "status" and content.get("execution_state") == "idle"
