"""The worker's append tick: text after a quiet window leaves in the next loop
iteration, text within the window waits for the next tick, and the wakes of one
iteration share one tick (actors.writer.AppendTick). No servers, and no
wall-clock bounds: what is asserted is which iteration and which timer wakes."""

from __future__ import annotations

import asyncio

from actors.writer import AppendTick

WINDOW_S = 0.05


async def test_text_after_a_quiet_window_leaves_in_the_next_iteration() -> None:
    tick = AppendTick(WINDOW_S)
    event = asyncio.Event()
    tick.wake(event)
    assert not event.is_set()  # never inside the caller's own step
    await asyncio.sleep(0)
    assert event.is_set()


async def test_text_within_the_window_waits_for_the_next_tick() -> None:
    loop = asyncio.get_running_loop()
    tick = AppendTick(WINDOW_S)
    first = asyncio.Event()
    tick.wake(first)
    await first.wait()
    ticked_at = loop.time()

    second = asyncio.Event()
    tick.wake(second)
    await asyncio.sleep(0)
    assert not second.is_set()
    await second.wait()
    # the loop may run a timer up to its clock resolution early
    assert loop.time() - ticked_at >= WINDOW_S - 0.002


async def test_the_wakes_of_one_iteration_share_one_tick() -> None:
    tick = AppendTick(WINDOW_S)
    events = [asyncio.Event() for _ in range(5)]
    for event in events:
        tick.wake(event)
    await asyncio.sleep(0)
    assert all(event.is_set() for event in events)


async def test_a_zero_window_wakes_at_once() -> None:
    tick = AppendTick(0.0)
    event = asyncio.Event()
    tick.wake(event)
    assert event.is_set()
