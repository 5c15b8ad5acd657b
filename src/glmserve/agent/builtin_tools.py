"""Built-in tools of `glmserve chat --tools` and the web UI's Tool tab: the current time, a
calculator (an AST walker, never eval) and Python (run by the agent in the conversation's
kernel). A shell tool exists for trusted local use and is registered only on request.
"""

from __future__ import annotations

import ast
import math
import operator
import subprocess
from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo

from glmserve.agent.tools import ToolRegistry, tool_from_function

MAX_EXPONENT = 10_000  # 2 ** 10_000 is instant; 9 ** 9 ** 9 would hang the server
MAX_EXPRESSION_CHARS = 1_000
SHELL_TIMEOUT_S = 30
BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {
    name: getattr(math, name)
    for name in ("sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "log", "log10", "log2", "exp",
                 "floor", "ceil", "factorial", "radians", "degrees")
}  # fmt: skip
FUNCTIONS |= {"abs": abs, "round": round, "min": min, "max": max}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def get_current_time(
    timezone: Annotated[str, "IANA time zone, e.g. Asia/Shanghai or UTC"] = "UTC",
) -> str:
    """The current date and time in a time zone."""
    return datetime.now(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def calculator(expression: Annotated[str, "An arithmetic expression, e.g. (3 + 4) * sqrt(2)"]) -> str:
    """Evaluate an arithmetic expression: + - * / // % **, parentheses, math functions
    (sqrt, sin, cos, log, exp, ...) and the constants pi, e, tau."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    return str(_evaluate(ast.parse(expression.strip(), mode="eval").body))


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        return UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
        return BINARY_OPS[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords:
            raise ValueError("keyword arguments are not supported")
        arguments = [_evaluate(a) for a in node.args]
        if node.func.id == "factorial" and arguments and arguments[0] > MAX_EXPONENT:
            raise ValueError(f"factorial argument is too large (limit {MAX_EXPONENT})")
        return FUNCTIONS[node.func.id](*arguments)
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:80]}")


def python(code: Annotated[str, "Python code to run in a stateful Jupyter kernel"]) -> str:
    """Run Python code and return its output; variables persist within the conversation."""
    # The agent loop runs this call in the conversation's own kernel; reaching this body means
    # the tool was called outside an agent, where no kernel belongs to the caller.
    raise RuntimeError("python runs only inside an agent conversation with a code interpreter")


def shell(command: Annotated[str, "A shell command line"]) -> str:
    """Run a shell command on the server and return its output. Dangerous: off unless enabled."""
    done = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=SHELL_TIMEOUT_S, check=False
    )
    return f"exit code {done.returncode}\n{done.stdout}{done.stderr}"


def builtin_registry(enable_python: bool = True, enable_shell: bool = False) -> ToolRegistry:
    """A registry of the built-in tools; the shell tool only when explicitly enabled."""
    registry = ToolRegistry()
    for function in (get_current_time, calculator):
        registry.add(tool_from_function(function))
    if enable_python:
        registry.add(tool_from_function(python))
    if enable_shell:
        registry.add(tool_from_function(shell))
    return registry
