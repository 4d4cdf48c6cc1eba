"""Following the event log: every event after a position, catch-up then live, in order.

CHAT_EVT republishes each entry it stores to `chat.live.<conversation>` as a
plain NATS message whose headers carry its position (`Nats-Sequence`) and the
position of the entry before it on the same subject (`Nats-Last-Sequence`).
A `LiveFollower` subscribes to that subject, so following a conversation costs
the server one subscription, not a consumer: with an ephemeral consumer per
followed conversation, nats-server spent 142 us of CPU per appended entry with
1,000 conversations followed, against 41-45 us republishing them (README
"Benchmark log").

Plain NATS may drop a message (a slow reader, a reconnect), so the rules here
make every position come out once, in order:

- it subscribes first, then reads the log after its position (direct gets),
  and hands out what the log gave; live entries at or before that are dropped;
- a live entry whose predecessor on the subject is not the last one handed
  out shows a gap: the log is read from the last one handed out, then live
  delivery goes on (entries already read are dropped);
- a gap at the tail of a burst shows no later entry to notice it, so the
  first silence after activity, and every `watchdog_s` of silence, asks the
  log for the subject's last position: past what was handed out means
  something was lost, and the log is read;
- more than `pending_limit` entries waiting: the queue is dropped and the log
  read instead.

So no event is skipped or handed out twice, whatever happens underneath
(tests/test_follow.py forces each case).

Deliveries arrive into our own bounded queue, and a batch is whatever is
queued when the reader asks: one wait per batch, not a task and a timer per
message as `next_msg` costs (py-spy on `parley bench capacity` showed those
timers and tasks among the edge's largest costs). On a `DirectClient` (every
role's connection) they come straight from the client's read loop, with no
`Msg`, queue or task of nats.py's in between, and the positions are read from
the raw headers; on another client, through a callback.

A reader may also take entries as they arrive (`on_arrival`): while it waits
in `next_batch` with nothing queued, an entry that follows the last one handed
out goes straight to that callback from the read loop, without waking the
reader's task (at 250 turns an edge wakes a hub task per token otherwise: a
pass of its loop more on every token's way to a viewer). The callback may
decline an entry (it needs to await something for it); that one and every one
after it are queued and handed out by `next_batch` as before.

`reader_consumer` is the consumer configuration of readers that do take one
(projections.feed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

from events.broker import DirectClient, DirectHandler
from events.subjects import event_subject, live_subject


class RawEvent(msgspec.Struct, frozen=True):
    seq: int
    data: bytes
    subject: str = ""  # where the reader has it: what an unreadable entry belongs to


def reader_consumer(
    filter_subject: str, after: int, *, name: str | None = None
) -> api.ConsumerConfig:
    """An ephemeral consumer that hands out `filter_subject`'s events after `after`
    once each: no acks, no redelivery, in memory, one replica, and removed by the
    server once its reader has been gone a minute."""
    return api.ConsumerConfig(
        name=name,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after + 1,
        filter_subject=filter_subject,
        ack_policy=api.AckPolicy.NONE,
        max_deliver=1,
        mem_storage=True,
        num_replicas=1,
        # a reader that vanished without closing is cleaned up by the server
        inactive_threshold=60.0,
    )


class LogReader(Protocol):
    """What a follower reads the log with (events.log.EventLog)."""

    async def read_events(self, subject: str, after: int) -> tuple[list[RawEvent], int]:
        """A batch of the subject's entries after `after`, and how many remain."""
        ...

    async def last_seq_of(self, subject: str) -> int: ...


