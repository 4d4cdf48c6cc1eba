"""The event log on real JetStream: single writer, read from a position, follow live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from nats.aio.client import Client as NatsClient

from actors.writer import EventWriter
from events.errors import EventLogConflict
from events.ids import new_id
from events.log import EventLog, StoredEvent
from events.publisher import AckedPublisher
from events.vocabulary import Chunk, ConversationCreated, Event, Title


def created(cid: str) -> ConversationCreated:
    return ConversationCreated(
        conversation_id=cid, at=time.time_ns(), event_id=new_id(), user_id="u"
    )


def title(cid: str, text: str) -> Title:
    return Title(
        conversation_id=cid, at=time.time_ns(), event_id=new_id(), title=text, source="user"
    )


async def test_a_stale_writer_is_refused_and_never_interleaves(event_log: EventLog) -> None:
    cid = new_id()
    head = await event_log.append(cid, [created(cid)], expected_seq=0)
    # Two writers both believe the conversation ends at `head`.
    first = await event_log.append(cid, [title(cid, "writer one")], expected_seq=head)
    with pytest.raises(EventLogConflict):
        await event_log.append(cid, [title(cid, "writer two")], expected_seq=head)
    titles = [s.event.title for s in await event_log.read(cid) if isinstance(s.event, Title)]
    assert titles == ["writer one"]
    assert await event_log.last_seq(cid) == first


async def test_creating_an_existing_conversation_again_is_refused(event_log: EventLog) -> None:
    cid = new_id()
    await event_log.append(cid, [created(cid)], expected_seq=0)
    with pytest.raises(EventLogConflict):
        await event_log.append(cid, [created(cid)], expected_seq=0)


async def test_a_retried_append_of_the_same_event_is_stored_once(event_log: EventLog) -> None:
    cid = new_id()
    head = await event_log.append(cid, [created(cid)], expected_seq=0)
    event = title(cid, "once")
    seq = await event_log.append(cid, [event], expected_seq=head)
    # The ack was lost, the writer sends again: Nats-Msg-Id makes it a no-op.
    again = await event_log.append(cid, [event], expected_seq=head)
    assert again == seq
    assert [s.seq for s in await event_log.read(cid)] == [head, seq]


async def test_two_writers_of_one_conversation_cannot_both_append(event_log: EventLog) -> None:
    cid = new_id()
    await event_log.append(cid, [created(cid)], expected_seq=0)
    one = EventWriter(cid, event_log, max_event_bytes=256 * 1024, new_id=new_id)
    two = EventWriter(cid, event_log, max_event_bytes=256 * 1024, new_id=new_id)
    await one.catch_up()
    await two.catch_up()
    await one.append([title(cid, "from one")])
    with pytest.raises(EventLogConflict):
        await two.append([title(cid, "from two")])
    # The refused writer forgot its stale view; catching up shows the winner's event.
    await two.catch_up()
    assert two.state.title == "from one" and two.seq == one.seq


async def test_read_from_a_position_and_follow_live(event_log: EventLog) -> None:
    cid = new_id()
    events: list[Event] = [created(cid)] + [
        Chunk(
            conversation_id=cid,
            at=time.time_ns(),
            event_id=new_id(),
            turn_id="t",
            kind="answer",
            text=str(i),
        )
        for i in range(5)
    ]
    last = await event_log.append(cid, events, expected_seq=0)
    stored = await event_log.read(cid)
    assert [s.event for s in stored] == events
    middle = stored[2].seq
    assert [s.seq for s in await event_log.read(cid, after=middle)] == [s.seq for s in stored[3:]]

    received: list[StoredEvent] = []

    async def follow() -> None:
        async for item in event_log.follow(cid, after=middle):
            received.append(item)
            if len(received) == 5:
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    more = [title(cid, "live one"), title(cid, "live two")]
    await event_log.append(cid, more, expected_seq=last)
    async with asyncio.timeout(10):
        await follower
    assert [r.event for r in received] == [*events[3:], *more]
    assert [r.seq for r in received] == sorted(r.seq for r in received)


async def test_an_unknown_conversation_has_no_events(event_log: EventLog) -> None:
    cid = new_id()
    assert await event_log.read(cid) == []
    assert await event_log.last_seq(cid) == 0
    assert await event_log.first(cid) is None


async def test_first_and_last_read_the_conversations_ends_and_nothing_else(
    event_log: EventLog,
) -> None:
    cid, other = new_id(), new_id()
    opening = created(cid)
    head = await event_log.append(cid, [opening], expected_seq=0)
    await event_log.append(other, [created(other)], expected_seq=0)  # interleaved, not ours
    end = await event_log.append(cid, [title(cid, "one"), title(cid, "two")], expected_seq=head)
    await event_log.append(other, [title(other, "theirs")], expected_seq=head + 1)

    first, last = await event_log.first(cid), await event_log.last(cid)
    assert first is not None and last is not None
    assert (first.seq, first.event) == (head, opening)
    assert last.seq == end and isinstance(last.event, Title) and last.event.title == "two"
    assert await event_log.last_seq(cid) == end


async def test_the_events_of_an_append_leave_together_before_any_ack(
    event_log: EventLog,
) -> None:
    """Each event is a message of its own, checked against the one before it, and they
    went one round trip after another: a turn's `user_message` and `started`, two
    passes of a loaded worker's loop on its way to the first token. They now leave at
    once, each checked against the event before it (Nats-Expected-Last-Msg-Id)."""
    cid = new_id()
    head = await event_log.append(cid, [created(cid)], expected_seq=0)
    events = [title(cid, "one"), title(cid, "two"), title(cid, "three")]
    appending = asyncio.create_task(event_log.append(cid, events, expected_seq=head))
    in_flight = 0
    async with asyncio.timeout(10):
        while not appending.done():
            in_flight = max(in_flight, event_log.replies.waiting)
            await asyncio.sleep(0)
    last = await appending
    assert in_flight == 3
    stored = await event_log.read(cid)
    assert [s.event for s in stored[1:]] == events and stored[-1].seq == last


class Interleaved(AckedPublisher):
    """Publishes a chain's first message, then another conversation's event, then the
    rest: another writer's message landing between two events of one append."""

    def __init__(self, event_log: EventLog) -> None:
        super().__init__(event_log.replies)
        self.log = event_log
        self.other = new_id()

    async def publish_each(
        self, subject: str, messages: Sequence[tuple[bytes, dict[str, str]]], wait_s: float
    ) -> list[int | Exception]:
        first = await super().publish_each(subject, messages[:1], wait_s)
        await self.log.append(self.other, [created(self.other)], expected_seq=0)
        return first + await super().publish_each(subject, messages[1:], wait_s)


