"""The benchmarks' load generator reads a turn as a browser does (a plain aiohttp server stands
in for the edge: what is tested is the client)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from api.sse import Envelope, frame
from parley.bench_load import LATE_WINDOW_NS, Job, _turn, late_windows


async def test_a_slot_reads_each_turn_to_its_end_and_keeps_its_connection() -> None:
    """A turn read to `done` and no further left the response unfinished, so its
    connection was closed and every next turn of the slot opened a new one."""
    peers: list[object] = []

    async def turn(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(frame("1", Envelope("token", "two words")))
        await response.write(frame("2", Envelope("done", "ok")))
        # the edge ends the response a pass of its loop after `done`
        await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/conversations/c1/messages", turn)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    job = Job(
        path="parley",
        url=url,
        token="t",
        model_url=url,
        concurrency=1,
        tokens=2,
        rate=0,
        warm_s=0,
        measure_s=1,
        stagger_s=0,
        tag="t",
    )
    try:
        async with aiohttp.ClientSession() as http:
            target = f"{url}/v1/conversations/c1/messages"
            turns = [await _turn(http, job, target, f"k{i}", {}) for i in range(3)]
    finally:
        await runner.cleanup()
    assert [t.status for t in turns] == ["ok", "ok", "ok"]
    assert [len(t.arrivals) for t in turns] == [2, 2, 2]
    assert len(peers) == 3
    assert len(set(peers)) == 1, f"a new connection for each turn: {peers}"


def _tokens_every_ms(seconds: float, late_at: list[float]) -> list[tuple[int, float]]:
    """A token sent every millisecond for `seconds`, 1 ms late, and 50 ms late when sent
    at one of `late_at` (seconds into the run)."""
    late = {round(at * 1000) for at in late_at}
    return [(ms * 1_000_000, 50.0 if ms in late else 1.0) for ms in range(round(seconds * 1000))]


def test_late_tokens_in_one_stretch_are_found_in_one_window() -> None:
    stretch = [2.0 + i / 1000 for i in range(40)]  # 40 ms in which every token is late
    assert late_windows(_tokens_every_ms(10.0, stretch), p99_ms=1.0) == (1, 100)


def test_late_tokens_spread_over_the_run_need_half_its_windows() -> None:
    spread = [w * LATE_WINDOW_NS / 1e9 + 0.05 for w in range(100)]  # one in every window
    assert late_windows(_tokens_every_ms(10.0, spread), p99_ms=1.0) == (50, 100)


def test_a_run_without_late_tokens_or_without_tokens() -> None:
    assert late_windows(_tokens_every_ms(1.0, []), p99_ms=1.0) == (0, 10)
    assert late_windows([], p99_ms=1.0) == (0, 0)
