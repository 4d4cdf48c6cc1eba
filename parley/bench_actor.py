"""`parley bench cancel`: how quickly turns stop.

cancel: a turn streams (the demo model at 50 tokens/s); once its viewer has
the first token, `POST /cancel`; measured is cancel request -> `done: "stopped"`
read by the viewer. Cancels run a few at a time, over many conversations.

(`parley bench burst`, how quickly turns start, runs in processes of its own:
parley.bench_system.)

Everything runs in this process (parley's roles, the demo model, the direct
server, the viewers), on a shared machine: read the medians and the difference
to the direct path, not the absolute numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from api.auth import mint
from parley.bench_common import NO_LIMITS, SECRET, percentile
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


def render_cancel(r: CancelResult) -> str:
    return (
        f"cancel: {r.cancels} cancels, {r.concurrency} at a time\n"
        f"  cancel -> done: stopped at the viewer: p50 {r.cancel_to_stopped_p50_ms} ms"
        f"  p99 {r.cancel_to_stopped_p99_ms} ms  max {r.cancel_to_stopped_max_ms} ms\n"
        f"  POST /cancel answered in p50 {r.cancel_answer_p50_ms} ms"
    )
