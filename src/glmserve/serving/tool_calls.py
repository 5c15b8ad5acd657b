"""OpenAI tool calling on ChatGLM3 / GLM-4: tool_choice, the forced call header, and turning the
model's output (whole or streamed) into `tool_calls` with finish_reason "tool_calls".

- auto: tools in the prompt, the output parsed;
- none: no tools in the prompt (the model cannot call one), the output is plain content;
- a named function, or required with a single tool: the prompt ends in `{name}\\n` after
  `<|assistant|>` (the call's header, prefilled), so the model can only write that call's arguments;
- required with several tools: the model must call one of them. Each tool's call header
  `{name}\n` is scored by the model's own log-probability after the prompt (one batched
  request, prompt logprobs, one token each), and the likeliest header is prefilled as above.
Models of other families keep the previous behaviour: tools go to their chat template, unparsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmserve.chat.tool_parsers import GLMToolParser, ToolCallStreamer, tool_parser_for
from glmserve.serving.errors import InvalidRequest


@dataclass
class ToolPlan:
    tools: list | None  # what the chat template lists
    prefill: str = ""  # forced call header, already part of the prompt
    parser: GLMToolParser | None = None
    choose_among: list[str] | None = None  # "required" with several tools: pick a header first

    def prompt_suffix_ids(self, tokenizer: Any) -> list[int]:
        return tokenizer.encode(self.prefill, add_special_tokens=False) if self.prefill else []

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


def plan_tools(tokenizer: Any, tools: list | None, tool_choice: str | dict | None) -> ToolPlan:
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
    if tool_choice == "required" and not forced:
        return ToolPlan(tools, "", parser, choose_among=[n for n in names if n])
    return ToolPlan(tools, f"{forced}\n" if forced else "", parser)


async def choose_required_tool(service: Any, model: Any, prompt_ids: list[int], names: list[str]) -> str:
    """The tool whose call header the model finds likeliest after `prompt_ids` (sum of the
    header tokens' log-probabilities: the model's own choice, constrained to a real call)."""
    from glmserve.engine.sampling_params import SamplingParams
    from glmserve.serving.service import collect

    headers = [model.tokenizer.encode(f"{name}\n", add_special_tokens=False) for name in names]
    params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)] * len(names)
    events = service.generate(model, [prompt_ids + h for h in headers], params)
    completions = await collect(events, len(names))
    start = len(prompt_ids)
    scores = [
        sum(entry[token] for entry, token in zip(c.prompt_logprobs[start:], header, strict=True))
        for c, header in zip(completions, headers, strict=True)
    ]
    return names[max(range(len(names)), key=scores.__getitem__)]


def _forced_name(tool_choice: str | dict | None, names: list[str | None]) -> str | None:
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return names[0] if len(names) == 1 else None  # several: chosen by choose_required_tool
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
