"""A partition's commands arrive as the consumer holds them, in order, each once,
through expiring requests, and go to the next reader once a feed is closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from actors.command_feed import CommandFeed, ConsumerGone
from events.ids import new_id

LIMIT_S = 10.0


class Partition:
    def __init__(self, js: JetStreamContext, name: str) -> None:
        self.js, self.name = js, name
        self.subject = f"{name}.cmd"

    async def publish(self, count: int, start: int = 0) -> None:
        for i in range(start, start + count):
            await self.js.publish(self.subject, str(i).encode())


@pytest.fixture
async def partition(nc: NatsClient) -> AsyncIterator[Partition]:
    js = nc.jetstream()
    name = f"FEED_{new_id().upper()}"
    await js.add_stream(
        name=name,
        subjects=[f"{name}.>"],
        storage=api.StorageType.MEMORY,
        retention=api.RetentionPolicy.WORK_QUEUE,
    )
    await js.add_consumer(
        name,
        api.ConsumerConfig(durable_name="d", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30),
    )
    yield Partition(js, name)
    await js.delete_stream(name)


class SlowHandOver:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


class Reader:
    """A feed run in a task; what it delivered, acked. With `slow`, the first hand-over
    sets `slow.entered` and lasts until `slow.release` is set."""

    def __init__(
        self, nc: NatsClient, partition: Partition, slow: SlowHandOver | None = None, **options: Any
    ) -> None:
        self.got: list[bytes] = []
        self.arrived = asyncio.Event()
        self.stop = asyncio.Event()

        async def deliver(msg: Msg) -> None:
            self.got.append(msg.data)
            self.arrived.set()
            if slow is not None and len(self.got) == 1:
                slow.entered.set()
                await slow.release.wait()
            await msg.ack()

        async def exists() -> bool:
            return True

        self.feed = CommandFeed(
            nc, partition.js._prefix, partition.name, "d", deliver, exists, **options
        )
        self.task = asyncio.create_task(self.feed.run(self.stop))

    async def until(self, count: int) -> list[bytes]:
        async with asyncio.timeout(LIMIT_S):
            while len(self.got) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.got

    async def close(self) -> None:
        self.stop.set()
        await self.task


async def test_commands_before_and_after_the_start_arrive_in_order_each_once(
    nc: NatsClient, partition: Partition
) -> None:
    await partition.publish(30)
    reader = Reader(nc, partition, window=8)  # many top-ups of the window
    try:
        await reader.until(30)
        await partition.publish(70, start=30)
        got = await reader.until(100)
    finally:
        await reader.close()
    assert got == [str(i).encode() for i in range(100)]


async def test_commands_keep_arriving_across_expired_requests(
    nc: NatsClient, partition: Partition
) -> None:
    reader = Reader(nc, partition, window=4, expires_s=0.2, heartbeat_s=0.05)
    try:
        for round_ in range(3):
            await asyncio.sleep(0.3)  # every request of the window expires meanwhile
            await partition.publish(3, start=3 * round_)
            await reader.until(3 * (round_ + 1))
    finally:
        await reader.close()
    assert reader.got == [str(i).encode() for i in range(9)]


async def test_a_feed_that_may_not_ask_leaves_the_commands_to_the_consumer(
    nc: NatsClient, partition: Partition
) -> None:
    """A worker whose lease is in doubt (NATS was away longer than it lives) asks
    for none of the partition's commands: another worker may own them by now."""
    allowed = False
    asked_whether = 0
    checked = asyncio.Event()

    def may_ask() -> bool:
        nonlocal asked_whether
        asked_whether += 1
        if asked_whether >= 3:
            checked.set()
        return allowed

    await partition.publish(3)
    reader = Reader(nc, partition, may_ask=may_ask, heartbeat_s=0.05)
    try:
        async with asyncio.timeout(LIMIT_S):
            await checked.wait()  # three rounds of the feed, none of them asking
        info = await partition.js.consumer_info(partition.name, "d")
        assert (reader.got, info.num_waiting, info.num_pending) == ([], 0, 3), info
        allowed = True
        got = await reader.until(3)
    finally:
        await reader.close()
    assert got == [b"0", b"1", b"2"]


async def test_a_command_after_a_feed_closed_goes_to_the_next_reader_at_once(
    nc: NatsClient, partition: Partition
) -> None:
    """The closed feed's waiting requests would otherwise take it and leave it
    unacknowledged until its ack wait (30 s here)."""
    first = Reader(nc, partition)
    await partition.publish(1)
    await first.until(1)
    await first.close()
    await partition.publish(1, start=1)
    second = Reader(nc, partition)
    try:
        assert await second.until(1) == [b"1"]  # within LIMIT_S, not the 30 s ack wait
    finally:
        await second.close()


async def test_commands_on_their_way_when_a_feed_closes_are_handed_over_and_keep_their_order(
    nc: NatsClient, partition: Partition
) -> None:
    """Sent before the server heard that the feed closed (here: queued behind a command
    whose hand-over is slow), they go to `late`, once no request of the feed is left
    open at the server: given back then, they reach the next reader at once (not after
    their 30 s ack wait) and in the order they were sent. Given back while a request
    is open, the first goes to it, into the void, and comes back last."""
    slow = SlowHandOver()
    late: list[Msg] = []

    async def keep(msg: Msg) -> None:
        late.append(msg)

    first = Reader(nc, partition, slow, late=keep, expires_s=0.5, heartbeat_s=0.1)
    await partition.publish(5)
    async with asyncio.timeout(LIMIT_S):
        await slow.entered.wait()  # command 0 is being handed over, 1-4 wait behind it
        first.stop.set()
        while not first.feed.closing:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        slow.release.set()
        await first.task
    assert first.got == [b"0"] and [msg.data for msg in late] == [b"1", b"2", b"3", b"4"]
    for msg in late:
        await msg.nak()
    second = Reader(nc, partition)
    try:
        assert await second.until(4) == [b"1", b"2", b"3", b"4"]
    finally:
        await second.close()


async def test_a_deleted_consumer_ends_the_feed(nc: NatsClient, partition: Partition) -> None:
    reader = Reader(nc, partition, heartbeat_s=0.1)
    await partition.publish(1)
    await reader.until(1)
    await partition.js.delete_consumer(partition.name, "d")
    with pytest.raises(ConsumerGone):
        async with asyncio.timeout(LIMIT_S):
            await reader.task
