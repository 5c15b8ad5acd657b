"""`glmserve chat --tools` on a tiny random ChatGLM3 checkpoint: the agent loop runs and exits
cleanly (random weights write random text, so only the plumbing is checked), and a model
without a tool format is refused with a clear error."""

import sys

from test_glm_cli import run, write_tiny_chatglm3


def test_chat_with_tools_on_a_chatglm3_checkpoint(tmp_path):
    write_tiny_chatglm3(tmp_path)
    chat = run("glmserve", "chat", "--model", str(tmp_path), "--temperature", "0", "--max-length", "600",
               "--tools", stdin="What time is it?\nclear\nstop\n")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "Traceback" not in chat.stderr
    assert "Tools: get_current_time, calculator, python" in chat.stdout and "ChatGLM:" in chat.stdout


def test_chat_tools_needs_a_glm_model():
    chat = run("glmserve", "chat", "--tools", stdin="hi\nstop\n")  # the bundled SmolLM2 GGUF
    assert chat.returncode == 1 and "--tools" in chat.stderr, (chat.stdout, chat.stderr, sys.executable)
