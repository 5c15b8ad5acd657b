"""The agent loop with a TEST-ONLY scripted backend (fixed model turns in ChatGLM3's format,
through the real tokenizer's prompt building): tool calls, code runs, the round limit."""

import asyncio

import pytest

from glmserve.agent.builtin_tools import builtin_registry
from glmserve.agent.interpreter import CodeInterpreter
from glmserve.agent.loop import Agent
from glmserve.devtools import PRESETS_DIR
from glmserve.tokenization.glm import load_glm_tokenizer

CHATGLM3_DIR = PRESETS_DIR / "chatglm3"


class ScriptedBackend:
    """Replays one fixed turn per model call and records the prompts it was given."""

    def __init__(self, turns: list[str]):
        self.tokenizer = load_glm_tokenizer(CHATGLM3_DIR)
        self.turns, self.prompts = list(turns), []

    async def stream(self, messages, tools):
        self.prompts.append(self.tokenizer.apply_chat_template(messages, tools=tools))
        text = self.turns.pop(0) if self.turns else 'calculator\n```python\ntool_call(expression="1")\n```'
        for i in range(0, len(text), 4):
            yield text[i : i + 4]


def run(agent, mode="tool", conversation_id="c"):
    async def collect():
        return [s async for s in agent.run([{"role": "user", "content": "2+3*4?"}], conversation_id, mode)]

    return asyncio.run(collect())


def test_tool_round_trip():
    backend = ScriptedBackend(['calculator\n```python\ntool_call(expression="2+3*4")\n```', "\nIt is 14."])
    steps = run(Agent(backend, builtin_registry()))
    assert [(s.kind, s.name) for s in steps[:2]] == [
        ("tool_call", "calculator"),
        ("observation", "calculator"),
    ]
    assert steps[0].arguments == {"expression": "2+3*4"} and steps[1].content == "14"
    assert "".join(s.content for s in steps[2:] if s.kind == "text") == "It is 14."
    replay = backend.tokenizer.decode(backend.prompts[1], skip_special_tokens=False)
    assert (
        'calculator\n ```python\ntool_call(expression="2+3*4")\n```<|observation|>\n 14<|assistant|>'
        in replay
    )


def test_round_limit():
    steps = run(Agent(ScriptedBackend([]), builtin_registry(), max_rounds=2))
    assert [s.kind for s in steps] == ["tool_call", "observation"] * 2 + ["error"]


@pytest.mark.timeout(120)
def test_code_round_trip_keeps_the_interpreter_metadata():
    code_turn = "interpreter\n```python\nprint(6 * 7)\n```"
    backend = ScriptedBackend([code_turn, "\nThe answer is 42."])
    interpreter = CodeInterpreter(timeout_s=10)
    try:
        steps = run(Agent(backend, None, interpreter), mode="code")
    finally:
        interpreter.shutdown()
    assert [s.kind for s in steps[:2]] == ["code", "observation"] and steps[1].content == "42\n"
    replay = backend.tokenizer.decode(backend.prompts[1], skip_special_tokens=False)
    assert "你是一位智能AI助手" in replay
    assert "<|assistant|>interpreter\n ```python\nprint(6 * 7)\n```<|observation|>\n 42" in replay
