"""The Chat tab: streaming Markdown answers, system prompt, sampling sliders, stop / regenerate / clear.

Conversations live in the browser (gr.BrowserState, i.e. localStorage): the server keeps nothing
between requests, so replicas stay stateless behind a load balancer, and one browser's history
is never visible to another user. The gr.State copy is the same conversation for this page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import gradio as gr

from glmserve.serving.errors import APIError
from glmserve.serving.service import ChatService
from glmserve.ui.answer import AnswerOptions, stream_answer
from glmserve.ui.conversation import (
    Conversation,
    chatbot_messages,
    is_valid,
    new_conversation,
    without_last_answer,
)

# localStorage key; the "secret" only obfuscates, since the browser holds it too. Both are fixed
# so that conversations also survive a server restart.
STORAGE_KEY = "glmserve-chat"
STORAGE_SECRET = "glmserve-chat-v1"
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
]


class ChatTab:
    def __init__(self, get_service: Callable[[], ChatService], model_names: list[str]):
        self.get_service = get_service
        self.model_names = model_names
        self.stops: dict[str, asyncio.Event] = {}  # session -> its Stop button, while answering

    def render(self, blocks: gr.Blocks) -> None:
        saved = gr.BrowserState(new_conversation(), storage_key=STORAGE_KEY, secret=STORAGE_SECRET)
        conversation = gr.State(new_conversation())
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(
                    elem_id="chatbot",
                    height=520,
                    latex_delimiters=LATEX_DELIMITERS,
                    buttons=["copy"],
                    feedback_options=None,
                    show_label=False,
                )
                message = gr.Textbox(
                    elem_id="message", placeholder="Message (Enter to send)", show_label=False
                )
                with gr.Row():
                    send = gr.Button("Send", elem_id="send", variant="primary")
                    stop = gr.Button("Stop", elem_id="stop", variant="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                model = gr.Dropdown(
                    self.model_names,
                    value=self.model_names[0],
                    label="Model",
                    elem_id="model",
                    visible=len(self.model_names) > 1,
                )
                system = gr.Textbox(label="System prompt", lines=4, elem_id="system-prompt")
                max_length = gr.Slider(1, 8192, step=1, label="max_length", elem_id="max-length")
                top_p = gr.Slider(0.01, 1, step=0.01, label="top_p", elem_id="top-p")
                temperature = gr.Slider(0, 2, step=0.01, label="temperature", elem_id="temperature")
        sliders = [max_length, top_p, temperature]
        options = [system, model, *sliders]
        streamed = [message, conversation, chatbot, saved]

        blocks.load(self.restore, [saved], [conversation, chatbot, system, model, *sliders])
        gr.on([message.submit, send.click], self.send, [message, conversation, *options], streamed)
        regenerate.click(self.regenerate, [conversation, *options], streamed)
        stop.click(self.stop, None, None)
        gr.on(
            [clear.click, chatbot.clear],
            self.clear,
            [conversation, system, model],
            [conversation, chatbot, saved],
        )
        model.change(self.model_defaults, [model], sliders)

    # -- handlers ---------------------------------------------------------------------------------
    def restore(self, saved: Conversation):
        conversation = saved if is_valid(saved) else new_conversation()
        name = conversation.get("model") if conversation.get("model") in self.model_names else None
        name = name or self.model_names[0]
        return (
            conversation,
            chatbot_messages(conversation),
            conversation.get("system") or "",
            name,
            *self.model_defaults(name),
        )

    def model_defaults(self, name: str):
        """Slider values from the model family's GenerationDefaults, capped by what fits in one sequence."""
        served = self.get_service().model(name)
        max_length = min(served.defaults.max_length, served.max_sequence_len)
        return (
            gr.Slider(value=max_length, maximum=served.max_sequence_len),
            gr.Slider(value=served.defaults.top_p),
            gr.Slider(value=served.defaults.temperature),
        )

    async def send(
        self, text, conversation, system, model, max_length, top_p, temperature, request: gr.Request
    ):
        if not text.strip():
            raise gr.Error("Type a message first.")
        turn = {**conversation, "messages": [*conversation["messages"], {"role": "user", "content": text}]}
        async for update in self._answer(turn, system, model, max_length, top_p, temperature, request):
            yield update

    async def regenerate(
        self, conversation, system, model, max_length, top_p, temperature, request: gr.Request
    ):
        turn = without_last_answer(conversation)
        if not turn["messages"]:
            raise gr.Error("Nothing to regenerate yet.")
        async for update in self._answer(turn, system, model, max_length, top_p, temperature, request):
            yield update

    def stop(self, request: gr.Request) -> None:
        if request.session_hash in self.stops:
            self.stops[request.session_hash].set()

    def clear(self, conversation, system, model):
        fresh = new_conversation(model, system)
        return fresh, [], fresh

    async def _answer(self, turn, system, model, max_length, top_p, temperature, request):
        session = request.session_hash
        if session in self.stops:
            raise gr.Error("An answer is still streaming: stop it first.")
        turn = {**turn, "system": system, "model": model, "messages": list(turn["messages"])}
        options = AnswerOptions(model, int(max_length), float(temperature), float(top_p))
        stop = self.stops[session] = asyncio.Event()
        try:
            is_first = True  # the message box empties once: the user may type the next one meanwhile
            async for current in stream_answer(self.get_service(), turn, options, stop):
                yield ("" if is_first else gr.skip()), current, chatbot_messages(current), gr.skip()
                is_first = False
            yield gr.skip(), turn, chatbot_messages(turn), turn  # saved to the browser once, when done
        except APIError as error:  # refused before any output: prompt too long, queue full
            raise gr.Error(error.message) from None
        finally:
            del self.stops[session]