class LiveFollower:
    """Delivers the raw events of one conversation after `after`, in stream order."""

    def __init__(
        self,
        nc: NatsClient,
        reader: LogReader,
        conversation_id: str,
        after: int,
        *,
        pending_limit: int = 10_000,
        watchdog_s: float = 10.0,
        on_arrival: Callable[[RawEvent], bool] | None = None,
    ) -> None:
        """`on_arrival`: takes an entry handed out as it arrives (see the module's
        doc); returns False to have it handed out by `next_batch` instead. Called
        from the connection's read loop; what it raises, `next_batch` raises."""
        self._nc = nc
        self._reader = reader
        self._subject = event_subject(conversation_id)
        self._live = live_subject(conversation_id)
        self.last = after  # the last sequence handed out
        self._pending_limit = pending_limit
        self._watchdog_s = watchdog_s
        self._sub: Any = None
        # (sequence, sequence of the subject's entry before it, payload)
        self._inbox: deque[tuple[int, int, bytes]] = deque()
        self._arrived = asyncio.Event()
        self._behind = True  # the log holds entries not handed out: read it
        self._overflowed = False
        self._silent_s = 0.0
        self._checked = True  # nothing delivered yet: nothing to check
        self._on_arrival = on_arrival
        self._parked = False  # next_batch waits, nothing queued: entries may go on_arrival
        self._handed_on_arrival = False  # since the last wait began
        self._arrival_failed: Exception | None = None

    async def next_batch(self, limit: int, wait_s: float) -> list[RawEvent]:
        """At least one event, plus those already here, up to `limit`; [] after `wait_s`."""
        if self._sub is None:
            await self._start()
        if self._behind:
            caught = await self._catch_up()
            if caught:
                return caught
        if not self._inbox:
            # A timer handle that wakes us, not `asyncio.timeout`: that one costs a
            # Timeout object and a reschedule per wait (8% of an edge's samples under
            # bench capacity), and each expiry leaves a reference cycle of exceptions
            # (CancelledError into TimeoutError) for the garbage collector.
            self._arrived.clear()
            self._handed_on_arrival = False
            self._parked = self._on_arrival is not None
            wake = asyncio.get_running_loop().call_later(wait_s, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                wake.cancel()
                self._parked = False
            if self._arrival_failed is not None:
                raise self._arrival_failed
            if not self._inbox and not self._overflowed:
                if self._handed_on_arrival:
                    # not silent: entries went out as they came
                    self._silent_s = 0.0
                    self._checked = False
                    return []
                await self._on_silence(wait_s)
                return await self._catch_up() if self._behind else []
        self._silent_s = 0.0
        self._checked = False
        if self._overflowed:
            self._overflowed = False
            self._inbox.clear()
            return await self._catch_up()
        out: list[RawEvent] = []
        inbox = self._inbox
        while inbox and len(out) < limit:
            seq, before, data = inbox[0]
            if seq <= self.last:
                inbox.popleft()  # already read from the log
                continue
            if before != self.last:
                self._behind = True  # lost on the way: the log has what is between
                break
            inbox.popleft()
            self.last = seq
            out.append(RawEvent(seq=seq, data=data))
        if not out and self._behind:
            return await self._catch_up()
        return out

    async def _catch_up(self) -> list[RawEvent]:
        """The log's next batch after the last event handed out."""
        batch, pending = await self._reader.read_events(self._subject, self.last)
        if pending == 0:
            self._behind = False  # whatever is stored from now on arrives live
        if batch:
            self.last = batch[-1].seq
        return batch

    def _receiver(self) -> tuple[Callable[[Msg], Awaitable[None]], DirectHandler]:
        """How republished entries reach the inbox: through a subscription's
        callback, or straight from the read loop (`DirectClient`)."""

        def accept(positions: tuple[int, int] | None, data: bytes) -> None:
            if positions is None or len(self._inbox) >= self._pending_limit:
                self._overflowed = True  # positions unknown, or no room: the log is read
            elif self._parked and not self._inbox and self._hand_on_arrival(*positions, data):
                return
            else:
                self._inbox.append((*positions, data))
            self._arrived.set()

        async def receive(msg: Msg) -> None:
            headers = msg.headers or {}
            seq, before = headers.get("Nats-Sequence"), headers.get("Nats-Last-Sequence")
            positions = None if seq is None or before is None else (int(seq), int(before))
            accept(positions, msg.data)

        def receive_directly(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
            accept(republished_positions(headers), data)

        return receive, receive_directly

    def _hand_on_arrival(self, seq: int, before: int, data: bytes) -> bool:
        """Hand the entry to `on_arrival` if it is the next one; whether it was taken."""
        if before != self.last or seq <= self.last or self._on_arrival is None:
            return False  # a gap or a repeat: next_batch sorts it out
        try:
            taken = self._on_arrival(RawEvent(seq=seq, data=data))
        except Exception as err:
            # A bug in the reader's callback must not end the connection's read
            # loop, which every other follower on it shares: the reader's own
            # next_batch raises it instead.
            self._arrival_failed = err
            self._parked = False
            return False
        if not taken:
            return False
        self.last = seq
        self._handed_on_arrival = True
        return True

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._inbox.clear()
        if sub is None:
            return
        if isinstance(self._nc, DirectClient):
            self._nc.deliver_as_usual(sub)
        with contextlib.suppress(nats.errors.Error):  # a connection gone took it along
            await sub.unsubscribe()

    async def _start(self) -> None:
        receive, receive_directly = self._receiver()
        self._sub = await self._nc.subscribe(
            self._live, cb=receive, pending_msgs_limit=self._pending_limit
        )
        if isinstance(self._nc, DirectClient):
            self._nc.deliver_directly(self._sub, receive_directly)
        # the server holds our interest before the log is read: nothing stored
        # after the read can miss us
        await self._nc.flush()
        self._behind = True

    async def _on_silence(self, waited: float) -> None:
        self._silent_s += waited
        if self._checked and self._silent_s < self._watchdog_s:
            return
        self._checked = True
        self._silent_s = 0.0
        if await self._reader.last_seq_of(self._subject) > self.last:
            self._behind = True  # stored but never reached us


_SEQUENCE = b"\r\nNats-Sequence: "
_BEFORE = b"\r\nNats-Last-Sequence: "


def republished_positions(headers: bytes) -> tuple[int, int] | None:
    """(position, position of the subject's entry before it) from a republished
    entry's raw headers; None without them. The last of each header counts: a
    republish adds its headers after any the entry had."""
    at = headers.rfind(_SEQUENCE)
    before_at = headers.rfind(_BEFORE)
    if at < 0 or before_at < 0:
        return None
    at += len(_SEQUENCE)
    before_at += len(_BEFORE)
    try:
        return (
            int(headers[at : headers.index(b"\r", at)]),
            int(headers[before_at : headers.index(b"\r", before_at)]),
        )
    except ValueError:
        return None
