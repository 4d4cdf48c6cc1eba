"""The stall watch: code that holds the event loop is named; a busy loop is not a stall."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from parley.stalls import StallWatch


def computes_for(seconds: float) -> None:
    """Holds the thread it runs on, as a blocking call does."""
    time.sleep(seconds)


async def test_code_that_holds_the_loop_is_named_and_its_stall_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="parley.stalls")
    stalls: list[float] = []
    counted = asyncio.Event()
    loop = asyncio.get_running_loop()

    def count(held_s: float) -> None:  # on the watch's thread
        stalls.append(held_s)
        loop.call_soon_threadsafe(counted.set)

    watch = StallWatch(threshold_s=0.2, beat_s=0.02, counted=count)
    watch.start()
    try:
        await asyncio.sleep(0.1)
        computes_for(0.6)
        async with asyncio.timeout(5):
            await counted.wait()
    finally:
        watch.stop()
    (held,) = [r for r in caplog.records if r.getMessage().startswith("event loop held")]
    assert held.__dict__["where"].endswith(" computes_for"), held.__dict__
    assert "test_code_that_holds_the_loop" in held.__dict__["frames"], held.__dict__
    assert stalls and 0.4 <= stalls[0] <= 1.5, stalls


async def test_a_loop_busy_with_short_callbacks_is_no_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="parley.stalls")
    stalls: list[float] = []
    watch = StallWatch(threshold_s=0.2, beat_s=0.02, counted=stalls.append)
    watch.start()
    try:
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            computes_for(0.01)  # each step holds the loop a little, then lets it beat
            await asyncio.sleep(0)
    finally:
        watch.stop()
    assert stalls == [] and not caplog.records, caplog.records


def test_a_loop_late_with_many_short_callbacks_is_no_stall_on_asyncios_own_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Overload, not a stall: each callback holds the loop a millisecond, a thousand of
    them make every beat late. Each run's frame is freed as it ends and the next one's
    made at the same address; told apart by identity, they looked like one callback
    holding the loop for seconds."""
    caplog.set_level(logging.WARNING, logger="parley.stalls")
    stalls: list[float] = []

    async def overloaded() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        until = time.monotonic() + 2.0

        def step() -> None:
            computes_for(0.001)
            if time.monotonic() < until:
                loop.call_soon(step)
            elif not done.done():
                done.set_result(None)

        watch = StallWatch(threshold_s=0.5, beat_s=0.05, counted=stalls.append)
        watch.start()
        try:
            for _ in range(1000):
                loop.call_soon(step)
            await done
        finally:
            watch.stop()

    with asyncio.Runner() as runner:  # asyncio's loop: its Handle runs callbacks in Python
        runner.run(overloaded())
    assert stalls == [] and not caplog.records, [r.__dict__ for r in caplog.records]


async def test_each_beat_says_how_late_it_ran_a_busy_loop_late_an_idle_one_on_time() -> None:
    """An overloaded loop is no stall, yet every callback of it waits: the lateness of
    each beat (`parley_event_loop_lag_seconds`) shows that, where no stall is logged."""
    lags: list[float] = []
    watch = StallWatch(threshold_s=5.0, beat_s=0.02, lagged=lags.append)
    watch.start()
    try:
        async with asyncio.timeout(5):
            while len(lags) < 5:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        idle = len(lags)
        computes_for(0.3)  # held once, far under the threshold
        async with asyncio.timeout(5):
            while len(lags) < idle + 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        watch.stop()
    assert max(lags[idle:]) >= 0.25, lags
