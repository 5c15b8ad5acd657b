"""The code interpreter: one Jupyter kernel (jupyter_client + ipykernel) per conversation.

Each kernel runs model-written code as an untrusted guest in a sandbox of its own (chat/sandbox.py):
its own PID, network and mount namespaces and its own unprivileged user where bubblewrap and the OS
allow them; limits on CPU time, memory, processes, file size and open files; a minimal environment;
a private working directory removed with it. Where the sandbox cannot be built, `CodeInterpreter()`
raises SandboxUnavailable unless `allow_unsandboxed=True`. The server reaches the kernel over Unix
sockets in the sandbox's run directory (ZMQ's ipc transport): the kernel has no network to use.

A run that passes its wall-clock timeout is interrupted (an interrupt request: KeyboardInterrupt);
a kernel that does not come back, or that died (memory, CPU limit, os._exit), is restarted, losing
its state. Kernels idle past `idle_timeout_s` are shut down at the next call.

    interpreter = CodeInterpreter(timeout_s=30)
    result = interpreter.run("conversation-1", "print(1 + 1)")   # ExecutionResult(stdout="2\\n", ...)
    interpreter.shutdown()
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from jupyter_client import KernelManager

from glmserve.agent import sandbox
from glmserve.agent.sandbox import LAUNCHER, Limits, Sandbox, SandboxStatus, SandboxUnavailable

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


class _SandboxedKernelManager(KernelManager):
    """Starts ipykernel through LAUNCHER inside the kernel's sandbox (jupyter_client 8 builds the
    command here, from the kernelspec otherwise). Interrupts are requests on the control channel:
    a signal to the process group would reach bwrap, not the kernel in its PID namespace."""

    sandbox: Sandbox
    limits: Limits

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        launcher = [sys.executable, "-c", LAUNCHER, *self.sandbox.launcher_args(self.limits)]
        return self.sandbox.command([*launcher, "-f", self.connection_file])

    def write_connection_file(self, **kwargs) -> tuple[str, dict]:
        written = super().write_connection_file(**kwargs)
        if self.sandbox.uid is not None:  # written 0600 by the server: the kernel's uid must read it
            os.chown(self.connection_file, self.sandbox.uid, self.sandbox.uid)
        return written


class _Kernel:
    """One conversation's kernel process, its sandbox and a blocking client."""

    def __init__(self, box: Sandbox, limits: Limits):
        self.sandbox, self.workdir = box, str(box.workdir)
        run = box.rundir
        self.manager = _SandboxedKernelManager(transport="ipc", ip=str(run / "kernel"),
                                               connection_file=str(run / "kernel.json"))  # fmt: skip
        self.manager.sandbox, self.manager.limits = box, limits
        self.manager.kernel_spec.interrupt_mode = "message"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # its warnings are not ours
        try:
            self.manager.start_kernel(cwd=self.workdir, env=sandbox.minimal_env(self.workdir), **quiet)
            self._connect()
        except BaseException:
            self.shutdown()
            raise
        self.lock = threading.Lock()  # one run at a time per conversation
        self.last_used = time.monotonic()

    def restart(self) -> None:
        self.client.stop_channels()
        self.sandbox.kill_all()  # unsealed: what the old kernel left running goes with its state
        self.manager.restart_kernel(now=True)
        self._connect()

    def shutdown(self) -> None:
        if hasattr(self, "client"):
            self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)
        self.sandbox.remove()

    def _connect(self) -> None:
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=START_TIMEOUT_S)


class CodeInterpreter:
    """Kernels by conversation id; `run` is blocking (call it from a thread in async code)."""

    def __init__(
        self,
        timeout_s: float = 30.0,
        cpu_limit_s: int = 300,
        memory_limit_bytes: int = 2 * 2**30,
        idle_timeout_s: float = 600.0,
        max_processes: int = Limits.max_processes,
        allow_unsandboxed: bool = False,
    ):
        self.status: SandboxStatus = sandbox.probe()
        if not (self.status.is_sealed or allow_unsandboxed):
            raise SandboxUnavailable(
                f"{self.status.describe()}; to run model-written code anyway, unsealed, pass "
                "allow_unsandboxed=True (--allow-unsandboxed-code)"
            )
        self.timeout_s = timeout_s
        self.limits = Limits(cpu_s=cpu_limit_s, memory_bytes=memory_limit_bytes, max_processes=max_processes)
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
                uids = {k.sandbox.uid for k in self._kernels.values() if k.sandbox.uid is not None}
                box = Sandbox.create(self.status.is_sealed, uids)
                kernel = self._kernels[conversation_id] = _Kernel(box, self.limits)
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
