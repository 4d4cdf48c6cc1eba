"""The event log on JetStream: append with a single-writer guarantee, read, follow.

Each conversation is one subject (`chat.evt.<conversation>`) of the CHAT_EVT
stream; the stream sequence of an event is its position, and the `id:` a viewer
resumes from.

Single writer: `append` sends `Nats-Expected-Last-Subject-Sequence`, so the
server refuses an append from a writer whose view of the conversation is stale
(EventLogConflict) instead of interleaving two writers. A retried append cannot
land twice either: every event goes out with `Nats-Msg-Id` = its event_id and the
stream's duplicate window drops the second copy.

A broker that is away (restarting, a leader election): reads fail at once with
`EventLogUnavailable` while the client is not connected, so an edge answers 503
instead of hanging; an append keeps trying for `retry_for_s` (30 s: a turn rides
out a broker restart or a stream leader's election and goes on), then fails
the same way.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from events.codec import Unreadable, decode_entry, encode
from events.errors import EventLogConflict, EventLogUnavailable, PositionGone
from events.follow import LiveFollower, RawEvent
from events.publisher import AckedPublisher
from events.replies import Replies, no_responders
from events.streams import ensure_streams as ensure_streams
from events.subjects import EVT_STREAM, event_subject, gone_subject
from events.vocabulary import AnyEvent, ConversationCreated, Event

# JetStream's error codes for a failed Nats-Expected-Last-Subject-Sequence check:
# 10071 names the sequence found; a clustered stream answers 10164, which does not
# (the check runs before the proposal, against the leader's view).
_WRONG_LAST_SEQUENCE = (10071, 10164)
# How long an append keeps trying while JetStream does not answer or the client
# is reconnecting: a stream leader that dies is replaced within ~10 s (a Raft
# election), a restarted broker is back within seconds, and events.streams keeps
# the duplicate window well beyond this.
_RETRY_FOR_S = 30.0
_PUBLISH_ATTEMPTS = 3  # at least, when the broker answers but not in time
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
_CONNECTED_POLL_S = 0.05
# What a publish or a read raises while the broker, or the stream's leader, is
# away or restarting: worth another try, never the event's fault.
_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,  # JetStream recovering its streams, no leader yet
    TimeoutError,
)
_RETRYABLE: tuple[type[BaseException], ...] = (*_TRANSIENT, EventLogUnavailable)
# How long a follower waits for news before it looks at its stop flag again.
_FOLLOW_WAIT_S = 1.0
_DIRECT_GET = f"$JS.API.DIRECT.GET.{EVT_STREAM}"
_READ_BATCH = 512


class RawEntry(msgspec.Struct, frozen=True):
    """An entry of the log as stored: position, subject, bytes."""

    seq: int
    subject: str
    data: bytes


class _ApiError(msgspec.Struct):
    code: int
    err_code: int = 0
    description: str = ""


class _GotMessage(msgspec.Struct):
    seq: int
    data: str = ""  # base64
    hdrs: str = ""  # base64: "NATS/1.0\r\nName: value\r\n..."


class _MsgGetResponse(msgspec.Struct):
    """The answer of $JS.API.STREAM.MSG.GET (the stream leader's, so never stale)."""

    message: _GotMessage | None = None
    error: _ApiError | None = None


_decode_msg_get = msgspec.json.Decoder(_MsgGetResponse).decode


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    """An entry of the log with its position: an event, or one this version cannot read.

    Readers handle `Unreadable` by their own rule (skip, show, refuse the
    conversation) but always step past it: the position moves on regardless.

    Left out of the collector (`gc=False`): an event holds only values, so no
    cycle can run through one, and an edge keeps thousands (api.hub's ring).
    """

    seq: int
    event: AnyEvent | Unreadable

    @classmethod
    def decode(cls, seq: int, data: bytes) -> StoredEvent:
        """The entry at `seq` whose stored bytes are `data`."""
        return cls(seq=seq, event=decode_entry(data))


def _append_headers(event: Event, expected: int | None) -> dict[str, str]:
    """The headers every appended event carries: the stream it must land in, its id (a
    resend is dropped as a duplicate) and, with `expected`, the single-writer check
    against the subject's last sequence."""
    headers = {"Nats-Expected-Stream": EVT_STREAM, "Nats-Msg-Id": event.event_id}
    if expected is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
    return headers


class LogObserver(Protocol):
    """What the log tells about its appends (the wiring counts it: parley/metrics.py).
    Calls are quick and never raise."""

    def chain_broken(self) -> None:
        """Another writer's entry came between two events of one append after its
        first landed; the rest went one event at a time (`EventLog._publish_chained`):
        a round trip more each."""


class NoLogObserver:
    def chain_broken(self) -> None:
        pass


class EventLog:
    """Append, read and follow one conversation's events."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        publish_timeout: float = 5.0,
        retry_for_s: float = _RETRY_FOR_S,
        observer: LogObserver | None = None,
    ) -> None:
        self._js = js
        # appends' acks and reads' answers: one inbox, straight from the read loop;
        # other publishes on the same connection wait on it too (the edge's commands)
        self.replies = Replies(js._nc)
        self._publisher = AckedPublisher(self.replies)
        self._publish_timeout = publish_timeout
        # how long an append waits for a broker, or a stream leader, that is away
        self._retry_for_s = retry_for_s
        self._observer = observer or NoLogObserver()

    async def append(self, conversation_id: str, events: Sequence[Event], expected_seq: int) -> int:
        """Append events in order; returns the sequence of the last one.

        `expected_seq` is the sequence of the conversation's last event as this
        writer knows it (0: the conversation has no events yet).
        """
        return await self.append_to(event_subject(conversation_id), events, expected_seq)

    async def append_to(self, subject: str, events: Sequence[Event], expected_seq: int) -> int:
        """`append` for any subject of the log (an account's, a project's)."""
        last, landed = expected_seq, 0
        if len(events) > 1 and self._js._nc.is_connected:
            landed, last = await self._publish_chained(subject, events, expected_seq)
        for event in events[landed:]:
            last = await self._publish_one(subject, subject, event, last)
        return last

    async def _publish_chained(
        self, subject: str, events: Sequence[Event], expected: int
    ) -> tuple[int, int]:
        """Send every event of an append at once, before any ack: one round trip for
        all (a turn's `user_message` and `started` were two in a row on its way to its
        first token: a pass each of a loop a thousand streams keep busy). The first is
        checked against the subject's last sequence, as any append is; each next one
        with `Nats-Expected-Last-Msg-Id` against the one before it: the stream's last
        message must be that event, so it lands only right behind it, and only if it
        landed. How many landed (those up to the last acknowledged: each one's check
        says the one before it did) and the last one's sequence; the caller sends the
        rest one at a time (`_publish_one`), with its retries and its conflict rule.
        Another writer's message between two events of the chain (any subject of the
        stream) refuses the second: it is sent again, checked by sequence."""
        messages = [(encode(events[0]), _append_headers(events[0], expected))]
        for before, event in itertools.pairwise(events):
            headers = _append_headers(event, None)
            headers["Nats-Expected-Last-Msg-Id"] = before.event_id
            messages.append((encode(event), headers))
        acks = await self._publisher.publish_each(subject, messages, self._publish_timeout)
        for landed in range(len(acks), 0, -1):
            seq = acks[landed - 1]
            if isinstance(seq, int):
                break
        else:
            landed, seq = 0, expected
        if 0 < landed < len(acks):
            self._observer.chain_broken()  # (none landed: a stale append, or no answer)
        return landed, seq

    async def _publish_one(
        self, subject: str, conversation_id: str, event: Event, expected: int
    ) -> int:
        """Append one event; retried while JetStream does not answer (a node gone, a
        leader being elected), for up to `retry_for_s`.

        Retrying cannot write an event twice: the resend carries the same
        Nats-Msg-Id, which the stream's duplicate window drops, and the
        expected-sequence check refuses it once the first copy landed; that
        refusal is then recognised as our own event (`_last_if_same`).
        """
        headers = _append_headers(event, expected)
        payload = encode(event)
        # time.monotonic rather than the loop's clock: on Python 3.11 every
        # asyncio.get_running_loop() makes a getpid() system call (py-spy with native
        # frames, a loaded worker: 2% of its time, most of it here, once per append).
        deadline = time.monotonic() + self._retry_for_s
        attempt = 0
        while True:
            try:
                await self._connected(deadline)
                seq = await self._publisher.publish(
                    subject, payload, headers, self._publish_timeout
                )
            except nats.js.errors.APIError as err:
                if isinstance(err, nats.js.errors.ServiceUnavailableError):
                    failure: BaseException = err
                elif err.err_code not in _WRONG_LAST_SEQUENCE:
                    raise
                else:
                    # The sequence check runs before the duplicate check, so an append
                    # whose ack was lost comes back as a conflict when retried: if the
                    # conversation's last event is this very event, it did land.
                    try:
                        landed = await self._last_if_same(subject, event.event_id)
                    except EventLogUnavailable as unavailable:
                        failure = unavailable  # not known yet: ask again
                    else:
                        if landed is not None:
                            return landed
                        raise EventLogConflict(
                            conversation_id, expected, err.description or ""
                        ) from err
            except _RETRYABLE as err:
                failure = err
            else:
                return seq
            # Safe to resend: the same Nats-Msg-Id makes a second copy a no-op.
            attempt += 1
            if attempt >= _PUBLISH_ATTEMPTS and time.monotonic() >= deadline:
                raise EventLogUnavailable(f"append to {subject}: {failure!r}") from failure
            await asyncio.sleep(min(_RETRY_MAX_S, _RETRY_FIRST_S * 2**attempt))

    async def _connected(self, deadline: float) -> None:
        """Return once the client is connected; EventLogUnavailable if it is not by
        `deadline` (`time.monotonic()`).

        While reconnecting, nats-py keeps what is published in a buffer and
        sends it once back: a request made then would only wait out its timeout."""
        nc = self._js._nc
        while not nc.is_connected:
            if time.monotonic() >= deadline:
                raise EventLogUnavailable("not connected to NATS (reconnecting)")
            await asyncio.sleep(_CONNECTED_POLL_S)

    async def _get_msg(
        self, subject: str, seq: int | None = None, *, next: bool = False
    ) -> _GotMessage | None:
        """The subject's last message, or with `seq` (and `next`) the one at or after it;
        None when there is none.

        The API asked directly and its answer decoded by msgspec: nats-py's
        `get_msg` parses every message's headers with the email package, which
        py-spy showed at a third of the cost of each read a POST stream makes."""
        await self._connected(0.0)
        if next:
            request = {"seq": seq or 0, "next_by_subj": subject}
        elif seq is not None:
            request = {"seq": seq}
        else:
            request = {"last_by_subj": subject}
        js = self._js
        try:
            reply = await self.replies.request(
                f"{js._prefix}.STREAM.MSG.GET.{EVT_STREAM}",
                msgspec.json.encode(request),
                js._timeout,
            )
            if no_responders(reply):
                raise nats.errors.NoRespondersError
            answer = _decode_msg_get(reply.data)
            if answer.error is not None:
                nats.js.errors.APIError.from_error(msgspec.structs.asdict(answer.error))
        except nats.js.errors.NotFoundError:
            return None
        except _TRANSIENT as err:
            raise EventLogUnavailable(f"reading {subject}: {err!r}") from err
        if answer.message is None:
            raise EventLogUnavailable(f"reading {subject}: an answer without a message")
        return answer.message

    async def _last_if_same(self, subject: str, event_id: str) -> int | None:
        msg = await self._get_msg(subject=subject)
        if msg is None:
            return None
        return msg.seq if _msg_id(msg) == event_id else None

    async def erase(self, conversation_id: str, tombstone_seq: int) -> None:
        """Purge every entry of the conversation's subject before its tombstone
        (`conversation_deleted`, at `tombstone_seq`): the content is gone from the
        log, not hidden. The tombstone stays, and so does anything after it (a
        worker of an older version may append a refusal there): a purge that kept
        only the subject's last entry would take the tombstone then. Idempotent: a
        purge of a subject that begins with its tombstone removes nothing. Raises
        EventLogUnavailable when NATS does not answer or refuses (the caller tries
        again: its command is redelivered)."""
        if tombstone_seq <= 0:
            raise ValueError(f"conversation {conversation_id}: no tombstone to erase up to")
        try:
            await self._js.purge_stream(
                EVT_STREAM, subject=event_subject(conversation_id), seq=tombstone_seq
            )
        except (nats.errors.Error, TimeoutError) as err:
            raise EventLogUnavailable(
                f"conversation {conversation_id}: its log could not be purged ({err!r})"
            ) from err

    async def announce_gone(self, conversation_id: str) -> None:
        """Tell every edge that the conversation was deleted (plain NATS, at most once:
        an edge that misses it still finds the tombstone in the log, api.access)."""
        try:
            await self._js._nc.publish(gone_subject(conversation_id), b"")
        except (nats.errors.Error, TimeoutError) as err:
            raise EventLogUnavailable(
                f"conversation {conversation_id}: its deletion was not announced ({err!r})"
            ) from err

    async def last_seq(self, conversation_id: str) -> int:
        """Sequence of the conversation's last event, 0 if it has none."""
        return await self.last_seq_of(event_subject(conversation_id))

    async def acknowledged_up_to(self, durable: str) -> int | None:
        """The position up to which the log's durable consumer `durable` has had every
        entry acknowledged (its ack floor); None when there is no such consumer."""
        try:
            info = await self._js.consumer_info(EVT_STREAM, durable)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as err:
            raise EventLogUnavailable(f"reading consumer {durable}: {err!r}") from err
        return int(info.ack_floor.stream_seq) if info.ack_floor is not None else 0

    async def last_seq_of(self, subject: str) -> int:
        msg = await self._get_msg(subject=subject)
        return 0 if msg is None else msg.seq

    async def last(self, conversation_id: str) -> StoredEvent | None:
        """The conversation's last event."""
        msg = await self._get_msg(subject=event_subject(conversation_id))
        if msg is None:
            return None
        return StoredEvent.decode(msg.seq, base64.b64decode(msg.data))

    async def at(self, seq: int) -> StoredEvent | None:
        """The entry at `seq`, of any subject; None when there is none (or no longer)."""
        msg = await self._get_msg(f"the entry at {seq}", seq)
        if msg is None or msg.seq != seq:
            return None
        return StoredEvent.decode(msg.seq, base64.b64decode(msg.data))

    async def first(self, conversation_id: str) -> StoredEvent | None:
        """The conversation's first kept event: `conversation_created` unless retention cut it."""
        msg = await self._get_msg(event_subject(conversation_id), 1, next=True)
        if msg is None:
            return None
        return StoredEvent.decode(msg.seq, base64.b64decode(msg.data))

    async def read(self, conversation_id: str, after: int = 0) -> list[StoredEvent]:
        """Every entry after `after`, up to the end of the log as it is now.

        Batched direct gets (NATS 2.11+): one request answers up to `_READ_BATCH`
        entries of the subject, so reading a conversation costs a request or
        two, not a consumer created and deleted. Every position is handed out
        (unreadable ones too), and it always returns.
        """
        return await self.read_subject(event_subject(conversation_id), after)

    async def read_subject(self, subject: str, after: int = 0) -> list[StoredEvent]:
        """`read` for any subject of the log."""
        out: list[StoredEvent] = []
        start = after + 1
        while True:
            batch, pending = await self._direct_batch(subject, start)
            out.extend(StoredEvent.decode(e.seq, e.data) for e in batch)
            if not batch or pending == 0:
                return out
            start = batch[-1].seq + 1

    async def read_events(self, subject: str, after: int) -> tuple[list[RawEvent], int]:
        """One batch of the subject's entries after `after`, undecoded, and how many
        remain after it (events.follow.LogReader)."""
        batch, pending = await self._direct_batch(subject, after + 1)
        return [RawEvent(seq=e.seq, data=e.data, subject=e.subject) for e in batch], pending

    async def scan(self, after: int = 0) -> AsyncIterator[list[RawEntry]]:
        """The whole log (every subject) after `after`, in order, a batch at a time.

        For readers of everything that must not miss anything (the audit): raw
        entries, so the reader decides what to decode.
        """
        start = after + 1
        while True:
            batch, pending = await self._direct_batch(None, start)
            if batch:
                yield batch
            if not batch or pending == 0:
                return
            start = batch[-1].seq + 1

    async def _direct_batch(self, subject: str | None, start: int) -> tuple[list[RawEntry], int]:
        """Up to `_READ_BATCH` entries (of `subject`, or of all) from `start`, and how many remain."""
        await self._connected(0.0)
        request: dict[str, object] = {"seq": start, "batch": _READ_BATCH}
        if subject is not None:
            request["next_by_subj"] = subject
        try:
            answers = await self.replies.request_many(
                _DIRECT_GET, encode(request), self._publish_timeout
            )
        except nats.errors.TimeoutError as err:
            raise EventLogUnavailable(f"reading {subject} timed out") from err
        *entries, end = answers
        status = end.status
        if status == "404":  # nothing at or after `start`
            return [], 0
        if status != "204":  # 204: the end of this batch
            raise EventLogUnavailable(f"reading {subject}: status {status}")
        out: list[RawEntry] = []
        for entry in entries:
            seq = entry.header(b"Nats-Sequence")
            if seq is None:
                raise EventLogUnavailable(f"reading {subject}: an entry without its position")
            out.append(
                RawEntry(seq=int(seq), subject=entry.header(b"Nats-Subject") or "", data=entry.data)
            )
        return out, int(end.header(b"Nats-Num-Pending") or "0")

    async def check_position(self, conversation_id: str, after: int) -> None:
        """Raise PositionGone if events after `after` were removed by retention.

        A conversation's first event is always its `conversation_created`; if the
        first kept event is anything else, the head of the conversation is gone and
        a reader starting before the first kept event would miss something.
        """
        head = await self.first(conversation_id)
        if head is None or starts_a_conversation(head.event):
            return
        if after < head.seq - 1:
            raise PositionGone(after, head.seq)

    async def follow(
        self, conversation_id: str, after: int, *, stop: asyncio.Event | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Entries after `after`: catch-up, then live, in order, until `stop` or the caller stops.

        An entry this version cannot decode comes out as `Unreadable`, never
        silently dropped: a reader that waits for a position (`read`) must see
        every position go by, and a reader that shows the log must show it.
        """
        follower = LiveFollower(self._js._nc, self, conversation_id, after)
        try:
            while stop is None or not stop.is_set():
                for raw in await follower.next_batch(256, wait_s=_FOLLOW_WAIT_S):
                    yield StoredEvent.decode(raw.seq, raw.data)
        finally:
            await follower.close()


def starts_a_conversation(event: AnyEvent | Unreadable) -> bool:
    """Every conversation's log begins with its `conversation_created`: anything else
    first means retention or a purge removed its start."""
    if isinstance(event, Unreadable):
        return event.type == "conversation_created"
    return isinstance(event, ConversationCreated)


def _msg_id(msg: _GotMessage) -> str | None:
    """The entry's Nats-Msg-Id header (the event_id it was appended with)."""
    if not msg.hdrs:
        return None
    for line in base64.b64decode(msg.hdrs).decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "nats-msg-id":
            return value.strip()
    return None
