"""Tools from typed Python functions: `@tool` reads a function's signature and docstring and gives
its OpenAI function schema, so one declaration serves the prompt, the API and the call.

    registry = ToolRegistry()

    @registry.tool
    def get_weather(city: Annotated[str, "City name, e.g. Beijing"], unit: Literal["c", "f"] = "c") -> str:
        "The current weather of a city."

    registry.schemas()                  # [{"type": "function", "function": {name, description, parameters}}]
    registry.call("get_weather", {"city": "Paris"})   # -> str, never raises
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

# Python types -> JSON schema types; anything else is described as a string.
JSON_TYPES: dict[Any, str] = {
    str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
}  # fmt: skip


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the keyword arguments
    function: Callable[..., Any]

    def schema(self) -> dict:
        """The OpenAI `tools` entry."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def tool_from_function(function: Callable[..., Any], name: str | None = None) -> Tool:
    """A Tool from a function whose parameters are annotated (`Annotated[type, "description"]`);
    parameters without defaults are required."""
    hints = typing.get_type_hints(function, include_extras=True)
    properties, required = {}, []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ValueError(f"tool {function.__name__}: *args / **kwargs cannot be described to a model")
        properties[parameter.name] = _property(hints.get(parameter.name, str))
        if parameter.default is parameter.empty:
            required.append(parameter.name)
        else:
            properties[parameter.name]["default"] = parameter.default
    description = inspect.cleandoc(function.__doc__ or "").strip()
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(name or function.__name__, description, parameters, function)


def _property(hint: Any) -> dict:
    description = ""
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        description = " ".join(e for e in extras if isinstance(e, str))
    schema = _type_schema(hint)
    return {**schema, "description": description} if description else schema


def _type_schema(hint: Any) -> dict:
    origin = typing.get_origin(hint)
    if origin is Literal:
        values = list(typing.get_args(hint))
        return {"type": JSON_TYPES.get(type(values[0]), "string"), "enum": values}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _type_schema(options[0]) if len(options) == 1 else {}
    if origin in (list, tuple, set):
        args = typing.get_args(hint)
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    return {"type": JSON_TYPES.get(origin or hint, "string")}


class ToolRegistry:
    """Named tools; `call` turns any failure into an error text for the model to read."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def tool(self, function: Callable | None = None, *, name: str | None = None):
        """Decorator registering a function as a tool (usable bare or as `@tool(name=...)`)."""

        def register(f: Callable) -> Callable:
            self.add(tool_from_function(f, name))
            return f

        return register(function) if function is not None else register

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool

    def schemas(self, names: list[str] | None = None) -> list[dict]:
        return [t.schema() for n, t in self.tools.items() if names is None or n in names]

    def call(self, name: str, arguments: Mapping[str, Any]) -> str:
        """The tool's result as text (JSON unless it is a string); errors come back as text too,
        because a tool failure is an observation the model can react to, not a server error."""
        tool = self.tools.get(name)
        if tool is None:
            return f"Error: no tool named {name!r}; available: {', '.join(self.tools) or 'none'}"
        unknown = set(arguments) - set(tool.parameters["properties"])
        if unknown:
            return f"Error: {name} got unknown arguments {sorted(unknown)}"
        try:
            result = tool.function(**arguments)
        except Exception as error:  # the model chose the arguments: any failure is its observation
            return f"Error: {name} failed: {type(error).__name__}: {error}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


default_registry = ToolRegistry()
tool = default_registry.tool  # `@tool` registers into the default registry
