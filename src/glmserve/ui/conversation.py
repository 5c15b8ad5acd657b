"""A chat conversation as the UI keeps it (in the browser's localStorage), without gradio.

    {"id": "3f2a...", "model": "smol", "system": "You are terse.",
     "messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "stats": {...AnswerStats fields}}]}

Stats ride along with each answer for display only; the model sees roles and contents.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

Conversation = dict[str, Any]
FINISH_TEXT = {
    "stop": "done",
    "length": "reached max_length",
    "stopped": "stopped by user",
    "abort": "aborted",
}


def new_conversation(model: str | None = None, system: str = "") -> Conversation:
    return {"id": uuid.uuid4().hex, "model": model, "system": system, "messages": []}


def is_valid(conversation: Any) -> bool:
    """Whether a value read back from the browser has our shape (it may be stale or edited)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        return False
    return all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        for m in conversation["messages"]
    )


def model_messages(conversation: Conversation) -> list[dict[str, str]]:
    """What the chat template gets: the system prompt, then each turn's role and content."""
    system = (conversation.get("system") or "").strip()
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": m["role"], "content": m["content"]} for m in conversation["messages"]]


def without_last_answer(conversation: Conversation) -> Conversation:
    """For regenerate: the conversation up to and including the last user message."""
    messages = list(conversation["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return {**conversation, "messages": messages}


@dataclass
class AnswerStats:
    model: str
    max_length: int | None  # as the user set it: prompt plus answer
    max_tokens: int  # what that left for the answer
    temperature: float
    top_p: float
    num_prompt_tokens: int = 0
    num_answer_tokens: int = 0
    tokens_per_s: float | None = None
    finish: str | None = None  # "stop" | "length" | "stopped" | None while streaming

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def chatbot_messages(conversation: Conversation) -> list[dict[str, str]]:
    """The conversation as gr.Chatbot messages, with a stats line under each answer."""
    return [
        {"role": m["role"], "content": m["content"] + stats_footer(m.get("stats"))}
        for m in conversation["messages"]
    ]


def stats_footer(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    rate = f" · {stats['tokens_per_s']:.1f} tok/s" if stats.get("tokens_per_s") else ""
    finish = FINISH_TEXT.get(stats.get("finish"), "generating…")
    settings = (
        f"max_length {stats['max_length']} · temperature {stats['temperature']:g} · top_p {stats['top_p']:g}"
    )
    return (
        f"\n\n<sub>{stats['num_prompt_tokens']} prompt + {stats['num_answer_tokens']} answer tokens{rate}"
        f" · {finish} · {settings}</sub>"
    )
