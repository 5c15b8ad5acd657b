"""The Tool and Code Interpreter tabs in chromium, with a scripted runner standing in for issue 7's
agent loop (the page must show exactly the steps a runner yields). The server runs in-process,
since `glmserve serve` has no runner yet."""

from __future__ import annotations

import threading

import pytest
import uvicorn
from scripted_runner import ScriptedRunner
from server_process import free_port, wait_for

from glmserve.cli.serve import build_app
from glmserve.serving.settings import ServeSettings


@pytest.fixture(scope="module")
def runner():
    return ScriptedRunner()


@pytest.fixture(scope="module")
def base_url(bundled_gguf, runner):
    settings = ServeSettings(
        model=[str(bundled_gguf)], dtype="float32", kv_cache_memory="64MiB", max_model_len=512
    )
    port = free_port()
    config = uvicorn.Config(
        build_app(settings, agent_runner=runner),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout_s=180), "in-process server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(60)


def open_tab(browser, base_url: str, title: str):
    page = browser.new_page()
    page.goto(base_url + "/ui/")
    page.get_by_role("tab", name=title).click()
    return page


def test_tool_tab_lists_tools_and_shows_calls_as_steps(browser, base_url, runner):
    page = open_tab(browser, base_url, "Tool")
    page.locator("#tools").get_by_text("Weather of a city").wait_for()
    page.locator("#tool-message textarea").fill("Weather in Paris?")
    page.locator("#tool-message textarea").press("Enter")
    page.locator("#tool-chatbot").get_by_text("It is 21 °C in Paris.").wait_for()
    assert page.locator("#tool-chatbot").get_by_text("Calling get_weather").is_visible()
    assert page.locator("#tool-chatbot").get_by_text("get_weather returned").is_visible()
    assert (
        runner.requests[-1].mode == "tool"
        and runner.requests[-1].messages[-1]["content"] == "Weather in Paris?"
    )


def test_code_tab_shows_code_images_and_errors(browser, base_url, runner):
    page = open_tab(browser, base_url, "Code Interpreter")
    page.locator("#code-message textarea").fill("Plot it")
    page.locator("#code-message textarea").press("Enter")
    page.locator("#code-chatbot").get_by_text("Here is the plot.").wait_for()
    assert page.locator("#code-chatbot img").count() >= 1
    assert page.locator("#code-chatbot").get_by_text("Error").first.is_visible()
    page.get_by_role("button", name="Clear").nth(1).click()  # the Code Interpreter tab's own Clear
    assert wait_for(lambda: runner.forgotten == [runner.requests[-1].conversation_id], timeout_s=30)