class Breaks:
    def __init__(self) -> None:
        self.count = 0

    def chain_broken(self) -> None:
        self.count += 1


async def test_an_append_whose_chain_another_writer_breaks_still_lands_whole_and_in_order(
    nc: NatsClient,
) -> None:
    breaks = Breaks()
    event_log = EventLog(nc.jetstream(), observer=breaks)
    interleaved = Interleaved(event_log)
    cid = new_id()
    head = await event_log.append(cid, [created(cid)], expected_seq=0)
    events = [title(cid, "zero"), title(cid, "one")]
    head = await event_log.append(cid, events, expected_seq=head)
    assert breaks.count == 0  # a chain nothing came between
    event_log._publisher = interleaved
    events = [title(cid, "one"), title(cid, "two"), title(cid, "three")]
    last = await event_log.append(cid, events, expected_seq=head)
    assert breaks.count == 1  # told, for the operator (parley_append_chains_broken)
    stored = (await event_log.read(cid))[-3:]
    assert [s.event for s in stored] == events and stored[-1].seq == last
    # the other conversation's entry did land between the first two
    other = await event_log.read(interleaved.other)
    assert stored[0].seq < other[0].seq < stored[1].seq


async def test_an_append_of_several_events_on_a_stale_position_lands_none(
    event_log: EventLog,
) -> None:
    cid = new_id()
    head = await event_log.append(cid, [created(cid)], expected_seq=0)
    await event_log.append(cid, [title(cid, "another writer")], expected_seq=head)
    with pytest.raises(EventLogConflict):
        await event_log.append(cid, [title(cid, "one"), title(cid, "two")], expected_seq=head)
    titles = [s.event.title for s in await event_log.read(cid) if isinstance(s.event, Title)]
    assert titles == ["another writer"]
