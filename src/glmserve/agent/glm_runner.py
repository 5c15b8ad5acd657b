"""The web UI's Tool and Code Interpreter tabs on the real agent loop (chat/agent.py): built-in
tools in tool mode, one sandboxed Jupyter kernel per conversation in code mode. Without an
interpreter there is no code mode and no `python` tool.

    create_app(settings, agent_runner=GLMAgentRunner(interpreter=CodeInterpreter()))
"""

from __future__ import annotations

import atexit
from collections.abc import AsyncIterator

from glmserve.agent.builtin_tools import builtin_registry
from glmserve.agent.interpreter import CodeInterpreter
from glmserve.agent.loop import Agent, ServiceBackend
from glmserve.agent.runner import AgentRequest, AgentStep, ToolInfo
from glmserve.agent.tools import ToolRegistry

OPTION_NAMES = ("max_length", "temperature", "top_p")  # what the tabs' sliders send


class GLMAgentRunner:
    def __init__(
        self,
        registry: ToolRegistry | None = None,
        interpreter: CodeInterpreter | None = None,
        max_rounds: int = 5,
    ):
        self.interpreter = interpreter
        self.modes = ("tool", "code") if interpreter else ("tool",)
        self.registry = registry or builtin_registry(enable_python=interpreter is not None)
        self.max_rounds = max_rounds
        if interpreter is not None:  # kernels are processes of their own: stop them with the server
            atexit.register(interpreter.shutdown)

    def list_tools(self) -> list[ToolInfo]:
        return [ToolInfo(t.name, t.description, t.parameters) for t in self.registry.tools.values()]

    async def run(self, service, request: AgentRequest) -> AsyncIterator[AgentStep]:
        options = {k: v for k, v in request.options.items() if k in OPTION_NAMES and v is not None}
        backend = ServiceBackend(service, request.model, options)
        agent = Agent(backend, self.registry, self.interpreter, self.max_rounds)
        try:
            async for step in agent.run(request.messages, request.conversation_id, request.mode):
                yield AgentStep(step.kind, step.content, step.name, step.arguments)
        except Exception as error:  # shown in the tab (a non-GLM model, a refused request), not a crash
            yield AgentStep("error", f"{type(error).__name__}: {error}")

    def forget(self, conversation_id: str) -> None:
        if self.interpreter is not None:
            self.interpreter.forget(conversation_id)
