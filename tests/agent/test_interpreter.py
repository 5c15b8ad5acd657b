"""The code interpreter: real ipykernel processes, one per conversation, with limits. Timeouts are
short so the suite stays quick; nothing asserts on durations."""

import ipykernel  # noqa: F401  (a runtime dependency of the interpreter)
import pytest

from glmserve.agent.interpreter import CodeInterpreter


@pytest.fixture(scope="module")
def interpreter():
    interpreter = CodeInterpreter(timeout_s=3, cpu_limit_s=60, memory_limit_bytes=2 * 2**30)
    yield interpreter
    interpreter.shutdown()


def test_output_results_and_tracebacks(interpreter):
    result = interpreter.run("a", "import sys\nprint('hi'); print('oops', file=sys.stderr)\nx = 41\nx + 1")
    assert (result.stdout, result.stderr, result.results, result.error) == ("hi\n", "oops\n", ["42"], None)
    failed = interpreter.run("a", "1 / 0")
    assert "ZeroDivisionError" in failed.error and "\x1b[" not in failed.error
    assert "ZeroDivisionError" in failed.observation()


def test_png_capture(interpreter):
    code = (
        "from IPython.display import Image, display\nimport base64\n"
        "display(Image(data=base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8"
        "z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==')))"
    )
    result = interpreter.run("a", code)
    assert len(result.images) == 1 and result.images[0].startswith("iVBORw0KGgo")
    assert "[image 1]" in result.observation()


def test_infinite_loop_is_interrupted_and_state_kept(interpreter):
    interpreter.run("a", "kept = 'yes'")
    result = interpreter.run("a", "while True: pass")
    assert result.is_timeout and "interrupted" in result.error
    assert interpreter.run("a", "print(kept)").stdout == "yes\n"


def test_ten_gigabytes_is_a_memory_error(interpreter):
    result = interpreter.run("a", "block = bytearray(10 * 2**30)")
    assert "MemoryError" in result.error and not result.is_restarted
    assert interpreter.run("a", "print(2 + 2)").stdout == "4\n"


def test_crashing_kernel_is_restarted(interpreter):
    interpreter.run("crash", "before = 1")
    result = interpreter.run("crash", "import os; os._exit(1)")
    assert result.is_restarted and "restarted" in result.error
    assert "NameError" in interpreter.run("crash", "before").error
    assert interpreter.run("crash", "print('alive')").stdout == "alive\n"


def test_conversations_are_isolated(interpreter):
    interpreter.run("left", "secret = 1\nopen('mine.txt', 'w').write('x')")
    other = interpreter.run(
        "right", "import os\nprint(os.path.exists('mine.txt'), sorted(os.environ)[:0])\nsecret"
    )
    assert other.stdout.startswith("False") and "NameError" in other.error
    assert interpreter.workdir("left") != interpreter.workdir("right")
    env = interpreter.run("right", "import os; print('GLMSERVE_API_KEY' in os.environ)")
    assert env.stdout == "False\n"


def test_idle_kernels_are_reaped():
    interpreter = CodeInterpreter(idle_timeout_s=0)
    try:
        interpreter.run("idle", "1")
        assert interpreter.reap_idle() == ["idle"] and interpreter.num_kernels == 0
    finally:
        interpreter.shutdown()
