"""Redis holds disposable state only: what parley does when it loses its keys.

A FLUSHALL, an eviction under `maxmemory` or a Redis restarted without its data
removes turn records, limit leases and idempotency keys while turns run. The
log is the truth: each test removes keys of one conversation or user (the test
session shares one Redis) and checks what clients see from the outside.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from events.turns import RECORD_LEASE_MS
from parley.services import Servers
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
