"""The Code Interpreter tab in chromium with the REAL agent runner and kernel: the code the model
writes runs in the conversation's Jupyter kernel and its output shows on the page. The model is
the TEST-ONLY scripted decoder (tests/serving/scripted_decoder.py), which emits a fixed
ChatGLM3-format code call through the real tokenizer (random weights would only babble)."""

from __future__ import annotations

import threading

import pytest
import uvicorn
from scripted_decoder import OBSERVATION_ID, ScriptedDecoderEngine
from server_process import free_port, wait_for

from glmserve.agent.glm_runner import GLMAgentRunner
from glmserve.agent.interpreter import CodeInterpreter
from glmserve.cli.serve import build_app
from glmserve.devtools import PRESETS_DIR
from glmserve.serving.settings import ServeSettings
from glmserve.tokenization.glm import load_glm_tokenizer

CHATGLM3_DIR = PRESETS_DIR / "chatglm3"
CODE = "import math\nprint('result:', math.factorial(12))"


@pytest.fixture(scope="module")
def base_url():
    tokenizer = load_glm_tokenizer(CHATGLM3_DIR)

    def script(prompt_ids):
        if OBSERVATION_ID in prompt_ids:  # second round: the kernel's output came back
            answer = "\nThe kernel printed the factorial."
        else:
            answer = f"interpreter\n```python\n{CODE}\n```"
        return tokenizer.encode(answer, add_special_tokens=False) + [OBSERVATION_ID]

    interpreter = CodeInterpreter(timeout_s=30)
    engine = ScriptedDecoderEngine(tokenizer, script)
    app = build_app(ServeSettings(), {"scripted": (engine, tokenizer)}, GLMAgentRunner(interpreter=interpreter))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout_s=120), "in-process server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(60)
    interpreter.shutdown()


@pytest.mark.timeout(300)
def test_code_written_by_the_model_runs_in_the_kernel(browser, base_url):
    page = browser.new_page()
    page.goto(base_url + "/ui/")
    page.get_by_role("tab", name="Code Interpreter").click()
    page.locator("#code-message textarea").fill("What is 12 factorial?")
    page.locator("#code-message textarea").press("Enter")
    chat = page.locator("#code-chatbot")
    chat.get_by_text("The kernel printed the factorial.").wait_for(timeout=180_000)
    chat.get_by_text("interpreter returned").first.click()  # steps are collapsible: open the observation
    chat.get_by_text("result: 479001600").first.wait_for(timeout=30_000)  # computed by the real kernel
