"""`parley bench cancel` and `parley bench burst`: how quickly turns stop and start.

cancel: a turn streams (the demo model at 50 tokens/s); once its viewer has
the first token, `POST /cancel`; measured is cancel request -> `done: "stopped"`
read by the viewer. Cancels run a few at a time, over many conversations.

burst: C turns start within one window (default 100 within one second), each
with one SSE viewer; measured is POST -> first token at the viewer, through
parley and through the direct path (model stream straight to SSE, no broker),
side by side in one run, rounds alternating. "Added" time to first token is
parley's percentile minus the direct path's.

Everything runs in this process (parley's roles, the demo model, the direct
server, the viewers), on a shared machine: read the medians and the difference
to the direct path, not the absolute numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from api.auth import mint
from parley.bench import NO_LIMITS, SECRET, direct_server, percentile
from parley.config import load_catalog, load_settings
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services


class CancelResult(msgspec.Struct):
    cancels: int
    concurrency: int
    cancel_to_stopped_p50_ms: float
    cancel_to_stopped_p99_ms: float
    cancel_to_stopped_max_ms: float
    cancel_answer_p50_ms: float  # the POST /cancel round trip itself


class BurstResult(msgspec.Struct):
    turns: int
    window_s: float
    rounds: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    direct_ttft_p50_ms: float
    direct_ttft_p99_ms: float
    added_ttft_p50_ms: float
    added_ttft_p99_ms: float
    rounds_added_ttft_p99_ms: list[float]


@contextlib.asynccontextmanager
async def system(servers: Servers, rate: float) -> AsyncIterator[tuple[str, str, str]]:
    """parley's roles and the demo model, in this process: (edge, model, token)."""
    settings = load_settings()
    runner, model_url = await start_demo_model(
        "127.0.0.1", 0, DemoConfig(tokens_per_s=rate, think=False)
    )
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=load_catalog(settings),
        model_base_url=model_url,
        db_schema=f"bench_{int(time.time())}",
        port=0,
        limits=NO_LIMITS,
    )
    try:
        async with Services(servers, options) as services:
            yield services.edge_url, model_url, mint(SECRET, "bench")
    finally:
        await runner.cleanup()


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
    )


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *frames, buffer = buffer.split(b"\n\n")
        for raw in frames:
            for line in raw.split(b"\n"):
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])


