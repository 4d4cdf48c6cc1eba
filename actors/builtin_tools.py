"""The tools every deployment has: the clock, a bounded calculator, search over this
conversation's messages, and naming the conversation.

Each is defined from a typed handler (`actors.tools.define_tool`), so its
parameter schema is never written by hand. The calculator is sync and bounded
in the work it may do; the others are small and async.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from actors.tools import Tool, ToolContext, ToolError, ToolReply, define_tool
from events.vocabulary import TITLE_LIMIT

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
# Integers stay below 2**4096 at every step: Python's big integers would
# otherwise let `(((9**99)**99)**99)**99` run for minutes on the event loop.
_MAX_BITS = 4096
# Floats are shown as integers only where every integer is exact: 1e23 is
# 99999999999999991611392 as an integer, digits that mean nothing.
_EXACT_FLOAT_INTEGERS = 2**53


def _bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 64


def _check_size(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse a product or power whose integer result would pass _MAX_BITS, before doing it.

    The estimate is within a bit of the result's size; the exact check follows it.
    """
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # a float's result overflows (OverflowError) in microseconds instead
    if isinstance(op, ast.Pow):
        grows_to = right * math.log2(abs(left)) if right > 0 and abs(left) > 1 else 0
    elif isinstance(op, ast.Mult):
        grows_to = _bits(left) + _bits(right) - 1
    else:
        return
    if grows_to > _MAX_BITS:
        raise ToolError(f"result larger than 2**{_MAX_BITS}")


def evaluate(expression: str) -> float | int:
    """Arithmetic only: numbers and + - * / // % **, nothing Python could execute.

    The work is bounded as well as the input: no integer above 2**4096 (a
    product or power that would pass it is refused before it is computed), no
    float that overflows, so one call takes microseconds.
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
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError as err:
                raise ToolError("division by zero") from err
            except OverflowError as err:
                raise ToolError("result too large") from err
            if _bits(value) > _MAX_BITS:
                raise ToolError(f"result larger than 2**{_MAX_BITS}")
            return value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ToolError(f"unsupported element in expression: {ast.dump(node)[:60]}")

    result = walk(tree)
    if isinstance(result, complex):
        raise ToolError("the result is not a real number")
    if isinstance(result, float) and not math.isfinite(result):
        raise ToolError("result too large")
    exact = isinstance(result, float) and result.is_integer()
    return int(result) if exact and abs(result) <= _EXACT_FLOAT_INTEGERS else result


async def get_current_time(ctx: ToolContext) -> str:
    """The current date and time in UTC, ISO 8601."""
    return dt.datetime.fromtimestamp(ctx.now_ns / 1e9, tz=dt.UTC).isoformat(timespec="seconds")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses)."""
    return json.dumps(evaluate(expression))


_SEARCH_LIMIT = 5
_SNIPPET = 160


async def search_messages(query: str, ctx: ToolContext, limit: int = _SEARCH_LIMIT) -> str:
    """Search this conversation's earlier messages for words; returns the best matches."""
    words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
    if not words:
        raise ToolError("the query has no words to search for")
    scored = []
    for position, message in enumerate(ctx.messages):
        text = message.text.lower()
        score = sum(text.count(word) for word in words)
        if score:
            scored.append((score, position, message))
    scored.sort(key=lambda item: (-item[0], -item[1]))
    hits = [
        {"message_id": m.message_id, "role": m.role, "snippet": _snippet(m.text, words)}
        for _, _, m in scored[: max(1, min(limit, 20))]
    ]
    return json.dumps({"matches": hits, "total": len(scored)})


def _snippet(text: str, words: list[str]) -> str:
    lower = text.lower()
    at = min((i for i in (lower.find(w) for w in words) if i >= 0), default=0)
    start = max(0, at - _SNIPPET // 3)
    piece = text[start : start + _SNIPPET]
    return ("…" if start else "") + piece + ("…" if start + _SNIPPET < len(text) else "")


async def set_title(title: str) -> ToolReply:
    """Name this conversation (shown in the user's list of conversations)."""
    title = " ".join(title.split())
    if not title:
        raise ToolError("the title is empty")
    if len(title) > TITLE_LIMIT or "\x00" in title:
        raise ToolError(f"a title has at most {TITLE_LIMIT} characters and no NUL")
    return ToolReply(result=json.dumps({"title": title}), set_title=title)


BUILTIN_TOOLS: tuple[Tool, ...] = (
    define_tool(get_current_time, timeout_s=1.0),
    define_tool(calculator, timeout_s=2.0, max_concurrency=2),
    define_tool(search_messages, timeout_s=2.0),
    define_tool(set_title, timeout_s=1.0),
)
