"""A test that runs too long writes where every asyncio task waits, before the time limit.

pytest-timeout's alarm cannot interrupt a test whose loop is uvloop (the alarm's
exception lands in a loop callback, which logs it and goes on), so the suite's
limit ends a hung run from a thread instead (`timeout_method = "thread"` in
pyproject.toml), which shows threads, not tasks. This shows the tasks: each
one's chain of awaits down to what it waits for, written to the terminal once,
`DUMP_AFTER_S` into a test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from parley.awaits import await_chain

DUMP_AFTER_S = float(os.environ.get("PARLEY_TEST_HANG_DUMP_S", "200"))


def tasks_report(nodeid: str) -> str:
    """Every pending task of the test's loop with its awaits (read from another thread:
    a best effort, good enough for a loop that stands still)."""
    out = [f"##### {time.strftime('%H:%M:%S')} {nodeid}: still running; its tasks:"]
    # Every task the loop knows, from asyncio's registry: a started role freezes what
    # exists out of the collector (parley/services.py), the test's runner with it,
    # so neither the collector nor the runner can say which tasks are the test's.
    for task in list(vars(asyncio.tasks)["_all_tasks"]):
        try:
            if task.done():
                continue
            out.append(f"=== {task.get_name()} waits for {task._fut_waiter!r:.200}")
            out.extend(f"    {line}" for line in await_chain(task.get_coro()))
        except Exception as err:  # a report, never a failure of its own
            out.append(f"(task not readable: {err!r})")
    return "\n".join(out) + "\n"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    def dump() -> None:
        report = tasks_report(item.nodeid)
        capture: Any = item.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            sys.stderr.write(report)
            sys.stderr.flush()

    timer = threading.Timer(DUMP_AFTER_S, dump)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
