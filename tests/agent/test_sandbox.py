"""The code interpreter's sandbox, tried from inside a real kernel as model-written code would:
the server's secrets, network, processes and files are out of reach, and its own processes die
with the conversation. Needs bubblewrap and namespaces (`make test` installs bubblewrap as root,
as CI runs); where they are missing the sealed tests fail with the probe's reason."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from glmserve.agent import sandbox
from glmserve.agent.interpreter import CodeInterpreter
from glmserve.agent.sandbox import Sandbox, SandboxStatus, SandboxUnavailable

CHECKOUT = Path(__file__).resolve().parents[2]
SECRET = "sk-planted-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def interpreter():
    status = sandbox.probe()
    assert status.is_sealed, status.describe()
    os.environ["GLMSERVE_API_KEY"] = SECRET  # as a server started with a key has it
    interpreter = CodeInterpreter(timeout_s=20)
    yield interpreter
    interpreter.shutdown()
    del os.environ["GLMSERVE_API_KEY"]


def run(interpreter, code: str, conversation_id: str = "probe") -> str:
    result = interpreter.run(conversation_id, code)
    assert result.error is None, result.error
    return result.stdout


def test_no_environment_of_the_server_is_readable(interpreter):
    code = f"""
import os
found = []
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['{os.getpid()}', str(os.getppid())]:
    try:
        found.append((pid, b'{SECRET}' in open(f'/proc/{{pid}}/environ', 'rb').read()))
    except OSError as error:
        found.append((pid, type(error).__name__))
print('{SECRET}' in str(os.environ), found)
"""
    output = run(interpreter, code)
    assert output.startswith("False") and "True" not in output, output


def test_kernel_runs_as_an_unprivileged_user_of_its_own(interpreter):
    uid = int(run(interpreter, "import os; print(os.getuid())"))
    assert uid != 0 and uid != os.getuid()


def test_host_loopback_is_unreachable(interpreter):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"""
import socket
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=3); print('connected')
except OSError as error:
    print('refused', type(error).__name__)
"""
        assert run(interpreter, code).startswith("refused")


def test_checkout_and_config_are_not_visible(interpreter, tmp_path):
    config = tmp_path / "glmserve.toml"
    config.write_text("api_key = 'k'\n")
    code = f"""
import os
print(sorted(os.listdir({str(CHECKOUT)!r})) if os.path.isdir({str(CHECKOUT)!r}) else [])
print(os.path.exists({str(config)!r}), os.path.exists({str(CHECKOUT / '.git')!r}))
print(open('/etc/passwd').read().count(':x:'))
"""
    listing, config_and_git, users = run(interpreter, code).splitlines()
    # Only the Python environment may show, read-only (a venv inside the checkout): no sources, no .git.
    assert set(eval(listing)) <= {".venv"}, listing
    assert config_and_git == "False False" and users == "2"


def test_forks_are_refused_past_the_limit_and_the_kernel_answers(interpreter):
    code = """
import os, time
children, refused = [], 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(children), refused)
"""
    started, refused = map(int, run(interpreter, code, "forks").split())
    assert refused > 0 and started + refused == 200 and started < interpreter.limits.max_processes
    assert run(interpreter, "print('alive')", "forks") == "alive\n"


def test_a_session_leader_dies_with_its_conversation(interpreter):
    marker = f"{secrets.randbelow(10**6) + 10**6}.25"  # sleep's argument: finds its host pid
    code = f"""
import os
if os.fork() == 0:
    os.setsid()
    os.execv('/bin/sleep', ['sleep', '{marker}'])
"""
    run(interpreter, code, "leader")
    pid = wait_for_value(lambda: find_process(marker), timeout_s=10)
    assert pid is not None, "the setsid child never started"
    interpreter.forget("leader")
    assert wait_for_value(lambda: not Path(f"/proc/{pid}").exists(), timeout_s=2)


def test_numpy_and_matplotlib_return_a_png(interpreter):
    code = "import numpy as np, matplotlib.pyplot as plt\nplt.plot(np.sin(np.linspace(0, 6, 50)))\nplt.show()"
    result = interpreter.run("plot", code)
    assert result.error is None and len(result.images) == 1
    assert result.images[0].startswith("iVBORw0KGgo")  # base64 of the PNG signature


def test_working_directory_is_private_returned_and_removed(interpreter):
    run(interpreter, "open('table.csv', 'w').write('a,b\\n1,2\\n')\nopen('/tmp/scratch', 'w').write('x')", "files")
    workdir = Path(interpreter.workdir("files"))
    assert (workdir / "table.csv").read_text() == "a,b\n1,2\n"  # the server can hand it to the user
    assert not Path("/tmp/scratch").exists()  # the sandbox's /tmp is its own
    assert "False" in run(interpreter, f"import os; print(os.path.exists({str(workdir / 'table.csv')!r}))", "other")
    interpreter.forget("files")
    assert not workdir.exists()


def test_refused_without_a_sandbox_unless_allowed(monkeypatch):
    unsealed = SandboxStatus(False, "bubblewrap is not installed (apt-get install bubblewrap)")
    monkeypatch.setattr(sandbox, "probe", lambda: unsealed)
    with pytest.raises(SandboxUnavailable, match="--allow-unsandboxed-code"):
        CodeInterpreter()
    interpreter = CodeInterpreter(timeout_s=20, allow_unsandboxed=True)
    try:
        assert run(interpreter, "print(6 * 7)") == "42\n"
        kernel_env = run(interpreter, "import os; print(sorted(os.environ))")
        assert "GLMSERVE_API_KEY" not in kernel_env
    finally:
        interpreter.shutdown()


def test_a_normal_user_gets_the_sandbox_through_a_user_namespace(monkeypatch):
    """A server that is not root: bwrap, run as `nobody`, builds the namespaces unprivileged.
    (The test's Python lives where nobody may not read, so a shell stands in for the kernel.)"""
    monkeypatch.setattr(sandbox, "python_dirs", lambda: [])
    box = Sandbox(Path(tempfile.mkdtemp(prefix="glmserve-test-")), uid=None, is_sealed=True)
    for path in (box.state_dir, box.workdir, box.rundir):
        os.chown(path, 65534, 65534)
    script = "id -u; ls /proc | grep -c '^[0-9]'; grep -c : /proc/net/dev; test -e /work && echo visible || echo hidden"
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = subprocess.run([*command, *box.command(["/bin/sh", "-c", script])], capture_output=True,
                          text=True, timeout=30, env=sandbox.minimal_env("/"))  # fmt: skip
    box.remove()
    assert done.returncode == 0, done.stderr
    uid, num_processes, num_interfaces, work = done.stdout.split()
    assert uid == "65534" and int(num_processes) < 8 and num_interfaces == "1" and work == "hidden"


def find_process(marker: str) -> int | None:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == f"sleep\0{marker}\0".encode():
                return int(entry.name)
        except OSError:
            continue
    return None


def wait_for_value(function, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while (value := function()) in (None, False) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
