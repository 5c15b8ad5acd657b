"""Mounting the UI in-process, without loading a model: --no-ui, API-key login, agent tabs."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from scripted_runner import ScriptedRunner

from glmserve.agent.runner import AgentRunner, AgentStep
from glmserve.cli.serve import build_app
from glmserve.serving.settings import ServeSettings
from glmserve.ui.agent_tab import add_step
from glmserve.ui.mount import build_blocks


@pytest.fixture
def app_with_keys(bundled_gguf):
    return build_app(ServeSettings(model=[str(bundled_gguf)], api_key=["k1", "k2"]))


def tab_labels(blocks) -> list[str]:
    return [c["props"].get("label") for c in blocks.config["components"] if c["type"] == "tabitem"]


def test_no_ui_mounts_nothing(bundled_gguf):
    app = build_app(ServeSettings(model=[str(bundled_gguf)], no_ui=True))
    assert TestClient(app).get("/ui/").status_code == 404


def test_with_api_keys_the_ui_needs_a_key_login(app_with_keys):
    client = TestClient(app_with_keys)
    assert client.get("/ui/config").status_code == 401
    assert client.post("/ui/login", data={"username": "me", "password": "nope"}).status_code == 400
    assert client.post("/ui/login", data={"username": "me", "password": "k2"}).status_code == 200
    assert client.get("/ui/config").status_code == 200  # the session cookie from the login


def test_agent_tabs_appear_only_with_a_runner():
    assert isinstance(ScriptedRunner(), AgentRunner)
    assert tab_labels(build_blocks(lambda: None, ["m"], None)) == ["Chat"]
    assert tab_labels(build_blocks(lambda: None, ["m"], ScriptedRunner())) == [
        "Chat",
        "Tool",
        "Code Interpreter",
    ]


def test_steps_render_as_text_and_collapsible_steps():
    messages: list[dict] = []
    for step in [
        AgentStep("text", "Let me "),
        AgentStep("text", "check."),
        AgentStep("tool_call", name="get_weather", arguments={"city": "Paris"}),
        AgentStep("observation", '{"temp": 21}', name="get_weather"),
        AgentStep("text", "It is 21 °C."),
    ]:
        add_step(messages, step)
    assert [m["content"] for m in messages][0] == "Let me check."
    assert (
        messages[1]["metadata"]["title"] == "🛠️ Calling get_weather"
        and '"city": "Paris"' in messages[1]["content"]
    )
    assert messages[2]["metadata"]["title"] == "📋 get_weather returned"
    assert messages[3] == {"role": "assistant", "content": "It is 21 °C."}


def test_model_picker_only_with_several_models():
    def picker_visible(names):
        (dropdown,) = [
            c for c in build_blocks(lambda: None, names, None).config["components"] if c["type"] == "dropdown"
        ]
        return dropdown["props"]["visible"]

    assert picker_visible(["a", "b"]) is True and picker_visible(["a"]) is False