async def _conversation(http: aiohttp.ClientSession, edge: str, token: str) -> str:
    async with http.post(
        f"{edge}/v1/conversations", json={}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        cid: str = (await response.json())["id"]
        return cid


# ---------------------------------------------------------------- cancel


async def run_cancel(servers: Servers, cancels: int, concurrency: int) -> CancelResult:
    async with system(servers, rate=50.0) as (edge, _, token), client() as http:
        headers = {"Authorization": f"Bearer {token}"}
        conversations = [await _conversation(http, edge, token) for _ in range(concurrency)]
        stopped: list[float] = []
        answered: list[float] = []

        async def one(cid: str) -> None:
            async with http.post(
                f"{edge}/v1/conversations/{cid}/messages",
                json={"content": "long [[tokens=5000]]"},
                headers={**headers, "Accept": "text/event-stream"},
            ) as response:
                events = _events(response)
                async for envelope in events:
                    if envelope["event"] == "token":
                        break
                began = time.perf_counter()
                async with http.post(
                    f"{edge}/v1/conversations/{cid}/cancel", headers=headers
                ) as cancel:
                    await cancel.read()
                answered.append((time.perf_counter() - began) * 1000)
                async for envelope in events:
                    if envelope["event"] == "done":
                        if envelope["data"] != "stopped":
                            raise RuntimeError(f"expected done: stopped, saw {envelope}")
                        stopped.append((time.perf_counter() - began) * 1000)
                        return
            raise RuntimeError("the stream ended without done")

        async def lane(cid: str, count: int) -> None:
            for _ in range(count):
                await one(cid)

        per_lane = -(-cancels // concurrency)
        await lane(conversations[0], 2)  # warm-up
        stopped.clear()
        answered.clear()
        await asyncio.gather(*(lane(cid, per_lane) for cid in conversations))
    return CancelResult(
        cancels=len(stopped),
        concurrency=concurrency,
        cancel_to_stopped_p50_ms=round(percentile(stopped, 50), 2),
        cancel_to_stopped_p99_ms=round(percentile(stopped, 99), 2),
        cancel_to_stopped_max_ms=round(max(stopped), 2),
        cancel_answer_p50_ms=round(percentile(answered, 50), 2),
    )


# ---------------------------------------------------------------- burst


async def run_burst(servers: Servers, turns: int, window_s: float, rounds: int) -> BurstResult:
    async with (
        system(servers, rate=50.0) as (edge, model_url, token),
        direct_server(model_url) as direct,
        client() as http,
    ):
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}

        async def first_token(url: str, body: dict[str, str], extra: dict[str, str]) -> float:
            began = time.perf_counter()
            async with http.post(url, json=body, headers=extra) as response:
                async for envelope in _events(response):
                    if envelope["event"] == "token":
                        ttft = (time.perf_counter() - began) * 1000
                        break
                else:
                    raise RuntimeError("no token")
                async for envelope in _events(response):  # read the turn to its end
                    if envelope["event"] == "done":
                        break
            return ttft

        async def burst(targets: list[tuple[str, dict[str, str], dict[str, str]]]) -> list[float]:
            offsets = sorted(random.uniform(0, window_s) for _ in targets)
            began = time.perf_counter()

            async def at(
                offset: float, target: tuple[str, dict[str, str], dict[str, str]]
            ) -> float:
                await asyncio.sleep(max(0.0, began + offset - time.perf_counter()))
                return await first_token(*target)

            return list(
                await asyncio.gather(*(at(o, t) for o, t in zip(offsets, targets, strict=True)))
            )

        body = {"content": "hello [[tokens=10]]"}
        broker_rounds: list[list[float]] = []
        direct_rounds: list[list[float]] = []
        for r in range(rounds + 1):  # round 0 warms up
            conversations = [await _conversation(http, edge, token) for _ in range(turns)]
            broker = await burst(
                [
                    (f"{edge}/v1/conversations/{cid}/messages", body, headers)
                    for cid in conversations
                ]
            )
            plain = await burst([(f"{direct}/direct", body, {})] * turns)
            if r:
                broker_rounds.append(broker)
                direct_rounds.append(plain)
    flat = [t for rnd in broker_rounds for t in rnd]
    flat_direct = [t for rnd in direct_rounds for t in rnd]
    added_p99 = [
        round(percentile(b, 99) - percentile(d, 99), 2)
        for b, d in zip(broker_rounds, direct_rounds, strict=True)
    ]
    return BurstResult(
        turns=turns,
        window_s=window_s,
        rounds=rounds,
        ttft_p50_ms=round(percentile(flat, 50), 2),
        ttft_p99_ms=round(percentile(flat, 99), 2),
        direct_ttft_p50_ms=round(percentile(flat_direct, 50), 2),
        direct_ttft_p99_ms=round(percentile(flat_direct, 99), 2),
        added_ttft_p50_ms=round(percentile(flat, 50) - percentile(flat_direct, 50), 2),
        added_ttft_p99_ms=round(statistics.median(added_p99), 2),
        rounds_added_ttft_p99_ms=added_p99,
    )


def render_cancel(r: CancelResult) -> str:
    return (
        f"cancel: {r.cancels} cancels, {r.concurrency} at a time\n"
        f"  cancel -> done: stopped at the viewer: p50 {r.cancel_to_stopped_p50_ms} ms"
        f"  p99 {r.cancel_to_stopped_p99_ms} ms  max {r.cancel_to_stopped_max_ms} ms\n"
        f"  POST /cancel answered in p50 {r.cancel_answer_p50_ms} ms"
    )


def render_burst(r: BurstResult) -> str:
    return (
        f"burst: {r.turns} turns starting within {r.window_s} s, {r.rounds} rounds\n"
        f"  time to first token through parley: p50 {r.ttft_p50_ms} ms  p99 {r.ttft_p99_ms} ms\n"
        f"  direct path:                        p50 {r.direct_ttft_p50_ms} ms  p99 {r.direct_ttft_p99_ms} ms\n"
        f"  added by parley: p50 {r.added_ttft_p50_ms} ms  p99 {r.added_ttft_p99_ms} ms"
        f" (median of rounds {r.rounds_added_ttft_p99_ms})"
    )
