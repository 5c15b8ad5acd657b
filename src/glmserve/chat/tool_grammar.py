"""Grammars (llguidance's Lark) that make a ChatGLM3 / GLM-4 tool call parse and match its tool's
parameters, in each family's own call format (what chat/tool_parsers.py reads back):

    GLM-4:    {name}\\n{arguments JSON}
    ChatGLM3: {name}\\n```python\\ntool_call(key=value, ...)\\n```     values as JSON literals
    several calls in one turn (parallel): call <|assistant|> call ...

- `arguments_grammar(parser, tool)`: after a prefilled `{name}\\n` header (a named tool_choice);
- `calls_grammar(parser, tools, parallel)`: one of the tools, named by the model (`required`);
- `auto_grammar(parser, tools, parallel, answer)`: a plain answer (an empty metadata line, then any
  text, or `answer`, a Lark rule body such as a response_format's `%json {...}`) or calls.
SentencePiece (ChatGLM3) writes a leading space where a text begins, hence the optional `" "?`.
No torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from glmserve.chat.tool_parsers import ChatGLM3ToolParser, GLMToolParser
from glmserve.engine.sampling_params import JSON_OPTIONS

ANY_TEXT = "/(?s:.*)/"
ANY_OBJECT = {"type": "object"}


def arguments_grammar(parser: GLMToolParser, tool: Mapping) -> str:
    body, rules = _arguments(parser, tool, "a")
    return "\n".join([f"start: {body}", *rules]) + "\n"


def calls_grammar(parser: GLMToolParser, tools: Sequence[Mapping], parallel: bool) -> str:
    return "start: calls\n" + _calls_rules(parser, tools, parallel)


def auto_grammar(parser: GLMToolParser, tools: Sequence[Mapping], parallel: bool, answer: str | None = None) -> str:
    return f'start: answer | calls\nanswer: " "? "\\n" {answer or ANY_TEXT}\n' + _calls_rules(parser, tools, parallel)


def _calls_rules(parser: GLMToolParser, tools: Sequence[Mapping], parallel: bool) -> str:
    calls = "call (<|assistant|> call)*" if parallel else "call"
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    rules = [f"calls: {calls}", f"call: {alternatives}"]
    for i, tool in enumerate(tools):
        body, extra = _arguments(parser, tool, f"t{i}")
        rules += [f'call_{i}: " "? {_literal(tool["name"] + chr(10))} {body}', *extra]
    return "\n".join(rules) + "\n"


def _arguments(parser: GLMToolParser, tool: Mapping, prefix: str) -> tuple[str, list[str]]:
    """(a rule body for the call's arguments, the rules it uses, named `{prefix}_...`)."""
    parameters = tool.get("parameters") or ANY_OBJECT
    if not isinstance(parser, ChatGLM3ToolParser):
        return json_rule(parameters), []
    body, rules = _keyword_arguments(parameters, prefix)
    return f'" "? "```python\\ntool_call(" {body} ")\\n```"', rules


def _keyword_arguments(parameters: Mapping, prefix: str) -> tuple[str, list[str]]:
    """`key=value, ...` over the schema's properties in their order, the required ones always
    there, each value under its property's schema. Rule {prefix}_first_i: the first argument
    written is property i or a later one; {prefix}_rest_i: ", " and property i or a later one."""
    properties = parameters.get("properties") or {}
    if not properties:
        return '""', []
    required = set(parameters.get("required") or ())
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    n = len(properties)
    rules = [f'{prefix}_first_{n}: ""', f'{prefix}_rest_{n}: ""']
    for i, (name, schema) in enumerate(properties.items()):
        value = f"{_literal(name + '=')} {json_rule({**schema, **defs})}"
        first, rest = f"{value} {prefix}_rest_{i + 1}", f'", " {value} {prefix}_rest_{i + 1}'
        if name not in required:
            first, rest = f"{first} | {prefix}_first_{i + 1}", f"{rest} | {prefix}_rest_{i + 1}"
        rules += [f"{prefix}_first_{i}: {first}", f"{prefix}_rest_{i}: {rest}"]
    return f"{prefix}_first_0", rules


def json_rule(schema: Mapping) -> str:
    """A Lark rule body for JSON under `schema`, in JSON_OPTIONS' style (json.dumps' separators, no
    free whitespace, which a model can otherwise pad forever)."""
    options = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
