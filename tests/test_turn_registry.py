"""The Redis turn registry: one claim per conversation, renewed while held, released only by its holder."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from events.ids import new_id
from events.turns import TurnRecord, TurnRegistry
from parley.services import Servers


@pytest.fixture
async def redis_client(stack: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


def record(worker: str) -> TurnRecord:
    return TurnRecord(worker=worker, turn_id=new_id(), after=7, at=1)


async def test_a_second_worker_cannot_claim_a_held_conversation(
    redis_client: aioredis.Redis,
) -> None:
    turns = TurnRegistry(redis_client)
    cid = new_id()
    assert await turns.claim(cid, record("a"))
    assert not await turns.claim(cid, record("b"))
    held = await turns.get(cid)
    assert held is not None and held.worker == "a" and held.after == 7


async def test_a_renewed_claim_outlives_its_first_lease_and_a_lapsed_one_frees_the_conversation(
    redis_client: aioredis.Redis,
) -> None:
    turns = TurnRegistry(redis_client, lease_ms=300)
    cid = new_id()
    assert await turns.claim(cid, record("a"))
    for _ in range(4):
        await asyncio.sleep(0.15)
        assert await turns.refresh(cid, "a")
    assert await turns.get(cid) is not None, "renewed for 600 ms on a 300 ms lease"
    assert not await turns.refresh(cid, "b"), "only the holder renews"
    await asyncio.sleep(0.4)
    assert await turns.get(cid) is None
    assert await turns.claim(cid, record("b")), "a dead worker's claim lapses"


async def test_only_the_holder_releases_a_claim(redis_client: aioredis.Redis) -> None:
    turns = TurnRegistry(redis_client)
    cid = new_id()
    await turns.claim(cid, record("a"))
    await turns.release(cid, "b")
    assert await turns.get(cid) is not None
    await turns.release(cid, "a")
    assert await turns.get(cid) is None
