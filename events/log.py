"""The event log on JetStream: append with a single-writer guarantee, read, follow.

Each conversation is one subject (`chat.evt.<conversation>`) of the CHAT_EVT
stream; the stream sequence of an event is its position, and the `id:` a viewer
resumes from.

Single writer: `append` sends `Nats-Expected-Last-Subject-Sequence`, so the
server refuses an append from a writer whose view of the conversation is stale
(EventLogConflict) instead of interleaving two writers. A retried append cannot
land twice either: every event goes out with `Nats-Msg-Id` = its event_id and the
stream's duplicate window drops the second copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from events.codec import decode_event, encode
from events.errors import EventLogConflict, EventLogUnavailable, PositionGone
from events.follow import LogFollower
from events.subjects import (
    CMD_STREAM,
    CMD_SUBJECTS,
    EVT_STREAM,
    EVT_SUBJECTS,
    event_subject,
)
from events.vocabulary import AnyEvent, ConversationCreated, Event

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check
_WRONG_LAST_SEQUENCE = 10071
_DUPLICATE_WINDOW_S = 120.0
_PUBLISH_ATTEMPTS = 3
# How long a follower waits for news before it looks at its stop flag again.
_FOLLOW_WAIT_S = 1.0


class StoredEvent(msgspec.Struct, frozen=True):
    """An event with its position in the log."""

    seq: int
    event: AnyEvent


async def ensure_streams(js: JetStreamContext) -> None:
    """Create (or update) the two streams. Safe to call from every process at start.

    How often the server fsyncs (`sync_interval`) is server configuration, not
    stream configuration: production sets `always` (DESIGN section 8).
    """
    evt = api.StreamConfig(
        name=EVT_STREAM,
        subjects=[EVT_SUBJECTS],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        duplicate_window=_DUPLICATE_WINDOW_S,
        allow_direct=True,
    )
    # Commands are work: each is consumed once by a worker, then removed.
    cmd = api.StreamConfig(
        name=CMD_STREAM,
        subjects=[CMD_SUBJECTS],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.WORK_QUEUE,
        duplicate_window=_DUPLICATE_WINDOW_S,
    )
    for config in (evt, cmd):
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)


class EventLog:
    """Append, read and follow one conversation's events."""

    def __init__(self, js: JetStreamContext, *, publish_timeout: float = 5.0) -> None:
        self._js = js
        self._publish_timeout = publish_timeout

    async def append(self, conversation_id: str, events: Sequence[Event], expected_seq: int) -> int:
        """Append events in order; returns the sequence of the last one.

        `expected_seq` is the sequence of the conversation's last event as this
        writer knows it (0: the conversation has no events yet).
        """
        subject = event_subject(conversation_id)
        last = expected_seq
        for event in events:
            last = await self._publish_one(subject, conversation_id, event, last)
        return last

    async def _publish_one(
        self, subject: str, conversation_id: str, event: Event, expected: int
    ) -> int:
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(expected),
            "Nats-Msg-Id": event.event_id,
        }
        payload = encode(event)
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                ack = await self._js.publish(
                    subject,
                    payload,
                    stream=EVT_STREAM,
                    headers=headers,
                    timeout=self._publish_timeout,
                )
            except nats.js.errors.APIError as err:
                if err.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                # The sequence check runs before the duplicate check, so an append
                # whose ack was lost comes back as a conflict when retried: if the
                # conversation's last event is this very event, it did land.
                landed = await self._last_if_same(subject, event.event_id)
                if landed is not None:
                    return landed
                raise EventLogConflict(conversation_id, expected, err.description or "") from err
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError,
            ) as err:
                # Safe to resend: the same Nats-Msg-Id makes a second copy a no-op.
                if attempt + 1 == _PUBLISH_ATTEMPTS:
                    raise EventLogUnavailable(f"append to {subject} timed out") from err
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            return int(ack.seq)
        raise AssertionError("unreachable")

    async def _last_if_same(self, subject: str, event_id: str) -> int | None:
        try:
            msg = await self._js.get_msg(EVT_STREAM, subject=subject)
        except nats.js.errors.NotFoundError:
            return None
        if (msg.headers or {}).get("Nats-Msg-Id") == event_id:
            return int(msg.seq or 0)
        return None

    async def last_seq(self, conversation_id: str) -> int:
        """Sequence of the conversation's last event, 0 if it has none."""
        try:
            msg = await self._js.get_msg(EVT_STREAM, subject=event_subject(conversation_id))
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def last(self, conversation_id: str) -> StoredEvent | None:
        """The conversation's last event."""
        try:
            msg = await self._js.get_msg(EVT_STREAM, subject=event_subject(conversation_id))
        except nats.js.errors.NotFoundError:
            return None
        return StoredEvent(seq=int(msg.seq or 0), event=decode_event(msg.data or b""))

    async def first(self, conversation_id: str) -> StoredEvent | None:
        """The conversation's first kept event: `conversation_created` unless retention cut it."""
        try:
            msg = await self._js.get_msg(
                EVT_STREAM, seq=1, subject=event_subject(conversation_id), next=True
            )
        except nats.js.errors.NotFoundError:
            return None
        return StoredEvent(seq=int(msg.seq or 0), event=decode_event(msg.data or b""))

    async def read(self, conversation_id: str, after: int = 0) -> list[StoredEvent]:
        """Every event after `after`, up to the end of the log as it is now."""
        end = await self.last_seq(conversation_id)
        if end <= after:
            return []
        out: list[StoredEvent] = []
        async for stored in self.follow(conversation_id, after):
            out.append(stored)
            if stored.seq >= end:
                break
        return out

    async def check_position(self, conversation_id: str, after: int) -> None:
        """Raise PositionGone if events after `after` were removed by retention.

        A conversation's first event is always its `conversation_created`; if the
        first kept event is anything else, the head of the conversation is gone and
        a reader starting before the first kept event would miss something.
        """
        head = await self.first(conversation_id)
        if head is None or isinstance(head.event, ConversationCreated):
            return
        if after < head.seq - 1:
            raise PositionGone(after, head.seq)

    async def follow(
        self, conversation_id: str, after: int, *, stop: asyncio.Event | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Events after `after`: catch-up, then live, in order, until `stop` or the caller stops.

        An event this version cannot decode (written by a newer vocabulary) is
        skipped: a reader must not be stuck behind it.
        """
        follower = LogFollower(self._js, event_subject(conversation_id), after)
        try:
            while stop is None or not stop.is_set():
                for raw in await follower.next_batch(256, wait_s=_FOLLOW_WAIT_S):
                    try:
                        event = decode_event(raw.data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue
                    yield StoredEvent(seq=raw.seq, event=event)
        finally:
            await follower.close()
