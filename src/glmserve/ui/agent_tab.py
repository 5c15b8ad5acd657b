"""The Tool and Code Interpreter tabs: a conversation whose answers are an AgentRunner's steps.

Tool calls, observations, code and errors are collapsible steps; text and images are shown inline.
History stays in the page session (gr.State): the runner's state (a kernel) is per server process.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from contextlib import aclosing

import gradio as gr

from glmserve.agent.runner import MODE_TITLES, AgentMode, AgentRequest, AgentRunner, AgentStep, ToolInfo
from glmserve.serving.errors import APIError
from glmserve.serving.service import ChatService

STEP_TITLES = {
    "tool_call": "🛠️ Calling {name}",
    "observation": "📋 {name} returned",
    "code": "🐍 Code",
    "error": "⚠️ Error",
}


def step_message(step: AgentStep) -> dict:
    """One step as a gr.Chatbot message (text steps are merged by `add_step`)."""
    if step.kind == "image":
        return {"role": "assistant", "content": gr.Image(step.content, show_label=False)}
    if step.kind == "tool_call":
        body = f"```json\n{json.dumps(dict(step.arguments or {}), ensure_ascii=False, indent=2)}\n```"
    elif step.kind == "code":
        body = f"```python\n{step.content}\n```"
    else:
        body = f"```\n{step.content}\n```"
    title = STEP_TITLES[step.kind].format(name=step.name or "tool")
    return {"role": "assistant", "content": body, "metadata": {"title": title, "status": "done"}}


def add_step(messages: list[dict], step: AgentStep) -> None:
    last = messages[-1] if messages else None
    if step.kind != "text":
        messages.append(step_message(step))
    elif (
        last and last["role"] == "assistant" and not last.get("metadata") and isinstance(last["content"], str)
    ):
        last["content"] += step.content
    else:
        messages.append({"role": "assistant", "content": step.content})


def tools_table(tools: list[ToolInfo]) -> str:
    if not tools:
        return "No tools are registered."
    rows = [
        f"| `{t.name}` | {t.description.replace('|', '/').splitlines()[0] if t.description else ''} |"
        for t in tools
    ]
    return "\n".join(["| Tool | Description |", "| --- | --- |", *rows])


class AgentTab:
    def __init__(self, get_service: Callable[[], ChatService], runner: AgentRunner, mode: AgentMode):
        self.get_service, self.runner, self.mode = get_service, runner, mode
        self.stops: dict[str, asyncio.Event] = {}

    def render(self, default_model: str) -> None:
        if self.mode == "tool":
            gr.Markdown(tools_table(self.runner.list_tools()), elem_id="tools")
        state = gr.State({"id": uuid.uuid4().hex, "messages": [], "shown": []})
        chatbot = gr.Chatbot(
            elem_id=f"{self.mode}-chatbot", height=480, buttons=["copy"], feedback_options=None
        )
        message = gr.Textbox(elem_id=f"{self.mode}-message", placeholder="Message", show_label=False)
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            stop = gr.Button("Stop", variant="stop")
            clear = gr.Button("Clear")
        model = gr.State(default_model)
        gr.on([message.submit, send.click], self.send, [message, state, model], [message, state, chatbot])
        stop.click(self.stop, None, None)
        clear.click(self.clear, [state], [state, chatbot])

    async def send(self, text: str, state: dict, model: str, request: gr.Request):
        session = request.session_hash
        if not text.strip() or session in self.stops:
            raise gr.Error("Type a message, or stop the running answer first.")
        messages = [*state["messages"], {"role": "user", "content": text}]
        shown = [*state["shown"], {"role": "user", "content": text}]
        agent_request = AgentRequest(self.mode, state["id"], messages, model)
        stop = self.stops[session] = asyncio.Event()
        answer = ""
        try:
            # Closed at once on Stop, so the runner can abort its generation and free KV blocks.
            async with aclosing(self.runner.run(self.get_service(), agent_request)) as steps:
                async for step in steps:
                    add_step(shown, step)
                    answer += step.content if step.kind == "text" else ""
                    yield "", {**state, "shown": shown}, shown
                    if stop.is_set():
                        break
        except APIError as error:
            raise gr.Error(error.message) from None
        finally:
            del self.stops[session]
        new_state = {
            **state,
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "shown": shown,
        }
        yield "", new_state, shown

    def stop(self, request: gr.Request) -> None:
        if request.session_hash in self.stops:
            self.stops[request.session_hash].set()

    def clear(self, state: dict):
        self.runner.forget(state["id"])
        return {"id": uuid.uuid4().hex, "messages": [], "shown": []}, []


def agent_tabs(
    get_service: Callable[[], ChatService], runner: AgentRunner | None, default_model: str
) -> None:
    """One tab per mode the runner serves; none without a runner."""
    for mode in ("tool", "code"):
        if runner is not None and mode in runner.modes:
            with gr.Tab(MODE_TITLES[mode], id=mode):
                AgentTab(get_service, runner, mode).render(default_model)
