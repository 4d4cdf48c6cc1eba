"""The tools the model may call during a turn (the ReAct loop's actions).

A tool is a name, a JSON schema the model sees, and an async handler that takes
the parsed arguments and returns text. Tools get the clock from the context;
they never read it themselves, so a test can pin time.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import json
import logging
import math
import operator
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

log = logging.getLogger(__name__)


class ToolContext(msgspec.Struct, frozen=True):
    conversation_id: str
    user_id: str
    project_id: str | None
    now_ns: int


class ToolError(Exception):
    """A tool refused its input; the message goes back to the model as the tool's error."""


Handler = Callable[[dict[str, Any], ToolContext], Awaitable[str]]


class Tool(msgspec.Struct, frozen=True):
    name: str
    description: str
    parameters: dict[str, Any]
    handler: Handler
    # Bounds on one call: a tool that runs longer is abandoned with an error the
    # model reads; a longer result is cut (what the log and the model can carry).
    timeout_s: float = 10.0
    max_result_chars: int = 64 * 1024

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


async def _current_time(args: dict[str, Any], ctx: ToolContext) -> str:
    return dt.datetime.fromtimestamp(ctx.now_ns / 1e9, tz=dt.UTC).isoformat(timespec="seconds")


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_MAX_EXPRESSION = 200
_MAX_EXPONENT = 100
# Integers stay below 2**4096 at every step: Python's big integers would
# otherwise let `(((9**99)**99)**99)**99` run for minutes on the event loop.
_MAX_BITS = 4096


def _bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 64


def _check_size(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse an operation whose integer result would pass _MAX_BITS, before doing it."""
    both_int = isinstance(left, int) and isinstance(right, int)
    if isinstance(op, ast.Pow):
        if abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent larger than {_MAX_EXPONENT}")
        grows_to = _bits(left) * right if both_int and right > 0 else 0
    elif isinstance(op, ast.Mult):
        grows_to = _bits(left) + _bits(right) if both_int else 0
    else:
        grows_to = 0
    if grows_to > _MAX_BITS:
        raise ToolError(f"result larger than 2**{_MAX_BITS}")


def evaluate(expression: str) -> float | int:
    """Arithmetic only: numbers and + - * / // % **, nothing Python could execute.

    The work is bounded as well as the input: no integer above 2**4096, no
    exponent above 100, no float that overflows, so one call takes microseconds.
    """
    if len(expression) > _MAX_EXPRESSION:
        raise ToolError(f"expression longer than {_MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from err

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if _bits(node.value) > _MAX_BITS:
                raise ToolError(f"number larger than 2**{_MAX_BITS}")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            _check_size(node.op, left, right)
            try:
                return _BINARY[type(node.op)](left, right)
            except ZeroDivisionError as err:
                raise ToolError("division by zero") from err
            except OverflowError as err:
                raise ToolError("result too large") from err
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ToolError(f"unsupported element in expression: {ast.dump(node)[:60]}")

    result = walk(tree)
    if isinstance(result, complex):
        raise ToolError("the result is not a real number")
    if isinstance(result, float) and not math.isfinite(result):
        raise ToolError("result too large")
    return int(result) if isinstance(result, float) and result.is_integer() else result


async def _calculator(args: dict[str, Any], ctx: ToolContext) -> str:
    expression = args.get("expression")
    if not isinstance(expression, str):
        raise ToolError("argument 'expression' (a string) is required")
    return json.dumps(evaluate(expression))


BUILTIN_TOOLS: tuple[Tool, ...] = (
    Tool(
        name="get_current_time",
        description="The current date and time in UTC, ISO 8601.",
        parameters={"type": "object", "properties": {}},
        handler=_current_time,
    ),
    Tool(
        name="calculator",
        description="Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
        handler=_calculator,
    ),
)


class ToolOutcome(msgspec.Struct, frozen=True):
    result: str | None = None
    error: str | None = None


async def run_tool(
    tools: dict[str, Tool], name: str, arguments: str, ctx: ToolContext
) -> ToolOutcome:
    """Run one tool call; every failure becomes an error the model can read, never an exception."""
    tool = tools.get(name)
    if tool is None:
        return ToolOutcome(error=f"unknown tool {name!r}")
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as err:
        return ToolOutcome(error=f"arguments are not valid JSON: {err.msg}")
    if not isinstance(args, dict):
        return ToolOutcome(error="arguments must be a JSON object")
    try:
        async with asyncio.timeout(tool.timeout_s):
            result = await tool.handler(args, ctx)
    except ToolError as err:
        return ToolOutcome(error=str(err))
    except TimeoutError:
        return ToolOutcome(error=f"tool {name!r} took longer than {tool.timeout_s:g}s")
    except Exception as err:
        # A broken tool is the model's problem to route around, not the turn's end.
        log.exception("tool crashed", extra={"tool": name})
        return ToolOutcome(error=f"tool {name!r} failed: {type(err).__name__}")
    if not isinstance(result, str):
        return ToolOutcome(error=f"tool {name!r} returned {type(result).__name__}, not text")
    if len(result) > tool.max_result_chars:
        cut = len(result) - tool.max_result_chars
        result = result[: tool.max_result_chars] + f"\n[... {cut} characters cut]"
    return ToolOutcome(result=result)
