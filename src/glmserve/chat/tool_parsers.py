"""Model output -> content + OpenAI tool_calls for ChatGLM3 and GLM-4, without eval.

Both families answer in one turn shaped `{metadata}\\n{content}` after `<|assistant|>`:
- empty metadata: a plain answer (THUDM strips the content);
- `interpreter` (ChatGLM3) / `python` (GLM-4): code to run, `{content}` a ```python block ->
  a call of that name with arguments {"code": ...};
- any other name: a tool call. ChatGLM3 writes ```python\\ntool_call(k=v, ...)\\n``` whose keyword
  values are read with `ast.literal_eval` (THUDM's demo `eval`s them; JSON's true/false/null, which
  constrained decoding writes, are read too); GLM-4 writes `{json}`.
Several calls in one turn (parallel tool calls) are separated by `<|assistant|>`, as the chat
formats render them: the text must keep special tokens (skip_special_tokens=False).
Output that does not parse is returned as plain content; no method here raises.

    parser = ChatGLM3ToolParser(tool_names={"get_weather"})
    parser.parse(text)                        # ParsedOutput(content, tool_calls)
    stream = parser.streamer()                # per choice
    deltas = stream.feed(text_delta) + stream.finish()   # OpenAI `delta` dicts
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

CODE_TOOL_NAMES = ("interpreter", "python")  # metadata that means "run this code"
MAX_NAME_CHARS = 64  # OpenAI's limit on function names: longer metadata is prose, not a call
MAX_CALL_CHARS = 100_000  # bounds ast.parse's work on a runaway output
NAME_PATTERN = re.compile(r"[A-Za-z_][\w.\-]*")
FENCE = re.compile(r"```[\w+-]*\n?(.*?)\n?```", re.DOTALL)
CALL_SEPARATOR = "<|assistant|>"  # between the calls of one turn
JSON_LITERALS = {"true": True, "false": False, "null": None}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


class GLMToolParser:
    """The shared half: the metadata line, code calls and streaming; subclasses read the arguments."""

    def __init__(self, tool_names: Collection[str] | None = None, allow_code: bool = True):
        self.tool_names = set(tool_names) if tool_names is not None else None  # None: any name
        self.allow_code = allow_code

    def parse(self, text: str) -> ParsedOutput:
        """The whole output of one turn."""
        try:
            return self._parse(text)
        except Exception:  # an adversarial output must never become a server error
            return ParsedOutput(text)

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self)

    def could_be_call(self, head: str) -> bool:
        """Whether text starting with `head` (no newline yet) may still become a call's metadata."""
        head = head.strip()
        return len(head) <= MAX_NAME_CHARS and (not head or NAME_PATTERN.fullmatch(head) is not None)

    def _parse(self, text: str) -> ParsedOutput:
        segments = text.split(CALL_SEPARATOR)
        if len(segments) > 1:  # several calls: all must parse, else it is all content
            parsed = [self._parse_segment(segment) for segment in segments]
            if all(p.tool_calls for p in parsed):
                return ParsedOutput("", [call for p in parsed for call in p.tool_calls])
            return ParsedOutput(text)
        return self._parse_segment(text)

    def _parse_segment(self, text: str) -> ParsedOutput:
        metadata, newline, content = text.partition("\n")
        metadata = metadata.strip()
        if not newline or not metadata:  # no metadata line, or an empty one: a plain answer
            return ParsedOutput(content.strip() if newline else text)
        arguments = self._arguments(metadata, content) if self._is_known(metadata) else None
        if arguments is None:
            return ParsedOutput(text)
        return ParsedOutput(
            "", [ToolCall(metadata, json.dumps(arguments, ensure_ascii=False, allow_nan=False))]
        )

    def _is_known(self, name: str) -> bool:
        if len(name) > MAX_NAME_CHARS or not NAME_PATTERN.fullmatch(name):
            return False
        if name in CODE_TOOL_NAMES and self.allow_code:
            return True
        return self.tool_names is None or name in self.tool_names

    def _arguments(self, name: str, content: str) -> dict | None:
        if len(content) > MAX_CALL_CHARS:
            return None
        if name in CODE_TOOL_NAMES and self.allow_code and name not in (self.tool_names or ()):
            code = _unfence(content)
            return {"code": code} if code.strip() else None
        return self.function_arguments(content)

    def function_arguments(self, content: str) -> dict | None:
        raise NotImplementedError


