"""`glmserve chat --tools`: the terminal agent. The model may call the built-in tools (current
time, calculator, Python in a sandboxed kernel); each step is printed as it happens."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

from glmserve.agent.builtin_tools import builtin_registry
from glmserve.agent.interpreter import CodeInterpreter, SandboxUnavailable
from glmserve.agent.loop import Agent, LLMBackend, Step
from glmserve.chat.tool_parsers import tool_parser_for

USER_PROMPT = "\n用户 / You: "
LABELS = {"tool_call": "[tool call]", "observation": "[observation]", "code": "[code]",
          "image": "[image]", "error": "[error]"}  # fmt: skip


def run_tool_chat(
    llm: Any,
    params: Any,
    system: str | None = None,
    max_length: int | None = None,
    allow_unsandboxed: bool = False,
    max_rounds: int = 5,
) -> None:
    try:
        tool_parser_for(llm.get_tokenizer())
    except ValueError as error:
        sys.exit(f"error: --tools: {error}")
    interpreter = _interpreter(allow_unsandboxed)
    registry = builtin_registry(enable_python=interpreter is not None)
    agent = Agent(LLMBackend(llm, params, max_length), registry, interpreter, max_rounds)
    conversation_id, history = uuid.uuid4().hex, [{"role": "system", "content": system}] if system else []
    print("Tools: " + ", ".join(agent.registry.tools) + ". `clear` resets, `stop` exits.")
    try:
        while (query := _read(USER_PROMPT)) not in (None, "stop"):
            if query == "clear":
                history = history[:1] if system else []
                if interpreter is not None:
                    interpreter.forget(conversation_id)
            elif query:
                history.append({"role": "user", "content": query})
                try:
                    answer = asyncio.run(_answer(agent, history, conversation_id))
                except ValueError as error:  # the engine refused the prompt (too long)
                    print(f"\n[error: {error}]")
                    history.pop()
                    continue
                history.append({"role": "assistant", "content": answer})
    finally:
        if interpreter is not None:
            interpreter.shutdown()


def _interpreter(allow_unsandboxed: bool) -> CodeInterpreter | None:
    """The sandboxed kernel, or none (no python tool) where the sandbox cannot be built: said once."""
    try:
        interpreter = CodeInterpreter(allow_unsandboxed=allow_unsandboxed)
    except SandboxUnavailable as error:
        print(f"note: no python tool: {error}", file=sys.stderr)
        return None
    if not interpreter.status.is_sealed:
        print(f"warning: python runs UNSEALED (--allow-unsandboxed-code): {interpreter.status.detail}",
              file=sys.stderr)  # fmt: skip
    return interpreter


async def _answer(agent: Agent, history: list[dict], conversation_id: str) -> str:
    """Print the steps; the final text is the answer kept in the history (tool turns are not)."""
    text = ""
    print("ChatGLM: ", end="", flush=True)
    async for step in agent.run(history, conversation_id):
        text = _show(step, text)
    print()
    return text


def _show(step: Step, text: str) -> str:
    if step.kind == "text":
        print(step.content, end="", flush=True)
        return text + step.content
    label = LABELS[step.kind] + (f" {step.name}" if step.name else "")
    content = step.content if step.kind != "image" else "(a PNG image; shown in the web UI)"
    print(f"\n{label}: {content}", flush=True)
    return ""


def _read(prompt: str) -> str | None:
    try:
        return input(prompt).strip()
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None
