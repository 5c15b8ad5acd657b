"""OpenAI tool calling on ChatGLM3 / GLM-4: tool_choice, the grammar a call is generated under, and
turning the model's output (whole or streamed) into `tool_calls` with finish_reason "tool_calls".

- auto: tools in the prompt; the model answers (an empty metadata line, then text) or calls tools,
  and a call's name and arguments are generated under a grammar (chat/tool_grammar.py), so it
  always parses and matches the tool's parameters;
- none: no tools in the prompt (the model cannot call one), the output is plain content;
- a named function, or required with a single tool: the prompt ends in `{name}\\n` after
  `<|assistant|>` (the call's header, prefilled) and the arguments follow the tool's schema;
- required with several tools: the model must call one of them (the grammar holds only calls), and
  picks which.
With parallel_tool_calls (the default) the model may write several calls, `<|assistant|>` between
them, as the chat formats render them. Models of other families keep the previous behaviour:
tools go to their chat template, unparsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmserve.chat import tool_grammar
from glmserve.chat.tool_parsers import GLMToolParser, ToolCallStreamer, tool_parser_for
from glmserve.engine.sampling_params import StructuredOutputsParams
from glmserve.serving.errors import InvalidRequest


@dataclass
class ToolPlan:
    tools: list | None  # what the chat template lists
    prefill: str = ""  # forced call header, already part of the prompt
    parser: GLMToolParser | None = None
    grammar: str | None = None  # Lark: what the model may write (calls, or an answer)

    def prompt_suffix_ids(self, tokenizer: Any) -> list[int]:
        return tokenizer.encode(self.prefill, add_special_tokens=False) if self.prefill else []

    def apply(self, options: dict) -> None:
        """Sampling options for the plan: the grammar replaces the request's own format (kept
        inside it for auto's plain answer), and the text keeps `<|assistant|>` between calls."""
        if self.grammar is not None:
            options["structured_outputs"] = StructuredOutputsParams(grammar=self.grammar)
            options["skip_special_tokens"] = False

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a whole output, and its finish reason."""
        if self.parser is None:
            return {"role": "assistant", "content": text, "tool_calls": []}, finish_reason
        parsed = self.parser.parse(self.prefill + text)
        calls = [call.openai() for call in parsed.tool_calls]
        content = parsed.content if parsed.content or not calls else None
        return {"role": "assistant", "content": content, "tool_calls": calls}, (
            "tool_calls" if calls and finish_reason == "stop" else finish_reason
        )

    def streamer(self) -> ChoiceStream:
        return ChoiceStream(self.parser.streamer() if self.parser else None, self.prefill)


class ChoiceStream:
    """One streamed choice: text deltas in, OpenAI `delta` dicts out."""

    def __init__(self, streamer: ToolCallStreamer | None, prefill: str):
        self.streamer = streamer
        self.pending = prefill  # fed with the first output: the header the model did not write

    def deltas(self, text_delta: str, is_finished: bool) -> list[dict]:
        if self.streamer is None:
            return [{"content": text_delta}] if text_delta else []
        deltas = self.streamer.feed(self.pending + text_delta)
        self.pending = ""
        return deltas + (self.streamer.finish() if is_finished else [])

    def finish_reason(self, reason: str | None) -> str | None:
        if self.streamer is not None and self.streamer.tool_calls and reason == "stop":
            return "tool_calls"
        return reason


def plan_tools(
    tokenizer: Any,
    tools: list | None,
    tool_choice: str | dict | None,
    parallel_tool_calls: bool | None = None,
    answer_format: StructuredOutputsParams | None = None,
) -> ToolPlan:
    """`answer_format`: the request's response_format, which a plain answer (auto) must follow."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return ToolPlan(None)
    names = [_tool_name(t) for t in tools]
    try:
        parser = tool_parser_for(tokenizer, [n for n in names if n])
    except ValueError:
        parser = None
    forced = _forced_name(tool_choice, names)
    if tool_choice == "none":
        return ToolPlan(None)
    if parser is None:
        if forced or tool_choice == "required":
            raise InvalidRequest("forcing a tool call needs a ChatGLM3 or GLM-4 model", param="tool_choice")
        return ToolPlan(tools)
    functions = [t["function"] for t in tools if _tool_name(t)]
    parallel = parallel_tool_calls is not False
    if forced:
        function = next(f for f in functions if f["name"] == forced)
        return ToolPlan(tools, f"{forced}\n", parser, tool_grammar.arguments_grammar(parser, function))
    if not functions:  # only built-in tools (GLM-4's python, cogview, ...): their calls are not schemas
        return ToolPlan(tools, "", parser)
    if tool_choice == "required":
        return ToolPlan(tools, "", parser, tool_grammar.calls_grammar(parser, functions, parallel))
    answer = _answer_rule(answer_format)
    return ToolPlan(tools, "", parser, tool_grammar.auto_grammar(parser, functions, parallel, answer))


def _answer_rule(answer_format: StructuredOutputsParams | None) -> str | None:
    if answer_format is None:
        return None
    if answer_format.json is not None or answer_format.json_object:
        return tool_grammar.json_rule(answer_format.json if answer_format.json is not None else {"type": "object"})
    raise InvalidRequest(
        f"{answer_format.kind} output cannot be combined with tools; use a JSON schema", param="tools"
    )


def _forced_name(tool_choice: str | dict | None, names: list[str | None]) -> str | None:
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return names[0] if len(names) == 1 else None  # several: the model picks, under a grammar
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise InvalidRequest(
                f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
            )
        return name
    raise InvalidRequest(f"unsupported tool_choice {tool_choice!r}", param="tool_choice")


def _tool_name(tool: dict) -> str | None:
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None
