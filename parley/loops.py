"""How parley's long-running processes run: on uvloop where it is installed, with
the garbage collector's young generation made larger.

Measured with py-spy on `parley bench capacity` (README: Benchmarks): on the
stock loop a fifth of the process's time went to the loop's own bookkeeping
(timer handles for every `wait_for`, task creation, `transport.write`);
uvloop does the same work in C.

The collector: CPython collects its youngest generation whenever 700 more
container objects have been made than freed. A worker with 1,000 turns
streaming holds tens of thousands of young objects that are alive at every
such moment (each turn's awaits make a coroutine, a future and their frames
per token), so every collection walked them all, moved them to the older
generations, and those filled and were walked in turn: a quarter of the
worker's CPU (py-spy with native frames), with full collections of up to 170
ms stopping its loop every few seconds (gc callbacks). Almost none of it is
garbage a cycle holds: reference counting frees it. With a young generation
of 50,000 the collector runs a few times a minute at that load instead of
twenty-five times a second (README: "Benchmark log", "The collector").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, NoReturn, TypeVar

from parley.awaits import where_waiting

log = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# gc.set_threshold's three numbers: new objects before the young generation is
# collected, then young collections before the middle one is, and middle ones
# before a full collection (which CPython also holds back until a quarter of the
# old generation is new). Python's defaults are (700, 10, 10).
COLLECTOR_THRESHOLDS: Final = (50_000, 10, 10)


# What the process's other tasks get to end in, cancelled, once `main` is done
# (`run`). asyncio's own runner waits for them without a limit.
LEFTOVERS_WITHIN_S: Final = 5.0
# The exit code of a process that had to leave a task behind: its stop was not clean.
LEFT_BEHIND_EXIT: Final = 1


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is there, with the collector's thresholds
    at `COLLECTOR_THRESHOLDS` until it returns.

    Unlike `asyncio.run`, a task that does not end when cancelled does not keep
    the process for ever: one seen in CI (a library swallowed the cancel and
    waited for an answer that never came) held a stopped `parley serve` past
    any deadline, with nothing said. After `LEFTOVERS_WITHIN_S` such tasks are
    logged with where they wait, and the process exits (`LEFT_BEHIND_EXIT`)."""
    with _collector_thresholds(), asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            return runner.run(main)
        finally:
            stuck = runner.run(_end_the_rest(LEFTOVERS_WITHIN_S))
            if stuck:
                _exit_without(stuck, sys.exception())


async def _end_the_rest(within_s: float) -> list[asyncio.Task[Any]]:
    """Cancel every other task of the loop; those not ended within `within_s`."""
    this = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not this]
    if not rest:
        return []
    for task in rest:
        task.cancel()
    _, pending = await asyncio.wait(rest, timeout=within_s)
    return list(pending)


def _exit_without(stuck: list[asyncio.Task[Any]], error: BaseException | None) -> NoReturn:
    if error is not None:  # what `main` raised, which the exit would otherwise lose
        log.error("the process stops on an error", exc_info=error)
    log.error(
        "%d task(s) did not end when cancelled; the process exits without them: %s",
        len(stuck),
        "; ".join(f"{t.get_name()} waiting in {where_waiting(t)}" for t in stuck[:10]),
    )
    logging.shutdown()  # flushes the handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LEFT_BEHIND_EXIT)


@contextlib.contextmanager
def _collector_thresholds() -> Iterator[None]:
    """The collector's thresholds set to `COLLECTOR_THRESHOLDS` inside the block, put
    back after."""
    before = gc.get_threshold()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def loop_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"uvloop {version('uvloop')}"
    except PackageNotFoundError:
        return "asyncio"
