"""The worker's append tick: text after a quiet window leaves in the next loop
iteration, text within the window waits for the next tick, and the wakes of one
iteration share one tick (actors.writer.AppendTick). No servers, and no
wall-clock bounds: what is asserted is which iteration and which timer wakes."""

from __future__ import annotations

import asyncio

from actors.writer import HEAVY_ABOVE, LIGHT_BELOW, SAMPLE_S, AppendTick, choose_window

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


def test_the_window_is_light_while_the_process_has_cpu_to_spare() -> None:
    full, light = 0.005, 0.001
    assert choose_window(full, 0.1, light_s=light, full_s=full) == light
    assert choose_window(light, 0.9, light_s=light, full_s=full) == full
    # between the thresholds the window stays as it is: its own cost cannot flap it
    middle = (LIGHT_BELOW + HEAVY_ABOVE) / 2
    assert choose_window(light, middle, light_s=light, full_s=full) == light
    assert choose_window(full, middle, light_s=light, full_s=full) == full


async def _tick_once(tick: AppendTick) -> None:
    event = asyncio.Event()
    tick.wake(event)
    await event.wait()


async def test_the_tick_follows_the_process_cpu_it_is_shown() -> None:
    """The tick samples the clocks it is given as it fires: a second of wall time
    with a core's 0.1 used takes the light window, then 0.9 used the full one."""
    wall, cpu = [100.0], [0.0]
    tick = AppendTick(WINDOW_S, WINDOW_S / 10, cpu_time=lambda: cpu[0], wall_time=lambda: wall[0])
    assert tick.window_s == WINDOW_S  # full until there is a sample
    await _tick_once(tick)  # the first sample's start

    # less than SAMPLE_S later: no new sample, whatever the CPU clock says
    wall[0] += SAMPLE_S / 2
    cpu[0] += SAMPLE_S / 2 * 0.05
    await _tick_once(tick)
    assert tick.window_s == WINDOW_S

    wall[0] += SAMPLE_S / 2
    cpu[0] += SAMPLE_S / 2 * 0.15  # 0.1 of a core over the whole period
    await _tick_once(tick)
    assert tick.window_s == WINDOW_S / 10

    wall[0] += SAMPLE_S
    cpu[0] += SAMPLE_S * 0.9
    await _tick_once(tick)
    assert tick.window_s == WINDOW_S


async def test_a_tick_without_a_light_window_never_samples() -> None:
    calls: list[int] = []

    def cpu() -> float:
        calls.append(1)
        return 0.0

    tick = AppendTick(WINDOW_S, cpu_time=cpu)
    for _ in range(3):
        await _tick_once(tick)
    assert calls == [] and tick.window_s == WINDOW_S
