"""The web UI at /ui: a Gradio app mounted into the server's FastAPI app.

It is a client of the in-process ChatService (never HTTP to itself). Only `mount_ui` imports
gradio, so `glmserve serve --no-ui` never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from glmserve.agent.runner import AgentRunner
    from glmserve.serving.settings import ServeSettings


def mount_ui(
    app: FastAPI, settings: ServeSettings, model_names: list[str], agent_runner: AgentRunner | None = None
) -> None:
    """Mount the UI at /ui. The Tool and Code Interpreter tabs appear only with an agent runner."""
    try:
        from glmserve.ui.mount import mount
    except ImportError as error:
        raise RuntimeError(
            f"the web UI needs gradio ({error}): pip install gradio, or pass --no-ui"
        ) from None
    mount(app, settings, model_names, agent_runner)
