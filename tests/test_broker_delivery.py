"""A DirectClient hands a subscription's messages straight to a function.

If a nats.py upgrade renamed the hook it overrides, messages would quietly go
the slow way through the subscription's callback: these tests would see the
callback called instead, and fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats.aio.msg
import nats.errors
import nats.js.errors
import pytest

from events.broker import DirectClient, connect_client
from events.ids import new_id
from events.log import EventLog
from events.publisher import AckedPublisher
from events.replies import Replies
from events.subjects import EVT_STREAM, event_subject
from parley.services import Servers


@pytest.fixture
async def direct(stack: Servers, event_log: EventLog) -> AsyncIterator[DirectClient]:
    client = await connect_client(DirectClient(), stack.nats_url, name="test-direct")
    yield client
    await client.close()


async def test_messages_go_to_the_handler_and_not_through_the_callback(
    direct: DirectClient,
) -> None:
    subject = f"direct.{new_id()}"
    through_callback: list[bytes] = []
    called = asyncio.Event()
    handed: list[tuple[bytes, bytes, bytes]] = []

    async def callback(msg: object) -> None:
        through_callback.append(b"")
        called.set()

    all_handed = asyncio.Event()

    def handler(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handed.append((subject, reply, data))
        if len(handed) == 3:
            all_handed.set()

    sub = await direct.subscribe(subject, cb=callback)
    direct.deliver_directly(sub, handler)
    for i in range(3):
        await direct.publish(subject, f"m{i}".encode(), reply="back.here")
    async with asyncio.timeout(5):
        await all_handed.wait()
    assert handed == [(subject.encode(), b"back.here", f"m{i}".encode()) for i in range(3)]
    assert through_callback == []

    direct.deliver_as_usual(sub)
    await direct.publish(subject, b"late")
    async with asyncio.timeout(5):  # the subscription's task runs the callback later
        await called.wait()
    assert len(through_callback) == 1 and len(handed) == 3


async def test_acks_and_status_answers_come_straight_back_to_the_publisher(
    direct: DirectClient,
) -> None:
    replies = Replies(direct)
    publisher = AckedPublisher(replies)
    headers = {"Nats-Expected-Stream": EVT_STREAM, "Nats-Msg-Id": new_id()}
    seq = await publisher.publish(event_subject(new_id()), b"{}", headers, 5.0)
    assert seq > 0
    # "no responders" is a status line: it is read from the raw headers, directly too
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await publisher.publish(f"nowhere.{new_id()}", b"{}", {}, 5.0)
    sub = replies._sub
    assert sub._pending_queue.qsize() == 0 and sub._received == 0


async def test_a_flush_that_timed_out_does_not_kill_the_connection_when_its_pong_comes(
    direct: DirectClient,
) -> None:
    """nats.py's flush cancels its pong's future when its timeout passes; the pong that
    came later raised InvalidStateError in the read loop, which ended it for good ("nats:
    encountered error"): nothing more was read on that connection, and nothing noticed
    until unanswered pings made it reconnect, minutes later. The ping of a stop
    (events.broker.finish) gives up after 2 s on a server that is merely slow."""
    for _ in range(50):  # a timeout this short passes before the pong is read, all but always
        try:
            await direct.flush(timeout=1e-9)  # type: ignore[arg-type]  # seconds, any number
        except nats.errors.FlushTimeoutError:
            break
    else:
        raise AssertionError("no flush timed out: the test proves nothing")
    subject = f"after-pong.{new_id()}"
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def callback(msg: nats.aio.msg.Msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    await direct.subscribe(subject, cb=callback)
    await direct.publish(subject, b"still read")
    async with asyncio.timeout(5):
        assert await got == b"still read"
    await direct.flush(timeout=5)
