"""Snapshots of folded conversations (actors.snapshots) on the real log and Redis.

A cold actor on a long conversation begins at its snapshot and reads only the
log after it; a snapshot that is not certainly what folding the log gives (of
another log, of another fold, damaged) is passed over and the log folded whole.
That the state a snapshot keeps folds on exactly as the log does is checked for
generated histories in tests/test_histories.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient

from actors.snapshots import Folded, SnapshotStore, encode_snapshot
from actors.state import Conversation, fold, state_bytes
from actors.writer import EventWriter
from events.ids import new_id
from events.log import EventLog
from events.subjects import EVT_STREAM
from events.turns import redis_client
from events.vocabulary import (
    Chunk,
    ContentBlock,
    ConversationCreated,
    Done,
    Event,
    Started,
    UserMessage,
)
from parley.services import Servers

EVERY = 100  # entries past the last snapshot before a new one is due, here
CHUNKS = 300  # chunks of each turn: three turns fill more than one read of the log


@pytest.fixture
async def redis(stack: Servers) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(stack.redis_url)
    yield client
    await client.aclose()


def answered_turn(cid: str, n: int) -> list[Event]:
    """The events of the `n`th turn of a conversation: a question, and CHUNKS chunks of answer."""
    user, turn = new_id(), new_id()
    at = 1_767_225_600_000_000_000 + n
    events: list[Event] = [
        UserMessage(
            conversation_id=cid, at=at, event_id=new_id(), message_id=user, content=f"question {n}"
        ),
        Started(
            conversation_id=cid,
            at=at,
            event_id=new_id(),
            turn_id=turn,
            user_message_id=user,
            model="demo",
        ),
    ]
    events += [
        Chunk(
            conversation_id=cid, at=at, event_id=new_id(), turn_id=turn, kind="answer", text=f"{i} "
        )
        for i in range(CHUNKS)
    ]
    answer = "".join(f"{i} " for i in range(CHUNKS))
    events.append(
        Done(
            conversation_id=cid,
            at=at,
            event_id=new_id(),
            turn_id=turn,
            content=[ContentBlock(role="assistant", content=answer)],
            stop_reason="stop",
            input_tokens=3,
            output_tokens=CHUNKS,
        )
    )
    return events


async def _long_conversation(event_log: EventLog, turns: int) -> tuple[str, list[Event]]:
    """A conversation of `turns` answers of CHUNKS chunks each, in the log."""
    cid = new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    seq = await event_log.append(cid, [created], 0)
    written: list[Event] = [created]
    for n in range(turns):
        events = answered_turn(cid, n)
        for start in range(0, len(events), 100):
            seq = await event_log.append(cid, events[start : start + 100], seq)
        written += events
    return cid, written


def _writer(event_log: EventLog, cid: str, snapshots: SnapshotStore | None) -> EventWriter:
    return EventWriter(
        cid, event_log, max_event_bytes=64 * 1024, new_id=new_id, snapshots=snapshots
    )


async def _caught_up(
    event_log: EventLog, turns: int, snapshots: SnapshotStore | None
) -> tuple[str, list[Event], EventWriter]:
    """A conversation of `turns` answers in the log, and a writer that has folded it."""
    cid, written = await _long_conversation(event_log, turns)
    writer = _writer(event_log, cid, snapshots)
    await writer.catch_up()
    return cid, written, writer


async def test_a_cold_writer_begins_at_the_snapshot_and_folds_on_to_the_whole_logs_state(
    event_log: EventLog, nc: NatsClient, redis: aioredis.Redis
) -> None:
    store = SnapshotStore(redis, every=EVERY)
    cid, written, first = await _caught_up(event_log, 3, store)
    folded = first.folded()
    assert folded.state == fold(Conversation(conversation_id=cid), written)
    assert folded.entries == len(written) and store.due(folded)
    assert await store.save(folded)

    # Two more answers after the snapshot; then a question from before it is taken
    # out of the log by hand, past its first read: only a writer that begins at the
    # snapshot still has it.
    more = answered_turn(cid, 3) + answered_turn(cid, 4)
    for start in range(0, len(more), 100):
        await first.append(more[start : start + 100])
    entries = await event_log.read(cid)
    questions = [e for e in entries if isinstance(e.event, UserMessage)]
    assert questions[2].seq > entries[511].seq  # past the first read of 512
    await nc.jetstream().delete_msg(EVT_STREAM, questions[2].seq)

    cold = _writer(event_log, cid, store)
    await cold.catch_up()
    assert cold.state == fold(Conversation(conversation_id=cid), written + more)
    assert cold.seq == first.seq and cold.entries == len(written) + len(more)
    # it began at the snapshot: the next is due EVERY entries past that one
    assert cold.folded().saved == folded.entries

    without = _writer(event_log, cid, None)
    await without.catch_up()
    assert len(without.state.messages) == len(cold.state.messages) - 1


async def test_a_log_whose_beginning_is_gone_is_folded_whole_even_with_a_snapshot(
    event_log: EventLog, nc: NatsClient, redis: aioredis.Redis
) -> None:
    """Retention that removed a conversation's first events makes it unreadable
    (README: Retention), the same with or without a snapshot in Redis: not until
    the snapshot happens to expire."""
    store = SnapshotStore(redis, every=EVERY)
    cid, _, first = await _caught_up(event_log, 3, store)
    assert await store.save(first.folded())
    for stored in (await event_log.read(cid))[:10]:
        await nc.jetstream().delete_msg(EVT_STREAM, stored.seq)
    cold = _writer(event_log, cid, store)
    await cold.catch_up()
    without = _writer(event_log, cid, None)
    await without.catch_up()
    assert cold.state == without.state
    assert not cold.state.exists


@pytest.mark.parametrize("kind", ["another log", "another fold", "damaged", "another conversation"])
async def test_a_snapshot_that_is_not_certainly_this_logs_is_passed_over(
    event_log: EventLog, redis: aioredis.Redis, kind: str
) -> None:
    store = SnapshotStore(redis, every=EVERY)
    cid, written, first = await _caught_up(event_log, 2, store)
    real = first.folded()
    # a snapshot claiming a state the log does not hold (no messages at all), at a
    # position past the first read, so that it would be used if it were believed
    lie = msgspec.structs.replace(real, state=Conversation(conversation_id=cid, exists=True))
    if kind == "another log":  # the entry at its position is not the one it was folded to
        data = encode_snapshot(msgspec.structs.replace(lie, event_id=new_id()))
    elif kind == "another fold":  # written by other code
        data = encode_snapshot(lie, fold="an older fold")
    elif kind == "damaged":
        data = b"\x78\x01not a snapshot"
    else:  # another conversation's state under this one's key
        other = Conversation(conversation_id=new_id(), exists=True)
        data = encode_snapshot(msgspec.structs.replace(lie, state=other))
    await redis.set(f"parley:snapshot:{cid}", data)
    # ... and the lie itself, believed, would give the empty state
    assert await store.load(cid, event_log) is None

    cold = _writer(event_log, cid, store)
    await cold.catch_up()
    assert cold.state == fold(Conversation(conversation_id=cid), written)
    assert cold.entries == len(written)


async def test_a_snapshot_is_due_only_for_an_idle_conversation_folded_far_enough(
    event_log: EventLog, redis: aioredis.Redis
) -> None:
    store = SnapshotStore(redis, every=EVERY)
    cid, _, writer = await _caught_up(event_log, 1, store)
    folded = writer.folded()
    assert store.due(folded)
    assert not store.due(msgspec.structs.replace(folded, saved=folded.entries - EVERY + 1))
    assert not SnapshotStore(redis, every=0).due(folded)  # 0: never
    # a turn running: its state is about to change
    running = fold(folded.state, answered_turn(cid, 1)[:5])
    assert running.active is not None
    assert not store.due(msgspec.structs.replace(folded, state=running))
    assert not store.due(Folded(Conversation(conversation_id=cid), seq=1, entries=EVERY))


async def test_redis_away_means_no_snapshot_and_the_log_folded_whole(
    event_log: EventLog,
) -> None:
    gone = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    store = SnapshotStore(gone, every=EVERY)
    cid, written, writer = await _caught_up(event_log, 2, store)
    assert writer.state == fold(Conversation(conversation_id=cid), written)
    assert not await store.save(writer.folded())
    await gone.aclose()


async def test_a_large_state_is_written_and_read_off_the_loop_and_a_huge_one_not_at_all(
    event_log: EventLog, redis: aioredis.Redis
) -> None:
    cid, _, writer = await _caught_up(event_log, 1, SnapshotStore(redis, every=EVERY))
    for _ in range(2):  # 1.4 MB of questions, as long pasted documents would be
        big = "".join(new_id() for _ in range(27_000))
        message = UserMessage(
            conversation_id=cid, at=2, event_id=new_id(), message_id=new_id(), content=big
        )
        await writer.append([message])
    folded = writer.folded()
    assert state_bytes(folded.state) > 1024 * 1024  # encoded in a thread
    assert await SnapshotStore(redis, every=EVERY, max_bytes=len(big) // 100).save(folded) is False
    assert await redis.get(f"parley:snapshot:{cid}") is None
    store = SnapshotStore(redis, every=EVERY)
    assert await store.save(folded)
    read = await store.load(cid, event_log)
    assert read is not None and read.state == folded.state


async def test_snapshots_turned_off_are_neither_written_nor_read(
    event_log: EventLog, redis: aioredis.Redis
) -> None:
    """PARLEY_SNAPSHOT_EVERY=0 turns snapshots off: one written before (they live a
    week) is not read either, so an operator who suspects them can rule them out."""
    on = SnapshotStore(redis, every=EVERY)
    cid, written, first = await _caught_up(event_log, 3, on)
    assert await on.save(first.folded())

    off = SnapshotStore(redis, every=0)
    assert not off.due(first.folded())
    assert await off.load(cid, event_log) is None
    cold = _writer(event_log, cid, off)
    await cold.catch_up()
    assert cold.state == fold(Conversation(conversation_id=cid), written)
    assert cold.folded().saved == 0  # folded from the log, not begun at the snapshot


async def test_a_snapshot_in_use_lasts_from_its_last_use_and_one_it_cannot_encode_is_skipped(
    event_log: EventLog, redis: aioredis.Redis
) -> None:
    store = SnapshotStore(redis, every=EVERY, ttl_s=3600)
    cid, _, writer = await _caught_up(event_log, 2, store)
    folded = writer.folded()
    await redis.set(f"parley:snapshot:{cid}", encode_snapshot(folded), ex=60)
    assert await store.load(cid, event_log) is not None
    assert await redis.ttl(f"parley:snapshot:{cid}") > 60  # used: another hour from now

    # a state that cannot be encoded (a lone surrogate: a bug upstream) is not written,
    # and saving it raises nothing into the worker
    broken = msgspec.structs.replace(folded.state, title="\ud800")
    assert await store.save(msgspec.structs.replace(folded, state=broken)) is False
