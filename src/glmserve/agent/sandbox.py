"""The code interpreter's sandbox: how one kernel process is sealed off from the server and the host.

Sealed (bubblewrap, `bwrap`, present and namespaces allowed):
- new PID, network, IPC, UTS and (where possible) cgroup namespaces: the kernel sees only its own
  processes, all of which die with the namespace's init when the kernel is killed (session leaders
  included); only its own loopback device, so nothing of the host's network is reachable;
- a new mount namespace whose root holds read-only binds of the system directories (/usr and the
  /lib, /bin links), the Python environment that runs the kernel (its prefixes, nothing else of a
  checkout), a few files of /etc, a fresh /proc and /dev, a private /tmp, and the conversation's
  working directory: the server's config, keys, models and checkout are not there to read;
- its own user: as root, a uid of its own per kernel (`UID_BASE` + n), with no capabilities and
  no_new_privs; as a normal user, a user namespace that maps only the server's uid, so the kernel
  holds no privileges on the host either way. /proc/<pid>/environ of the server is out of sight.
Unsealed (no bwrap, or namespaces refused, and the caller allowed it): as root, still its own uid
when the Python environment is readable by others; limits as below; no namespaces.

Limits (both modes, set by LAUNCHER before ipykernel runs): CPU seconds and address space per
process, file size, open files, and as its own uid (root) or user namespace (non-root) the number
of processes and threads.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs inside the sandbox before ipykernel: set limits, drop to the kernel's uid, enter its working
# directory ($HOME: only that uid may), run the kernel.
# argv: uid (-1: keep) cpu_s memory_bytes max_processes (0: none) max_file_bytes max_open_files ...
LAUNCHER = (
    "import os, resource, runpy, sys\n"
    "uid, cpu_s, memory, nproc, fsize, nofile = map(int, sys.argv[1:7])\n"
    "for kind, limit in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),\n"
    "                    (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):\n"
    "    resource.setrlimit(kind, (limit, limit))\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))\n"
    "if uid >= 0:\n"
    "    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)\n"
    "if nproc > 0:\n"
    "    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))\n"
    "os.chdir(os.environ['HOME']); os.environ['PWD'] = os.environ['HOME']\n"
    "sys.argv = ['ipykernel_launcher', *sys.argv[7:]]\n"
    "runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)\n"
)
# Kernels of a root server run as UID_BASE + n: far above the ranges that distributions hand out
# to people and services (and below 2**31, which some tools read as signed).
UID_BASE = 2_000_000_000
UID_RANGE = 2**24
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "alternatives",
             "fonts", "ssl", "mime.types", "nsswitch.conf")  # fmt: skip
TMP_BYTES = 128 * 2**20  # the private /tmp (tmpfs: it is memory)


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 300  # per process lifetime: past it the kernel is killed, then restarted
    memory_bytes: int = 2 * 2**30  # address space per process: a large allocation is a MemoryError
    max_processes: int = 64  # processes and threads of one kernel (ipykernel itself uses ~10)
    max_file_bytes: int = 1 * 2**30
    max_open_files: int = 1024


@dataclass(frozen=True)
class SandboxStatus:
    is_sealed: bool
    detail: str  # what is sealed, or why it is not

    def describe(self) -> str:
        if self.is_sealed:
            return f"code runs sealed ({self.detail})"
        return f"code cannot be sealed here: {self.detail}"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be built and unsandboxed code was not allowed."""


@functools.cache
def probe() -> SandboxStatus:
    """Whether a kernel can be sealed here: runs the real sandbox once with `python -c pass`.
    Cached: the answer holds for the process's life."""
    if sys.platform != "linux":
        return SandboxStatus(False, "namespaces need Linux")
    if shutil.which("bwrap") is None:
        return SandboxStatus(False, "bubblewrap is not installed (apt-get install bubblewrap)")
    with tempfile.TemporaryDirectory(prefix="glmserve-probe-") as state:
        sandbox = Sandbox(Path(state), uid=_new_uid() if os.geteuid() == 0 else None, is_sealed=True)
        command = sandbox.command([sys.executable, "-c", "import os; os.listdir('/')"])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=minimal_env(state))
        except (OSError, subprocess.TimeoutExpired) as error:
            return SandboxStatus(False, f"bwrap failed to start ({error})")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return SandboxStatus(False, f"bwrap refused ({reason})")
    who = "its own uid per kernel" if os.geteuid() == 0 else "a user namespace"
    return SandboxStatus(True, f"bubblewrap: PID, network and mount namespaces, {who}")


