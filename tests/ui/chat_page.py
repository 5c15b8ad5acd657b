"""The Chat tab as a test sees it: element ids from glmserve/ui/chat_tab.py."""

from __future__ import annotations

import re

ANSWER_STATS = re.compile(r"(\d+) prompt \+ (\d+) answer tokens")


class ChatPage:
    def __init__(self, page, base_url: str):
        self.page, self.base_url = page, base_url

    def open(self) -> ChatPage:
        self.page.goto(self.base_url + "/ui/")
        self.page.locator("#message textarea").wait_for()
        # Slider values come from the server on load; the default model's max_length is never 1.
        self.page.wait_for_function("document.querySelector('#max-length input[type=number]').value > 1")
        return self

    def send(self, text: str) -> None:
        self.page.locator("#message textarea").fill(text)
        self.page.locator("#message textarea").press("Enter")

    def set_slider(self, elem_id: str, value: float) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")  # the slider takes a typed value on Enter / blur

    def slider(self, elem_id: str) -> float:
        return float(self.page.locator(f"#{elem_id} input[type=number]").input_value())

    def click(self, elem_id: str) -> None:
        self.page.locator(f"#{elem_id}").click()

    def bot_messages(self):
        return self.page.locator("#chatbot [data-testid=bot]")

    def last_answer(self) -> str:
        return self.bot_messages().last.inner_text()

    def wait_for_answer_text(self, pattern: str) -> str:
        """Wait until the last answer's stats line contains `pattern` (e.g. 'done')."""
        self.page.locator("#chatbot [data-testid=bot]").last.get_by_text(re.compile(pattern)).wait_for()
        return self.last_answer()
