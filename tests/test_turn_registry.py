"""The Redis turn registry: one claim per conversation, renewed while held, released only by its holder."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.driver_info import DriverInfo

from actors.worker import ACK_WAIT_S, HEARTBEAT_S, WorkerHost
from events.ids import new_id
from events.turns import POOL_CONNECTIONS, RECORD_LEASE_MS, TurnRecord, TurnRegistry
from events.turns import redis_client as parley_redis_client
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


async def test_the_pools_connections_name_their_client_without_reading_package_metadata(
    stack: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py reads its package's metadata for every connection it opens unless
    # it is given the client's name and version: 0.4-1.4 ms of CPU a connection,
    # on the way of every request that finds the pool short of one.
    reads: list[str] = []
    version = importlib.metadata.version

    def counted(name: str) -> str:
        reads.append(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", counted)
    client = parley_redis_client(stack.redis_url)
    try:
        await asyncio.gather(*(client.blpop([f"none-{i}"], timeout=0.2) for i in range(20)))
        driver = client.connection_pool.connection_kwargs.get("driver_info")
    finally:
        await client.aclose()
    assert reads == [], f"package metadata read {len(reads)} times for 20 connections"
    # what CLIENT SETINFO tells a server that takes it (Redis 7.2+) is unchanged
    assert isinstance(driver, DriverInfo)
    assert (driver.formatted_name, driver.lib_version) == ("redis-py", redis.__version__)


async def test_a_burst_waits_for_the_pools_connections_and_opens_no_more(
    stack: Servers, redis_client: aioredis.Redis
) -> None:
    """A thousand SSE viewers joining at once each read a turn record: the pool opened
    a connection for every command in flight up to its ceiling of 256, each holding
    about 32 KB of the process's memory for good (`bench fanout`: 8 KB more per
    viewer). It now keeps at most POOL_CONNECTIONS, and a burst beyond them waits
    for one instead of failing."""
    name = f"burst-{new_id()}"
    client = parley_redis_client(f"{stack.redis_url}?client_name={name}")
    try:
        answers = await asyncio.gather(*(client.get(f"absent-{i}") for i in range(1000)))
        listed = await redis_client.client_list()
    finally:
        await client.aclose()
    assert answers == [None] * 1000
    opened = sum(1 for c in listed if c["name"] == name)
    assert 1 < opened <= POOL_CONNECTIONS, opened


async def test_writes_made_at_once_leave_together_and_each_gets_its_own_answer(
    stack: Servers, redis_client: aioredis.Redis
) -> None:
    """A thousand turns write hundreds of records a second: those written in the
    same pass of the event loop go as one pipeline, on one connection."""
    client = parley_redis_client(stack.redis_url)
    turns = TurnRegistry(client)
    held, other = [new_id() for _ in range(100)], [new_id() for _ in range(100)]
    try:
        await turns.put(new_id(), record("a"))  # the pool's first connection
        opened = (await redis_client.info("stats"))["total_connections_received"]
        await asyncio.gather(*(turns.put(c, record("a")) for c in held + other))
        await asyncio.gather(*(turns.release(c, "a") for c in other))
        renewed = await asyncio.gather(
            *(turns.refresh(c, "a") for c in held), *(turns.refresh(c, "a") for c in other)
        )
        opened_since = (await redis_client.info("stats"))["total_connections_received"] - opened
    finally:
        await client.aclose()
    assert opened_since == 0, f"{opened_since} connections more for three batches of writes"
    assert renewed == [True] * 100 + [False] * 100
    assert all(r is None for r in await turns.get_many(other))
    assert all(r is not None for r in await turns.get_many(held))


async def test_one_write_that_fails_fails_alone(redis_client: aioredis.Redis) -> None:
    turns = TurnRegistry(redis_client)
    broken, fine = new_id(), new_id()
    await redis_client.set(f"parley:turn:{broken}", b"not json")  # the release script fails on it
    await turns.put(fine, record("a"))
    results = await asyncio.gather(
        turns.release(broken, "a"), turns.release(fine, "a"), return_exceptions=True
    )
    assert isinstance(results[0], redis.exceptions.ResponseError), results
    assert results[1] is None
    assert await turns.get(fine) is None


async def test_every_write_waiting_hears_that_redis_is_away() -> None:
    client = parley_redis_client("redis://127.0.0.1:9/0", wait_s=1.0)  # nothing listens
    turns = TurnRegistry(client)
    try:
        results = await asyncio.gather(
            *(turns.put(new_id(), record("a")) for _ in range(5)), return_exceptions=True
        )
    finally:
        await client.aclose()
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results


class FirstHeld:
    """Stands in front of a registry's pipelines: the first command waits for `gate`, as
    one waits that finds the pool short of a connection (the rest go straight on)."""

    def __init__(self, batch: object) -> None:
        self._batch = batch
        self.gate = asyncio.Event()
        self.sent = 0

    async def send(self, add: object) -> object:
        self.sent += 1
        if self.sent == 1:
            await self.gate.wait()
        return await self._batch.send(add)  # type: ignore[attr-defined]


async def test_a_release_that_arrives_late_leaves_the_next_record_alone(
    redis_client: aioredis.Redis,
) -> None:
    # A turn's release, then the next request's announcement of the same record, each
    # in a pipeline of its own: when the announcement got there first, the release
    # deleted it, and a viewer joining then found no turn while one was starting.
    turns = TurnRegistry(redis_client)
    cid = new_id()
    ended = record("w")
    await turns.put(cid, ended)
    held = FirstHeld(turns._batch)
    turns._batch = held  # type: ignore[assignment]
    release = asyncio.create_task(turns.release(cid, "w", ended))
    announced = TurnRecord(worker="w", turn_id="", after=9, at=2)
    await asyncio.sleep(0)  # the release is on its way, held
    await turns.put(cid, announced)  # not held: it gets there first
    held.gate.set()
    await release
    assert await turns.get(cid) == announced
    await turns.release(cid, "w", announced)
    assert await turns.get(cid) is None, "the record it names is released"


def test_a_dead_workers_turn_record_outlives_its_partition_leases() -> None:
    """The next owner of a dead worker's partitions finds the turns to end by their
    records (actors.worker `_recover`). A record renewed just before the worker
    died must still be there when its leases have lapsed and been taken over, or
    the orphan waits for its command's redelivery (ACK_WAIT_S) instead."""
    lease_s = inspect.signature(WorkerHost.__init__).parameters["lease_ttl_s"].default
    takeover_s = lease_s + lease_s / 5  # lapsed, then the next owner's renewal tick
    shortest_record_s = RECORD_LEASE_MS / 1000 - HEARTBEAT_S  # renewed HEARTBEAT_S before
    assert shortest_record_s > takeover_s, (shortest_record_s, takeover_s)
    assert takeover_s < ACK_WAIT_S
