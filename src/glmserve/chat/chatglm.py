"""ChatGLM2-6B and ChatGLM3-6B prompts as token ids, by the rules of THUDM's tokenization_chatglm.py.

ChatGLM3 (THUDM/ChatGLM3 PROMPT.md): `[gMASK] sop`, then per message its role token, then
encode(metadata + "\\n"), then encode(content) — each piece encoded on its own, as THUDM's
build_single_message does, so SentencePiece starts each with its "▁" — and a bare
`<|assistant|>` at the end. Role tokens are inserted by id: message text can never become one.
Tools go into the system message as `content + "\\n" + json.dumps(tools, indent=4)`; a tool call
is an assistant turn with metadata = the tool's name and content = a `tool_call(k=v)` code block;
its result is an `<|observation|>` turn.

ChatGLM2: one text, `[Round N]\\n\\n问：{query}\\n\\n答：{response}\\n\\n` per turn from N = 1, then
`[Round N]\\n\\n问：{query}\\n\\n答：` (THUDM's build_prompt). It has no role tokens and no tools; a
system text goes first, followed by "\\n\\n" (as FastChat's chatglm2 template does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmserve.chat.template import message_text

Encode = Callable[[str], list[int]]  # plain text -> ids, never special tokens

CHATGLM3_TOOLS_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
# Generation ends at eos (2) and at the start of a turn that is not the model's (THUDM's demos).
CHATGLM3_STOP_TOKENS = ("<|user|>", "<|observation|>")
ROLE_ALIASES = {"tool": "observation", "function": "observation"}  # OpenAI roles -> GLM roles


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant | observation
    content: str
    metadata: str = ""
    tools: list | None = None  # on a system turn: the tools it offers


def glm_turns(messages: Sequence[Mapping], format_tool_call: Callable[[str, dict], str]) -> list[Turn]:
    """OpenAI-style messages -> GLM turns: tool results become observations, each assistant
    tool call its own turn (metadata = name, content = format_tool_call(name, arguments))."""
    if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    turns = []
    for message in messages:
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant", "observation"):
            raise ValueError(f"unsupported message role {message.get('role')!r}")
        text = message_text(message.get("content")) or ""
        if role == "assistant" and not message.get("metadata") and text.startswith("\n"):
            text = text[1:].strip()  # a raw answer still holding its empty metadata line, as THUDM strips it
        calls = (message.get("tool_calls") or []) if role == "assistant" else []
        if text or not calls:
            turns.append(Turn(role, text, str(message.get("metadata") or ""), message.get("tools")))
        turns += [_tool_call_turn(call, format_tool_call) for call in calls]
    return turns


def _tool_call_turn(call: Mapping, format_tool_call: Callable[[str, dict], str]) -> Turn:
    function = call.get("function") or {}
    name, arguments = function.get("name"), function.get("arguments") or "{}"
    if not isinstance(name, str) or not name:
        raise ValueError("an assistant tool call needs function.name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"tool call {name!r}: arguments are not JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object")
    return Turn("assistant", format_tool_call(name, arguments), metadata=name)


def tool_functions(tools: Sequence[Mapping]) -> list[dict]:
    """OpenAI tools ({"type": "function", "function": {...}}) -> the bare function dicts ChatGLM3 lists."""
    return [
        dict(t["function"]) if t.get("type") == "function" and "function" in t else dict(t) for t in tools
    ]


# ---------------------------------------------------------------- ChatGLM3


def chatglm3_prompt(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None,
    add_generation_prompt: bool,
    encode: Encode,
    special_ids: Mapping[str, int],
) -> list[int]:
    """Prompt ids after the `[gMASK] sop` prefix."""
    ids: list[int] = []
    for turn in _with_tools(glm_turns(messages, chatglm3_tool_call), tools):
        content = turn.content
        if turn.tools:
            content += "\n" + json.dumps(tool_functions(turn.tools), indent=4, ensure_ascii=False)
        ids += [special_ids[f"<|{turn.role}|>"], *encode(f"{turn.metadata}\n"), *encode(content)]
    if add_generation_prompt:
        ids.append(special_ids["<|assistant|>"])
    return ids


def _with_tools(turns: list[Turn], tools: Sequence[Mapping] | None) -> list[Turn]:
    """Tools join the first system turn; without one, THUDM's tool prompt opens the conversation."""
    if not tools:
        return turns
    for i, turn in enumerate(turns):
        if turn.role == "system":
            return [*turns[:i], Turn("system", turn.content, turn.metadata, list(tools)), *turns[i + 1 :]]
    return [Turn("system", CHATGLM3_TOOLS_PROMPT, tools=list(tools)), *turns]


def chatglm3_tool_call(name: str, arguments: dict) -> str:
    """The code block ChatGLM3 writes after `<|assistant|>{name}\\n` (PROMPT.md): keyword values
    as Python literals (strings double-quoted), so `ast.literal_eval` can read them back."""
    kwargs = ", ".join(f"{key}={_python_literal(value)}" for key, value in arguments.items())
    return f"```python\ntool_call({kwargs})\n```"


def _python_literal(value: Any) -> str:
    # JSON string escapes are valid Python escapes; other JSON values have Python reprs.
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------- ChatGLM2


def chatglm2_prompt(
    messages: Sequence[Mapping], tools: Sequence[Mapping] | None, encode: Encode
) -> list[int]:
    """Prompt ids after the `[gMASK] sop` prefix: the whole round text, encoded once."""
    if tools:
        raise ValueError("ChatGLM2 has no tool format; use ChatGLM3 or GLM-4 for tools")
    turns = glm_turns(messages, chatglm3_tool_call)
    system = [t.content for t in turns if t.role == "system"]
    text = "".join(s + "\n\n" for s in system if s)
    expected, round_index = "user", 0
    for turn in (t for t in turns if t.role != "system"):
        if turn.role != expected:
            raise ValueError(
                f"ChatGLM2 turns alternate user and assistant; got {turn.role!r} for {expected!r}"
            )
        if turn.role == "user":
            round_index += 1
            text += f"[Round {round_index}]\n\n问：{turn.content}\n\n答："
        else:
            text += f"{turn.content}\n\n"
        expected = "assistant" if expected == "user" else "user"
    return encode(text)
