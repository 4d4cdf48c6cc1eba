"""A turn's stream of appends (actors.writer.TurnStream) on the real log: its first
text leaves at once, later text waits for the worker's shared append tick."""

from __future__ import annotations

import asyncio

from actors.writer import AppendTick, EventWriter, TurnStream
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Chunk, ConversationCreated, Title

WAIT_S = 10.0


async def _writer(event_log: EventLog) -> EventWriter:
    cid = new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    await event_log.append(cid, [created], 0)
    writer = EventWriter(cid, event_log, max_event_bytes=64 * 1024, new_id=new_id)
    await writer.catch_up()
    return writer


async def _appended(event_log: EventLog, writer: EventWriter, after: int) -> tuple[int, str]:
    """The position and text of the next chunk after `after`, once it is in the log
    (the writer may not have heard its ack yet: its `seq` is no position to wait from)."""
    async with asyncio.timeout(WAIT_S):
        async for stored in event_log.follow(writer.conversation_id, after):
            if isinstance(stored.event, Chunk):
                return stored.seq, stored.event.text
    raise AssertionError("the log's follow ended")


async def _acked(writer: EventWriter, seq: int) -> None:
    """Until the writer has heard the ack of the append that wrote `seq`. Text that
    arrives while an append is in flight goes out the moment that append is acked,
    without waiting for a tick (one append in flight per stream): a test of the tick
    must not add text before then."""
    async with asyncio.timeout(WAIT_S):
        while writer.seq < seq:  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def _just_ticked(tick: AppendTick) -> float:
    fired = asyncio.Event()
    tick.wake(fired)
    await fired.wait()
    return asyncio.get_running_loop().time()


async def test_a_turns_first_text_does_not_wait_for_the_tick(event_log: EventLog) -> None:
    # Another stream made the tick fire a moment ago: text now would wait a whole
    # window (a minute here) for the next one. The turn's first text goes at once.
    tick = AppendTick(60.0)
    writer = await _writer(event_log)
    await _just_ticked(tick)
    stream = TurnStream(writer, new_id(), lambda: 2, new_id, tick)
    try:
        stream.chunk("answer", "Hello")
        assert (await _appended(event_log, writer, writer.seq))[1] == "Hello"
    finally:
        await stream.abort()


async def test_later_text_waits_for_the_next_tick(event_log: EventLog) -> None:
    window_s = 0.2
    tick = AppendTick(window_s)
    writer = await _writer(event_log)
    stream = TurnStream(writer, new_id(), lambda: 2, new_id, tick)
    try:
        stream.chunk("answer", "Hello")
        seq, text = await _appended(event_log, writer, writer.seq)
        assert text == "Hello"
        await _acked(writer, seq)
        ticked_at = await _just_ticked(tick)
        stream.chunk("answer", " world")
        assert (await _appended(event_log, writer, seq))[1] == " world"
        # the loop may run a timer up to its clock resolution early
        assert asyncio.get_running_loop().time() - ticked_at >= window_s - 0.002
    finally:
        await stream.abort()


async def test_a_first_text_that_joins_the_titles_append_is_still_the_first(
    event_log: EventLog,
) -> None:
    # The first text, arriving while an event's append is woken, goes with it (the
    # turn's first text still); the text after it waits for the tick.
    window_s = 0.3
    tick = AppendTick(window_s)
    writer = await _writer(event_log)
    ticked_at = await _just_ticked(tick)
    stream = TurnStream(writer, new_id(), lambda: 2, new_id, tick)
    try:
        cid = writer.conversation_id
        stream.event(Title(conversation_id=cid, at=2, event_id=new_id(), title="t", source="auto"))
        stream.chunk("answer", "Hello")
        seq, text = await _appended(event_log, writer, writer.seq)
        assert text == "Hello"
        await _acked(writer, seq)
        stream.chunk("answer", " world")
        assert (await _appended(event_log, writer, seq))[1] == " world"
        # the loop may run a timer up to its clock resolution early
        assert asyncio.get_running_loop().time() - ticked_at >= window_s - 0.002
    finally:
        await stream.abort()


async def test_a_stream_closed_after_it_was_aborted_has_no_failure_to_raise(
    event_log: EventLog,
) -> None:
    """A turn that crashed aborts its stream and then closes it on its way to
    `failed: internal_error`: the abort's own cancellation is no failure of the log."""
    writer = await _writer(event_log)
    stream = TurnStream(writer, new_id(), lambda: 2, new_id)
    stream.chunk("answer", "Hello")
    await stream.abort()
    async with asyncio.timeout(WAIT_S):
        await stream.close()
