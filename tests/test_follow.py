"""The log follower hands out every event once, in order, even when delivery breaks underneath."""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client as NatsClient

from events.codec import decode_event
from events.follow import LogFollower, RawEvent
from events.ids import new_id
from events.log import EventLog
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import ConversationCreated, Title


async def _append_titles(event_log: EventLog, cid: str, count: int, head: int) -> list[int]:
    seqs = []
    for i in range(count):
        event = Title(
            conversation_id=cid, at=time.time_ns(), event_id=new_id(), title=f"t{i}", source="user"
        )
        head = await event_log.append(cid, [event], expected_seq=head)
        seqs.append(head)
    return seqs


async def _new_conversation(event_log: EventLog) -> tuple[str, int]:
    cid = new_id()
    created = ConversationCreated(
        conversation_id=cid, at=time.time_ns(), event_id=new_id(), user_id="u"
    )
    return cid, await event_log.append(cid, [created], expected_seq=0)


async def _drain(follower: LogFollower, want: int) -> list[RawEvent]:
    got: list[RawEvent] = []
    async with asyncio.timeout(20):
        while len(got) < want:
            got.extend(await follower.next_batch(1000, wait_s=0.5))
    return got


async def test_a_reader_that_overflows_its_buffer_still_gets_every_event_once(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    cid, head = await _new_conversation(event_log)
    follower = LogFollower(plain_or_direct.jetstream(), event_subject(cid), head, pending_limit=5)
    try:
        await follower.next_batch(10, wait_s=0.05)  # subscribe, nothing there yet
        seqs = await _append_titles(event_log, cid, 20, head)
        await asyncio.sleep(0.3)  # not reading: the client buffer of 5 overflows and drops
        got = await _drain(follower, 20)
    finally:
        await follower.close()
    assert [r.seq for r in got] == seqs
    titles = [decode_event(r.data) for r in got]
    assert [t.title for t in titles if isinstance(t, Title)] == [f"t{i}" for i in range(20)]


async def test_a_consumer_the_server_forgot_is_recreated_after_a_silence(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    cid, head = await _new_conversation(event_log)
    js = plain_or_direct.jetstream()
    follower = LogFollower(js, event_subject(cid), head, watchdog_s=0.2)
    try:
        first = await _append_titles(event_log, cid, 2, head)
        assert [r.seq for r in await _drain(follower, 2)] == first
        # The server loses the consumer (as a restarted server forgets ephemeral ones).
        await js.delete_consumer(EVT_STREAM, follower._consumer)
        more = await _append_titles(event_log, cid, 3, first[-1])
        got = await _drain(follower, 3)
    finally:
        await follower.close()
    assert [r.seq for r in got] == more


async def test_follow_stops_on_its_stop_flag_even_while_the_log_is_silent(
    event_log: EventLog,
) -> None:
    cid, head = await _new_conversation(event_log)
    stop = asyncio.Event()

    async def read() -> list[int]:
        return [s.seq async for s in event_log.follow(cid, 0, stop=stop)]

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.3)
    stop.set()
    async with asyncio.timeout(5):
        assert await reader == [head]


async def test_more_than_a_thousand_conversations_can_be_followed_at_once(
    nc: NatsClient, event_log: EventLog
) -> None:
    """One consumer per followed conversation: the stream must allow more than
    nats-server's default of 1,000 (events.streams.EVT_MAX_CONSUMERS)."""
    js = nc.jetstream()
    followers = [LogFollower(js, event_subject(new_id()), 0) for _ in range(1_050)]
    try:
        # the first next_batch creates the follower's consumer; nothing is there to read
        await asyncio.gather(*(f.next_batch(1, wait_s=0.01) for f in followers))
        cid, head = await _new_conversation(event_log)
        last = LogFollower(js, event_subject(cid), 0)
        followers.append(last)
        assert [r.seq for r in await _drain(last, 1)] == [head]
    finally:
        await asyncio.gather(*(f.close() for f in followers))
