"""Build the Gradio Blocks and mount them at /ui (this module imports gradio)."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr
from fastapi import FastAPI

from glmserve.agent.runner import AgentRunner
from glmserve.serving.service import ChatService
from glmserve.serving.settings import ServeSettings
from glmserve.ui.agent_tab import agent_tabs
from glmserve.ui.auth import key_login
from glmserve.ui.chat_tab import ChatTab

PATH = "/ui"
# System fonts only: a private server's page should not call out to a font CDN.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def build_blocks(
    get_service: Callable[[], ChatService], model_names: list[str], agent_runner: AgentRunner | None
) -> gr.Blocks:
    with gr.Blocks(title="glmserve", analytics_enabled=False) as blocks:
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                ChatTab(get_service, model_names).render(blocks)
            agent_tabs(get_service, agent_runner, model_names[0])
    # The engine batches and queues requests itself: gradio must not serialise users' events.
    blocks.queue(default_concurrency_limit=None)
    return blocks


def mount(
    app: FastAPI, settings: ServeSettings, model_names: list[str], agent_runner: AgentRunner | None
) -> None:
    blocks = build_blocks(lambda: app.state.service, model_names, agent_runner)
    gr.mount_gradio_app(
        app,
        blocks,
        path=PATH,
        auth=key_login(settings.all_keys),
        auth_message="Enter one of the server's API keys as the password (any user name).",
        footer_links=[],
        run_history=False,
        ssr_mode=False,  # no Node.js server
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        theme=THEME,
    )