def minimal_env(home: str) -> dict[str, str]:
    """A kernel's whole environment: nothing of the server's (its API key, tokens) reaches user code."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures come back as PNGs
        "MPLCONFIGDIR": "/tmp/.matplotlib",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "OMP_NUM_THREADS": "2",  # BLAS threads count against the process limit
        "OPENBLAS_NUM_THREADS": "2",
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per thread otherwise
    }


class Sandbox:
    """One kernel's sealed world: a state directory on the host holding its working directory
    (`workdir`, the kernel's cwd, removed with it) and `rundir` (connection file, sockets, the
    synthetic /etc/passwd), and the command line that starts a process inside it."""

    def __init__(self, state_dir: Path, uid: int | None, is_sealed: bool):
        self.state_dir, self.uid, self.is_sealed = state_dir, uid, is_sealed
        self.workdir, self.rundir = state_dir / "work", state_dir / "run"
        for path in (self.workdir, self.rundir):
            path.mkdir(mode=0o700)
            if uid is not None:
                os.chown(path, uid, uid)
        state_dir.chmod(0o711)  # the kernel's uid passes through to work/ and run/
        # The sandbox's /etc/passwd, group and hosts: the kernel's user only, not the host's.
        uid_inside, gid_inside = (os.getuid(), os.getgid()) if uid is None else (uid, uid)
        etc = {
            "passwd": f"root:x:0:0::/:/bin/false\nsandbox:x:{uid_inside}:{gid_inside}::{self.workdir}:/bin/sh\n",
            "group": f"root:x:0:\nsandbox:x:{gid_inside}:\n",
            "hosts": "127.0.0.1 localhost\n::1 localhost\n",
        }
        for name, text in etc.items():
            (self.rundir / name).write_text(text)

    @classmethod
    def create(cls, is_sealed: bool, uids_in_use: set[int]) -> Sandbox:
        """A new state directory; as root, a kernel uid not in `uids_in_use`."""
        uid = None
        if os.geteuid() == 0 and (is_sealed or _python_is_world_readable()):
            uid = _new_uid(uids_in_use)
        return cls(Path(tempfile.mkdtemp(prefix="glmserve-kernel-")), uid, is_sealed)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as it runs in this sandbox: inside bwrap when sealed, as is otherwise."""
        return self._bwrap_args() + argv if self.is_sealed else argv

    def launcher_args(self, limits: Limits) -> list[str]:
        """LAUNCHER's leading arguments. The process limit needs a uid or user namespace of the
        kernel's own: an unsealed kernel of a normal user shares the server's count, so it has none."""
        max_processes = limits.max_processes if (self.is_sealed or self.uid is not None) else 0
        numbers = (-1 if self.uid is None else self.uid, limits.cpu_s, limits.memory_bytes, max_processes,
                   limits.max_file_bytes, limits.max_open_files)  # fmt: skip
        return [str(n) for n in numbers]

    def kill_all(self) -> None:
        """Kill every process of the kernel. Sealed, the PID namespace already dies with its init;
        unsealed as root, every process of the kernel's uid (`kill -9 -1` run as that uid)."""
        if not self.is_sealed and self.uid is not None:
            for _ in range(2):  # a fork racing the first sweep is caught by the second
                subprocess.run(["kill", "-9", "-1"], user=self.uid, group=self.uid, extra_groups=[],
                               stderr=subprocess.DEVNULL, check=False)  # fmt: skip

    def remove(self) -> None:
        self.kill_all()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _bwrap_args(self) -> list[str]:
        args = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--hostname", "sandbox",
                "--unsetenv", "JPY_PARENT_PID",  # its parent is the namespace's init, not the server
                "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]  # fmt: skip
        if self.uid is not None:  # root: bwrap runs privileged; LAUNCHER keeps only setuid to drop
            args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-user"]
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        made: set[str] = set()
        args += _parents("/etc/passwd", made)
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for name in ("passwd", "group", "hosts"):
            args += ["--ro-bind", str(self.rundir / name), f"/etc/{name}"]
        for path in python_dirs():
            args += _parents(path, made) + ["--ro-bind", path, path]
        for path in (str(self.rundir), str(self.workdir)):
            args += _parents(path, made) + ["--bind", path, path]
        return args


def python_dirs() -> list[str]:
    """The directories the kernel's Python needs, outermost only: its prefixes (a venv and the
    interpreter it was made from) and any site directory outside them (user site)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates |= {p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)}
    dirs = sorted(os.path.abspath(p) for p in candidates)
    outermost = [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]
    return [d for d in outermost if d != "/" and not any(d == s or d.startswith(s + "/") for s in SYSTEM_DIRS)]


def _parents(path: str, made: set[str]) -> list[str]:
    """bwrap creates a bind's missing parents with the host parent's mode (/root is 0700): make them
    0755 directories first, so the kernel's uid can reach what is bound inside."""
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(1, len(parts) + 1):
        parent = "/" + "/".join(parts[:i])
        if parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args


def _new_uid(in_use: set[int] | frozenset[int] = frozenset()) -> int:
    while (uid := UID_BASE + secrets.randbelow(UID_RANGE)) in in_use:
        pass
    return uid


def _python_is_world_readable() -> bool:
    """Whether another uid can run this Python: every directory above and in its prefixes must be
    searchable by others (a pyenv under /root, 0700, is not)."""
    for prefix in python_dirs():
        path = Path(prefix)
        for directory in (path, *path.parents):
            if not directory.stat().st_mode & stat.S_IXOTH:
                return False
    return True
