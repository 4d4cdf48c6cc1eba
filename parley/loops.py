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
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, TypeVar

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


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is there, with the collector's thresholds
    at `COLLECTOR_THRESHOLDS` until it returns."""
    with _collector_thresholds(), asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


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
