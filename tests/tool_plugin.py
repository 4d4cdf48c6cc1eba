"""Tools a deployment would ship in its own package, loaded by `PARLEY_TOOLS` (tests only)."""

from __future__ import annotations

from actors.tools import Tool, define_tool


def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


def calculator(expression: str) -> str:
    """A deployment's own calculator."""
    return "42"


async def reverse(text: str) -> str:
    """Reverse a text."""
    return text[::-1]


TOOLS = [define_tool(shout), define_tool(calculator)]


def make_tools() -> list[Tool]:
    return [define_tool(reverse)]


NOT_A_TOOL = 5
