"""The agent loop of ChatGLM3's composite demo: model -> tool call or code -> observation ->
model, at most `max_rounds` model turns, every step yielded as it happens.

    agent = Agent(ServiceBackend(service), tool_parser_for(tokenizer), builtin_registry(), CodeInterpreter())
    async for step in agent.run(messages, conversation_id="c1", mode="tool"):
        print(step.kind, step.content)

The model is reached through a backend: `ServiceBackend` (the server's ChatService) or
`LLMBackend` (the offline `glmserve.LLM`). Tool calls are parsed by chat/tool_parsers.py and
replayed into the history as OpenAI `tool_calls` + `tool` messages, which the chat formats turn
into `<|assistant|>name` and `<|observation|>` turns with the metadata line kept.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from glmserve.agent.interpreter import CodeInterpreter, ExecutionResult
from glmserve.agent.tools import ToolRegistry
from glmserve.chat.tool_parsers import (
    CODE_TOOL_NAMES,
    ToolCall,
    tool_parser_for,
)

# ChatGLM3's code-interpreter system prompt (composite_demo), without its /mnt/data path: files
# live in the kernel's own working directory.
CHATGLM3_CODE_PROMPT = (
    "你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，"
    "你可以运行代码并得到结果，如果运行结果有错误，你需要尽可能对代码进行改进。"
    "你可以处理用户上传到电脑上的文件，文件默认存储在当前工作目录。"
)
Mode = Literal["tool", "code"]


@dataclass(frozen=True)
class Step:
    """One visible step (the same kinds as the web UI's AgentStep)."""

    kind: Literal["text", "tool_call", "observation", "code", "image", "error"]
    content: str = ""
    name: str | None = None
    arguments: Mapping[str, Any] | None = None


class ModelBackend(Protocol):
    tokenizer: Any

    def stream(self, messages: Sequence[Mapping], tools: list | None) -> AsyncIterator[str]:
        """The text deltas of one assistant turn."""
        ...


@dataclass
class ServiceBackend:
    """The server's ChatService (the UI's tabs); options are SamplingParams fields / max_length."""

    service: Any
    model: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.service.model(self.model).tokenizer

    async def stream(self, messages: Sequence[Mapping], tools: list | None) -> AsyncIterator[str]:
        async for _, out in self.service.stream_chat(messages, model=self.model, tools=tools, **self.options):
            yield out.text_delta


@dataclass
class LLMBackend:
    """The offline `glmserve.LLM`, its blocking stream read in a thread so the loop stays async."""

    llm: Any
    sampling_params: Any = None
    max_length: int | None = None  # prompt plus answer tokens (ChatGLM's meaning); None: params' max_tokens

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    async def stream(self, messages: Sequence[Mapping], tools: list | None) -> AsyncIterator[str]:
        prompt_ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        params = self.sampling_params
        if self.max_length is not None:
            params = replace(params, max_tokens=max(self.max_length - len(prompt_ids), 1))
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            try:
                with closing(self.llm.stream(prompt_ids, params)) as outputs:
                    for out in outputs:
                        loop.call_soon_threadsafe(deltas.put_nowait, out.text_delta)
                        if stop.is_set():
                            break
            finally:
                loop.call_soon_threadsafe(deltas.put_nowait, None)

        worker = loop.run_in_executor(None, pump)
        try:
            while (delta := await deltas.get()) is not None:
                yield delta
        finally:
            stop.set()
            await worker


@dataclass
class Agent:
    backend: ModelBackend
    registry: ToolRegistry | None = None
    interpreter: CodeInterpreter | None = None
    max_rounds: int = 5

    async def run(
        self, messages: Sequence[Mapping], conversation_id: str, mode: Mode = "tool"
    ) -> AsyncIterator[Step]:
        """Answer the last message; `messages` is not modified."""
        history, tools = self._setup(list(messages), mode)
        parser = tool_parser_for(self.backend.tokenizer, [t["function"]["name"] for t in tools or []])
        for _ in range(self.max_rounds):
            streamer = parser.streamer()
            async for delta in self.backend.stream(history, tools):
                for piece in streamer.feed(delta):
                    yield Step("text", piece["content"])
            for piece in streamer.finish():
                if "content" in piece:
                    yield Step("text", piece["content"])
            if not streamer.tool_calls:
                return
            async for step in self._call(streamer.tool_calls[0], history, conversation_id):
                yield step
        yield Step("error", f"stopped after {self.max_rounds} model turns without a final answer")

    def _setup(self, history: list[dict], mode: Mode) -> tuple[list[dict], list | None]:
        if mode == "tool":
            return history, (self.registry.schemas() if self.registry else None)
        if self.interpreter is None:
            raise ValueError("code mode needs a CodeInterpreter")
        if "<sop>" in self.backend.tokenizer.special_ids:  # GLM-4: its built-in python tool
            return history, [{"type": "python"}]
        if not history or history[0].get("role") != "system":
            history.insert(0, {"role": "system", "content": CHATGLM3_CODE_PROMPT})
        return history, None

    async def _call(self, call: ToolCall, history: list[dict], conversation_id: str) -> AsyncIterator[Step]:
        arguments = json.loads(call.arguments)
        if call.name in CODE_TOOL_NAMES and self.interpreter is not None:
            code = str(arguments.get("code", ""))
            yield Step("code", code, name=call.name)
            result = await asyncio.to_thread(self.interpreter.run, conversation_id, code)
            for step in _result_steps(result):
                yield step
            observation = result.observation()
            # Replayed as the model wrote it: metadata line + a code block, not a tool_call(...).
            history.append({"role": "assistant", "metadata": call.name, "content": f"```python\n{code}\n```"})
        else:
            yield Step("tool_call", call.arguments, name=call.name, arguments=arguments)
            registry = self.registry or ToolRegistry()
            observation = await asyncio.to_thread(registry.call, call.name, arguments)
            yield Step("observation", observation, name=call.name)
            history.append({"role": "assistant", "content": None, "tool_calls": [call.openai()]})
        history.append({"role": "tool", "tool_call_id": call.id, "content": observation})


def _result_steps(result: ExecutionResult) -> list[Step]:
    text = "\n".join(p for p in (result.stdout, result.stderr, *result.results) if p)
    steps = [Step("observation", text, name="interpreter")] if text else []
    steps += [Step("image", f"data:image/png;base64,{png}") for png in result.images]
    if result.error:
        steps.append(Step("error", result.error))
    return steps
