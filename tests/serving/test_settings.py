"""Settings and the serve command's flags, without loading a model."""

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from glmserve.serving.settings import (
    ModelSpec,
    ServeSettings,
    default_model_name,
    is_loopback,
    parse_model_spec,
)


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command; each of these fails before it would load a model."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GLMSERVE_")}
    command = [sys.executable, "-m", "glmserve.cli.serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("chat=/models/a.gguf", ModelSpec("chat", "/models/a.gguf")),
        ("/models/a.gguf", ModelSpec(None, "/models/a.gguf")),
        ("/data/x=y/model", ModelSpec(None, "/data/x=y/model")),  # '=' inside a path is no name
    ],
)
def test_model_specs(spec, expected):
    assert parse_model_spec(spec) == expected


def test_reserved_names_are_refused():
    with pytest.raises(ValueError, match="reserved"):
        parse_model_spec("health=/models/a.gguf")


def test_default_name_is_the_stem(tmp_path):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"")
    assert default_model_name(gguf) == "SmolLM2-135M-Instruct.Q4_1"
    assert default_model_name(tmp_path / "chatglm3 6b") == "chatglm3-6b"


def test_kv_cache_sizes():
    assert ServeSettings(kv_cache_memory="512MiB").kv_cache_memory == 512 * 2**20
    assert ServeSettings(kv_cache_memory="0.1").kv_cache_memory == 0.1
    with pytest.raises(ValidationError):
        ServeSettings(kv_cache_memory="lots")


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_needs_a_key_or_an_explicit_opt_out():
    with pytest.raises(ValueError, match="--allow-no-auth"):
        ServeSettings(host="0.0.0.0").check_exposure()
    ServeSettings(host="0.0.0.0", api_key=["k"]).check_exposure()
    ServeSettings(host="0.0.0.0", allow_no_auth=True).check_exposure()
    ServeSettings(host="127.0.0.1").check_exposure()


def test_cli_refuses_an_open_public_address():
    result = serve("--host", "0.0.0.0")
    assert result.returncode == 1 and "--allow-no-auth" in result.stderr and "Traceback" not in result.stderr


def test_cli_reports_bad_values_by_flag():
    result = serve("--model", "/no/such/model.gguf")
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = serve(env={"GLMSERVE_MAX_QUEUE": "0"})
    assert result.returncode == 1 and "--max-queue" in result.stderr


def test_code_running_tabs_only_for_key_holders_or_loopback():
    from glmserve.serving.settings import ServeSettings

    assert ServeSettings(host="127.0.0.1").may_run_code
    assert ServeSettings(host="0.0.0.0", api_key=["k"]).may_run_code
    assert not ServeSettings(host="0.0.0.0", allow_no_auth=True).may_run_code


def test_quantization_reaches_the_engine_config():
    config = ServeSettings(quantization="int4", quantization_group_size=32).engine_config()
    assert (config.quantization, config.quantization_group_size) == ("int4", 32)
    assert ServeSettings().engine_config().quantization is None  # as in the checkpoint
    result = serve("--quantization", "int3")
    assert result.returncode != 0 and "--quantization" in result.stderr and "Traceback" not in result.stderr


def test_serve_says_at_start_how_code_runs(monkeypatch, capsys):
    """Sealed: said so. Unsealed: no Code Interpreter tab (nor python tool) unless
    --allow-unsandboxed-code, and then a warning naming what is not sealed."""
    from glmserve.agent import sandbox
    from glmserve.cli.serve import _agent_runner

    runner = _agent_runner(ServeSettings())
    assert runner.modes == ("tool", "code") and "code runs sealed" in capsys.readouterr().err
    runner.interpreter.shutdown()
    unsealed = sandbox.SandboxStatus(False, "bwrap refused (No permissions to create new namespace)")
    monkeypatch.setattr(sandbox, "probe", lambda: unsealed)
    runner = _agent_runner(ServeSettings())
    err = capsys.readouterr().err
    assert runner.modes == ("tool",) and "python" not in {t.name for t in runner.list_tools()}
    assert "no Code Interpreter tab" in err and "No permissions" in err and "--allow-unsandboxed-code" in err
    runner = _agent_runner(ServeSettings(allow_unsandboxed_code=True))
    assert runner.modes == ("tool", "code") and "UNSEALED" in capsys.readouterr().err
    runner.interpreter.shutdown()


def test_allow_unsandboxed_code_flag_and_env():
    for args, env in ((["--allow-unsandboxed-code"], {}), ([], {"GLMSERVE_ALLOW_UNSANDBOXED_CODE": "1"})):
        done = serve(*args, "--port", "0", env=env)  # refused at the port, after the flag parsed
        assert "No such option" not in done.stderr and "--port" in done.stderr, done.stderr
