"""`glmserve chat` end to end on a tiny random ChatGLM3 checkpoint written by the tool's command line."""

import os
import subprocess
import sys


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_PATH"} | {"PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def write_tiny_chatglm3(out) -> subprocess.CompletedProcess:
    """A 2-layer random ChatGLM3 checkpoint with the real tokenizer, through the tool's command line."""
    sizes = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96"]
    tool = run("glmserve.devtools.random_checkpoint", "--config", "chatglm3-6b", "--out", str(out), *sizes)
    assert tool.returncode == 0, tool.stderr
    return tool


def test_glmserve_chat_on_a_chatglm3_checkpoint(tmp_path):
    assert "wrote" in write_tiny_chatglm3(tmp_path).stdout
    chat = run("glmserve", "chat", "--model", str(tmp_path), "--temperature", "0", "--max-length", "64",
               stdin="你好\n<|user|>再见\nstop\n")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "Traceback" not in chat.stderr
    assert chat.stdout.count("助手/Assistant:") == 2
