"""What the Tool and Code Interpreter tabs need from an agent loop (tools and code execution).

The UI shows those tabs only when the server is given an AgentRunner; it renders the steps the
runner yields and never makes any up. A runner is handed to `create_app(settings, agent_runner=...)`.

    class MyRunner:
        modes = ("tool", "code")
        def list_tools(self) -> list[ToolInfo]: ...
        async def run(self, service, request): yield AgentStep("text", "Hello")
        def forget(self, conversation_id): ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from glmserve.serving.service import ChatService

AgentMode = Literal["tool", "code"]
StepKind = Literal["text", "tool_call", "observation", "code", "image", "error"]
MODE_TITLES: dict[str, str] = {"tool": "Tool", "code": "Code Interpreter"}


@dataclass(frozen=True)
class AgentStep:
    """One thing the agent did, shown as it arrives.

    - text: model prose (`content`, Markdown); consecutive text steps are joined, so a runner
      may stream an answer as many small text steps.
    - tool_call: the model called `name` with `arguments`; `content` may hold the raw call.
    - observation: what tool `name` returned (`content`, text).
    - code: code the model wrote, about to run (`content`, Python source).
    - image: an image the code produced: `content` is a file path or a data: URL.
    - error: a tool or the code failed (`content`, the message or traceback).
    """

    kind: StepKind
    content: str = ""
    name: str | None = None
    arguments: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ToolInfo:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)  # JSON schema


@dataclass(frozen=True)
class AgentRequest:
    mode: AgentMode
    conversation_id: str  # stable for one conversation: the code interpreter keeps one kernel per id
    messages: Sequence[Mapping[str, Any]]  # {"role", "content"}; the last one is the user's new message
    model: str | None = None  # None: the server's default model
    options: Mapping[str, Any] = field(default_factory=dict)  # max_length, temperature, top_p


@runtime_checkable
class AgentRunner(Protocol):
    modes: Collection[AgentMode]  # the tabs this runner serves

    def list_tools(self) -> list[ToolInfo]:
        """The registered tools, listed on the Tool tab."""
        ...

    def run(self, service: ChatService, request: AgentRequest) -> AsyncIterator[AgentStep]:
        """Answer the last message, yielding steps; the UI closes the iterator when the user stops."""
        ...

    def forget(self, conversation_id: str) -> None:
        """The user cleared the conversation: drop its state (e.g. shut its kernel down)."""
        ...
