"""Where an asyncio task waits: its chain of awaits, outermost first.

`Task.get_stack()` gives a suspended coroutine's own frame only, not the
coroutines it awaits, so a role that does not stop (or a test that hangs)
would show the line that called `run()`. This follows `cr_await` (and a
generator's `gi_yieldfrom`) down to what the task waits for: a future, a
coroutine of a compiled library (asyncpg's are Cython), or a frame of ours.
"""

from __future__ import annotations

import asyncio
from typing import Any

# A chain longer than this is cut (a recursion of awaits would never end).
_DEPTH = 40


def await_chain(coro: Any) -> list[str]:
    """`file:line function` per coroutine `coro` awaits, down to the innermost; a
    coroutine without Python frames (compiled) as `<its type>`."""
    lines: list[str] = []
    while coro is not None and len(lines) < _DEPTH:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            lines.append(f"<{type(coro).__name__}>")
        else:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


def where_waiting(task: asyncio.Task[Any], frames: int = 6) -> str:
    """The innermost `frames` of `task`'s chain and the future it waits on, one line:
    what a log says about a task that does not end."""
    chain = await_chain(task.get_coro())[-frames:]
    waiter = getattr(task, "_fut_waiter", None)
    on = f" on {waiter!r:.200}" if waiter is not None else ""
    return " <- ".join(reversed(chain)) + on
