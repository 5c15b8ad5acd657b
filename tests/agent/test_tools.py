"""The @tool registry's schemas and the built-in tools (calculator without eval, shell off)."""

from typing import Annotated, Literal

import pytest

from glmserve.agent.builtin_tools import builtin_registry, calculator
from glmserve.agent.tools import ToolRegistry


def test_schema_from_a_typed_function():
    registry = ToolRegistry()

    @registry.tool
    def get_weather(
        city: Annotated[str, "City name"], unit: Literal["c", "f"] = "c", days: list[int] | None = None
    ) -> dict:
        """The weather of a city."""
        return {"city": city, "unit": unit}

    [schema] = registry.schemas()
    assert schema == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather of a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
            "days": {"type": "array", "items": {"type": "integer"}, "default": None},
        }},
    }}  # fmt: skip
    assert registry.call("get_weather", {"city": "Paris"}) == '{"city": "Paris", "unit": "c"}'
    assert registry.call("get_weather", {"town": "x"}).startswith("Error")
    assert registry.call("get_weather", {}).startswith("Error: get_weather failed: TypeError")
    assert registry.call("nope", {}).startswith("Error: no tool named")


@pytest.mark.parametrize(
    "expression, value", [("1 + 2 * 3", "7"), ("(3 + 4) * 2 ** 3", "56"), ("sqrt(16) + pi - pi", "4.0")]
)
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression", ["__import__('os').system('id')", "9 ** 9 ** 9", "factorial(10**6)", "x", "[1] * 10", "'a'"]
)
def test_calculator_refuses(expression):
    with pytest.raises(ValueError):
        calculator(expression)


def test_builtins_have_no_shell_by_default():
    assert set(builtin_registry().tools) == {"get_current_time", "calculator", "python"}
    assert "shell" in builtin_registry(enable_shell=True).tools
    assert builtin_registry().call("get_current_time", {"timezone": "UTC"}).endswith("UTC")
