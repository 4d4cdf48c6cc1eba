"""Tools a deployment would ship in its own package, loaded by `PARLEY_TOOLS` (tests only)."""

from __future__ import annotations

import asyncio
import json
import time

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


# ---------------------------------------------------------------- tools for live turns


async def sleepy(ms: int) -> str:
    """Wait, then say how long (shows calls of one round running side by side)."""
    await asyncio.sleep(ms / 1000)
    return f"slept {ms} ms"


async def boom() -> str:
    """Always fails."""
    raise RuntimeError("the tool broke")


async def slowpoke() -> str:
    """Takes longer than it may."""
    await asyncio.sleep(30)
    return "never"


async def holds_the_loop() -> str:
    """Blocks the event loop, as an async tool that calls a blocking client does."""
    time.sleep(1.5)  # noqa: ASYNC251  # what is shown: a tool that should not
    return "done holding"


def not_text() -> bytes:
    """Returns something that is not text."""
    return b"binary"


def from_outside() -> str:
    """Returns text as `json.loads` makes it from outside data: with a lone surrogate."""
    text: str = json.loads('"half a pair: \\ud83d."')
    return text


def project_notes() -> str:
    """A project-only tool (by its name): hidden from, and refused in, personal scope."""
    return "the project's notes"


LIVE_TOOLS = (
    define_tool(project_notes),
    define_tool(sleepy),
    define_tool(boom),
    define_tool(slowpoke, timeout_s=0.2),
    define_tool(holds_the_loop),
    define_tool(not_text),
    define_tool(from_outside),
)


# ---------------------------------------------------------------- tools no model API accepts

BADLY_NAMED = Tool(
    name="look up/order",
    description="Made by hand, with a name a model's API refuses.",
    parameters={"type": "object", "properties": {}},
    handler=shout,
)


def shout_again(text: str) -> str:
    """Another package's tool that took the name `shout` too."""
    return text


SHOUT_TOO = [define_tool(shout_again, name="shout")]