class ChatGLM3ToolParser(GLMToolParser):
    def function_arguments(self, content: str) -> dict | None:
        """```python\\ntool_call(k=v, ...)\\n``` -> {k: v}: only a call of keyword literals passes."""
        tree = ast.parse(_unfence(content).strip(), mode="eval")
        call = tree.body
        if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
            return None
        if any(keyword.arg is None for keyword in call.keywords):  # **kwargs
            return None
        return {keyword.arg: ast.literal_eval(_JSONLiterals().visit(keyword.value)) for keyword in call.keywords}


class _JSONLiterals(ast.NodeTransformer):
    """true / false / null (JSON) -> True / False / None, so literal_eval reads them."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(JSON_LITERALS[node.id]) if node.id in JSON_LITERALS else node


class GLM4ToolParser(GLMToolParser):
    def function_arguments(self, content: str) -> dict | None:
        arguments = json.loads(_unfence(content).strip() or "{}")
        return arguments if isinstance(arguments, dict) else None


def _unfence(content: str) -> str:
    found = FENCE.search(content)
    return found.group(1) if found else content


class ToolCallStreamer:
    """Streams one choice: text that may still be a call's metadata line is held back; once the
    line is complete, a plain answer flows on as content and a call is held until it is complete
    (the next call's `<|assistant|>`, or the end), then sent as `delta.tool_calls` (or, if it does
    not parse, as content)."""

    def __init__(self, parser: GLMToolParser):
        self.parser = parser
        self.held = ""  # text not yet sent
        self.mode = "head"  # head: metadata line unread | content: plain answer | call: held call
        self.is_answer_started = False
        self.tool_calls: list[ToolCall] = []

    def feed(self, delta: str) -> list[dict]:
        try:
            return self._feed(delta)
        except Exception:  # never lose text: fall back to passing it through
            text, self.held, self.mode = self.held + delta, "", "content"
            return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        """The deltas still owed at the end of the output."""
        text, self.held = self.held, ""
        if self.mode == "content":
            return [{"content": text.rstrip()}] if text.rstrip() else []
        parsed = self.parser.parse(text)
        if not parsed.tool_calls:
            return [{"content": parsed.content}] if parsed.content else []
        return self._send(parsed.tool_calls)

    def _send(self, calls: list[ToolCall]) -> list[dict]:
        first = len(self.tool_calls)
        self.tool_calls += calls
        return [_call_delta(first + i, call) for i, call in enumerate(calls)]

    def _feed(self, delta: str) -> list[dict]:
        self.held += delta
        if self.mode == "call":
            return self._completed_calls()
        if self.mode == "head":
            return self._read_head()
        return self._flow()

    def _completed_calls(self) -> list[dict]:
        """Calls followed by `<|assistant|>` are complete: sent now, the rest held."""
        deltas = []
        while CALL_SEPARATOR in self.held:
            segment, _, rest = self.held.partition(CALL_SEPARATOR)
            parsed = self.parser.parse(segment)
            if not parsed.tool_calls:
                break  # not a call after all: all of it goes out at the end
            deltas += self._send(parsed.tool_calls)
            self.held = rest
        return deltas

    def _read_head(self) -> list[dict]:
        metadata, newline, rest = self.held.partition("\n")
        if not newline:
            if self.parser.could_be_call(metadata):
                return []
            self.mode = "content"  # prose with no metadata line
            return self._flow()
        if not metadata.strip():
            self.held, self.mode = rest, "content"  # the empty metadata line of a plain answer
            return self._flow()
        self.mode = "call" if self.parser._is_known(metadata.strip()) else "content"
        return self._completed_calls() if self.mode == "call" else self._flow()

    def _flow(self) -> list[dict]:
        """Plain content: leading whitespace dropped, trailing whitespace held (THUDM strips both)."""
        text = self.held if self.is_answer_started else self.held.lstrip()
        body = text.rstrip()
        self.held = text[len(body) :]
        if not body:
            return []
        self.is_answer_started = True
        return [{"content": body}]


def _call_delta(index: int, call: ToolCall) -> dict:
    function = {"name": call.name, "arguments": call.arguments}
    return {"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": function}]}


def tool_parser_for(tokenizer: object, tool_names=None) -> GLMToolParser:
    """ChatGLM3's or GLM-4's parser, told apart by their special tokens (`sop` vs `<sop>`)."""
    special_ids = getattr(tokenizer, "special_ids", {}) or {}
    if "<|observation|>" not in special_ids:
        raise ValueError("tools need a ChatGLM3 or GLM-4 model (a format with <|observation|> turns)")
    return (GLM4ToolParser if "<sop>" in special_ids else ChatGLM3ToolParser)(tool_names)
