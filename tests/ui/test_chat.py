"""The Chat tab in headless chromium against a real `glmserve serve` with the bundled SmolLM2
(greedy by default, so answers repeat). Tests share one browser profile, so one localStorage."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from chat_page import ANSWER_STATS, ChatPage
from server_process import wait_for

SCREENSHOT = Path(__file__).parents[2] / "docs" / "images" / "ui-chat.png"
QUESTION = "What is the capital of France?"
LONG_TASK = "Count from 1 to 1000, separated by commas."
RECORD_ANSWER_LENGTHS = """() => {
    window.answerLengths = [];
    new MutationObserver(() => {
        const answers = document.querySelectorAll('#chatbot [data-testid=bot]');
        if (answers.length) window.answerLengths.push(answers[answers.length - 1].innerText.length);
    }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def model_stats(server) -> dict:
    (stats,) = httpx.get(server.base_url + "/health", timeout=10).json()["models"].values()
    return stats


def open_fresh_chat(server, browser) -> ChatPage:
    chat = ChatPage(browser.new_page(), server.base_url).open()
    chat.click("clear")
    chat.bot_messages().first.wait_for(state="detached")
    return chat


def test_answer_streams_in_and_shows_its_token_counts(server, browser):
    chat = open_fresh_chat(server, browser)
    # `glmserve serve` hands the UI its agent runner (ui/agent_runner.py): the agent tabs are there
    assert chat.page.get_by_role("tab").all_inner_texts() == ["Chat", "Tool", "Code Interpreter"]
    chat.page.evaluate(RECORD_ANSWER_LENGTHS)
    chat.send(QUESTION)
    answer = chat.wait_for_answer_text("done")
    assert "Paris" in answer and "tok/s" in answer
    num_prompt_tokens, num_answer_tokens = map(int, ANSWER_STATS.search(answer).groups())
    assert num_prompt_tokens > 0 and num_answer_tokens > 1
    lengths = chat.page.evaluate("window.answerLengths")
    assert len(set(lengths)) >= 3, f"the answer did not arrive in pieces: {lengths}"  # partials, then done


def test_sliders_start_from_model_defaults_and_are_used(server, browser):
    chat = open_fresh_chat(server, browser)
    # SmolLM2 GGUF: greedy, and max_length is the whole context (--max-model-len 1024).
    assert (chat.slider("max-length"), chat.slider("top-p"), chat.slider("temperature")) == (1024, 1, 0)
    chat.set_slider("max-length", 48)
    chat.send("Count from 1 to 100, separated by commas.")
    answer = chat.wait_for_answer_text("reached max_length")
    num_prompt_tokens, num_answer_tokens = map(int, ANSWER_STATS.search(answer).groups())
    assert "max_length 48" in answer and num_prompt_tokens + num_answer_tokens == 48

    chat.click("regenerate")  # the same question again, replacing the answer
    chat.page.wait_for_function(
        "document.querySelector('#chatbot [data-testid=bot]')?.innerText.includes('reached max_length')"
    )
    assert chat.bot_messages().count() == 1
    assert chat.page.locator("#chatbot [data-testid=user]").count() == 1


def test_stop_aborts_the_request_and_frees_its_kv_blocks(server, browser):
    chat = open_fresh_chat(server, browser)
    chat.send(LONG_TASK)  # would run to max_length 1024
    assert wait_for(lambda: model_stats(server)["num_unfinished"] == 1, timeout_s=60)
    chat.page.wait_for_function("document.querySelector('#chatbot [data-testid=bot]')?.innerText.length > 0")
    chat.click("stop")
    answer = chat.wait_for_answer_text("stopped by user")
    num_prompt_tokens, num_answer_tokens = map(int, ANSWER_STATS.search(answer).groups())
    assert num_prompt_tokens + num_answer_tokens < 1024
    assert wait_for(lambda: model_stats(server)["num_unfinished"] == 0, timeout_s=30)

    def all_blocks_free() -> bool:  # the engine applies an abort at its next step boundary
        stats = model_stats(server)
        return stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]

    assert wait_for(all_blocks_free, timeout_s=30)


def test_conversation_survives_a_reload(server, browser):
    chat = open_fresh_chat(server, browser)
    chat.page.locator("#system-prompt textarea").fill("You are a helpful assistant. Answer briefly.")
    saved_before = chat.page.evaluate("localStorage.getItem('glmserve-chat')")
    chat.send(QUESTION)
    answer = chat.wait_for_answer_text("done")
    chat.page.wait_for_function(f"localStorage.getItem('glmserve-chat') !== {json.dumps(saved_before)}")

    chat.page.reload()
    chat.page.locator("#chatbot [data-testid=bot]").wait_for()
    assert chat.page.locator("#chatbot [data-testid=user]").inner_text() == QUESTION
    assert chat.last_answer() == answer
    assert (
        chat.page.locator("#system-prompt textarea").input_value()
        == "You are a helpful assistant. Answer briefly."
    )
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    chat.page.screenshot(path=str(SCREENSHOT))
