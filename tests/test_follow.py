"""The live follower hands out every event once, in order, even when delivery breaks underneath."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.client import Client as NatsClient

from events.codec import decode_event
from events.follow import LiveFollower, RawEvent, republished_positions
from events.ids import new_id
from events.log import EventLog
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


async def _drain(follower: LiveFollower, want: int) -> list[RawEvent]:
    got: list[RawEvent] = []
    async with asyncio.timeout(20):
        while len(got) < want:
            got.extend(await follower.next_batch(1000, wait_s=0.5))
    return got


async def _arrived(follower: LiveFollower, count: int) -> None:
    """Wait until `count` live entries wait in the follower's queue (read none)."""
    async with asyncio.timeout(10):
        while len(follower._inbox) < count:
            follower._arrived.clear()
            await follower._arrived.wait()


async def test_a_reader_that_overflows_its_buffer_still_gets_every_event_once(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    cid, head = await _new_conversation(event_log)
    follower = LiveFollower(plain_or_direct, event_log, cid, head, pending_limit=5)
    try:
        await follower.next_batch(10, wait_s=0.05)  # subscribe, nothing there yet
        seqs = await _append_titles(event_log, cid, 20, head)
        await _arrived(follower, 5)  # not reading: the queue of 5 overflows and drops
        got = await _drain(follower, 20)
    finally:
        await follower.close()
    assert [r.seq for r in got] == seqs
    titles = [decode_event(r.data) for r in got]
    assert [t.title for t in titles if isinstance(t, Title)] == [f"t{i}" for i in range(20)]


@pytest.mark.parametrize(
    ("count", "lost"),
    [(3, 1), (2, -1)],
    ids=["between-two: the next entry shows the gap", "the-last: the first silence asks the log"],
)
async def test_an_entry_lost_on_the_way_is_read_from_the_log(
    plain_or_direct: NatsClient, event_log: EventLog, count: int, lost: int
) -> None:
    cid, head = await _new_conversation(event_log)
    follower = LiveFollower(plain_or_direct, event_log, cid, head, watchdog_s=60)
    try:
        assert await follower.next_batch(10, wait_s=0.05) == []
        seqs = await _append_titles(event_log, cid, count, head)
        await _arrived(follower, count)
        del follower._inbox[lost]  # lost on the way, as a reconnect or a slow reader loses it
        got = await _drain(follower, count)
    finally:
        await follower.close()
    assert [r.seq for r in got] == seqs


async def test_entries_stored_before_the_follower_subscribed_come_from_the_log(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    cid, head = await _new_conversation(event_log)
    seqs = await _append_titles(event_log, cid, 300, head)  # more than one read's batch
    follower = LiveFollower(plain_or_direct, event_log, cid, head)
    try:
        got = await _drain(follower, 300)
        more = await _append_titles(event_log, cid, 2, seqs[-1])
        got += await _drain(follower, 2)
    finally:
        await follower.close()
    assert [r.seq for r in got] == seqs + more


def test_positions_are_read_from_the_republished_headers() -> None:
    headers = (
        b"NATS/1.0\r\nNats-Msg-Id: e1\r\nNats-Expected-Last-Subject-Sequence: 7\r\n"
        b"Nats-Stream: CHAT_EVT\r\nNats-Subject: chat.evt.c\r\nNats-Sequence: 12\r\n"
        b"Nats-Time-Stamp: 2026-11-29T04:00:00Z\r\nNats-Last-Sequence: 9\r\n\r\n"
    )
    assert republished_positions(headers) == (12, 9)
    assert republished_positions(b"NATS/1.0\r\nNats-Msg-Id: e1\r\n\r\n") is None
    assert republished_positions(b"") is None
    garbled = headers.replace(b"Sequence: 12", b"Sequence: x")
    assert republished_positions(garbled) is None


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
    """Each followed conversation is a subscription, not a consumer: nothing
    limits them to nats-server's default of 1,000 consumers a stream."""
    followers = [LiveFollower(nc, event_log, new_id(), 0) for _ in range(1_050)]
    try:
        # the first next_batch creates the follower's consumer; nothing is there to read
        await asyncio.gather(*(f.next_batch(1, wait_s=0.01) for f in followers))
        cid, head = await _new_conversation(event_log)
        last = LiveFollower(nc, event_log, cid, 0)
        followers.append(last)
        assert [r.seq for r in await _drain(last, 1)] == [head]
    finally:
        await asyncio.gather(*(f.close() for f in followers))


async def test_entries_go_to_on_arrival_while_the_reader_waits_and_a_declined_one_queues(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    """While next_batch waits with nothing queued, each next entry goes straight to
    `on_arrival` without waking the reader; one it declines comes from next_batch,
    and every position comes out once, in order, by one way or the other."""
    cid, head = await _new_conversation(event_log)
    out: list[tuple[str, int]] = []
    decline: set[int] = set()
    three = asyncio.Event()

    def on_arrival(raw: RawEvent) -> bool:
        if raw.seq in decline:
            return False
        out.append(("arrival", raw.seq))
        if len(out) == 3:
            three.set()
        return True

    async def read_until(count: int) -> None:
        while len(out) < count:
            batch = await follower.next_batch(10, wait_s=0.2)
            out.extend(("batch", r.seq) for r in batch)

    follower = LiveFollower(plain_or_direct, event_log, cid, head, on_arrival=on_arrival)
    try:
        assert await follower.next_batch(10, wait_s=0.05) == []  # subscribed, caught up
        waiting = asyncio.create_task(follower.next_batch(10, wait_s=1.0))
        await asyncio.sleep(0)  # it waits for news now
        seqs = await _append_titles(event_log, cid, 3, head)
        async with asyncio.timeout(10):
            await three.wait()
            # not woken for them: its wait ends with nothing to hand out
            assert await waiting == []
        assert out == [("arrival", seq) for seq in seqs]
        assert follower.last == seqs[-1]

        decline.add(seqs[-1] + 2)
        reader = asyncio.create_task(read_until(7))
        await asyncio.sleep(0)
        more = await _append_titles(event_log, cid, 4, seqs[-1])
        async with asyncio.timeout(20):
            await reader
    finally:
        await follower.close()
    assert [seq for _, seq in out] == [*seqs, *more]
    assert out[3] == ("arrival", more[0])
    assert out[4] == ("batch", more[1])  # declined


async def test_an_entry_that_does_not_follow_the_last_is_not_handed_on_arrival(
    nc: NatsClient, event_log: EventLog
) -> None:
    """A gap (or a repeat) is left to next_batch, which reads the log in between."""
    cid, head = await _new_conversation(event_log)
    taken: list[int] = []

    def on_arrival(raw: RawEvent) -> bool:
        taken.append(raw.seq)
        return True

    follower = LiveFollower(nc, event_log, cid, head, on_arrival=on_arrival)
    try:
        assert not follower._hand_on_arrival(head + 2, head + 1, b"{}")  # one lost before it
        assert not follower._hand_on_arrival(head, head - 1, b"{}")  # handed out already
        assert follower._hand_on_arrival(head + 1, head, b"{}")
    finally:
        await follower.close()
    assert taken == [head + 1]
    assert follower.last == head + 1


async def test_an_on_arrival_that_raises_fails_its_reader_and_no_one_else(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    """A bug in the callback surfaces in that reader's next_batch; the connection's
    read loop, and every other follower on it, go on."""
    cid, head = await _new_conversation(event_log)
    other_cid, other_head = await _new_conversation(event_log)

    def broken(raw: RawEvent) -> bool:
        raise RuntimeError("a bug in the reader")

    follower = LiveFollower(plain_or_direct, event_log, cid, head, on_arrival=broken)
    other = LiveFollower(plain_or_direct, event_log, other_cid, other_head)
    try:
        assert await follower.next_batch(10, wait_s=0.05) == []
        assert await other.next_batch(10, wait_s=0.05) == []
        waiting = asyncio.create_task(follower.next_batch(10, wait_s=5))
        await asyncio.sleep(0)
        await _append_titles(event_log, cid, 1, head)
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="a bug in the reader"):
                await waiting
        seqs = await _append_titles(event_log, other_cid, 2, other_head)
        assert [r.seq for r in await _drain(other, 2)] == seqs
    finally:
        await follower.close()
        await other.close()
