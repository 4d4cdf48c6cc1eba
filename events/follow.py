"""Following the event log: every event after a position, catch-up then live, in order.

The rules are explicit here rather than inside nats.py's ordered consumer,
whose heartbeat-driven resets and background consumer re-creation are hard to
observe or test:

- an ephemeral push consumer, no acks, no flow control, delivering from the
  next position we need;
- every delivery carries its consumer sequence: a gap means a message was lost
  on the way (a slow reader overflowed the client buffer, a reconnect), and we
  start a new consumer right after the last event we handed out;
- a gap at the tail of a burst shows no later delivery to notice it, so the
  first silence after activity asks the server how far the consumer delivered:
  past what we handed out means something was dropped, and we start again;
- a silence longer than `watchdog_s` asks whether the consumer still exists (a
  restarted server forgets it) and starts a new one if not.

So no event is skipped or handed out twice, whatever happens underneath
(tests/test_follow.py forces both a gap and a vanished consumer).

Deliveries arrive into our own bounded queue, and a batch is whatever is
queued when the reader asks: one wait per batch, not a task and a timer per
message as `next_msg` costs (py-spy on `parley bench capacity` showed those
timers and tasks among the edge's largest costs). On a `DirectClient` (every
role's connection) they come straight from the client's read loop, with no
`Msg`, queue or task of nats.py's in between; on another client, through a
callback. The consumer sequence is read straight from the reply subject
rather than through the client's metadata object, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from events.broker import DirectClient, DirectHandler
from events.subjects import EVT_STREAM


class RawEvent(msgspec.Struct, frozen=True):
    seq: int
    data: bytes


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


class LogFollower:
    """Delivers raw events of `filter_subject` after `after`, in stream order."""

    def __init__(
        self,
        js: JetStreamContext,
        filter_subject: str,
        after: int,
        *,
        pending_limit: int = 10_000,
        watchdog_s: float = 10.0,
    ) -> None:
        self._js = js
        self._filter = filter_subject
        self.last = after  # the last sequence handed out
        self._pending_limit = pending_limit
        self._watchdog_s = watchdog_s
        self._sub: Any = None
        self._consumer = ""
        self._inbox: deque[tuple[str, bytes]] = deque()  # (reply subject, payload)
        self._arrived = asyncio.Event()
        self._generation = 0
        self._next_dseq = 1
        self._silent_s = 0.0
        self._checked = True  # nothing delivered yet: nothing to check

    async def next_batch(self, limit: int, wait_s: float) -> list[RawEvent]:
        """At least one event, plus those already here, up to `limit`; [] after `wait_s`."""
        if self._sub is None:
            await self._start()
        if not self._inbox:
            # A timer handle that wakes us, not `asyncio.timeout`: that one costs a
            # Timeout object and a reschedule per wait (8% of an edge's samples under
            # bench capacity), and each expiry leaves a reference cycle of exceptions
            # (CancelledError into TimeoutError) for the garbage collector.
            self._arrived.clear()
            wake = asyncio.get_running_loop().call_later(wait_s, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                wake.cancel()
            if not self._inbox:
                await self._on_silence(wait_s)
                return []
        self._silent_s = 0.0
        self._checked = False
        out: list[RawEvent] = []
        inbox = self._inbox
        while inbox and len(out) < limit:
            if not self._take(inbox.popleft(), out):
                await self._restart()  # lost on the way: resume after the last handed out
                return out
        return out

    def _receiver(self) -> tuple[Callable[[Msg], Awaitable[None]], DirectHandler]:
        """How this consumer's deliveries reach the inbox: through a subscription's
        callback, or straight from the read loop (`DirectClient`)."""
        generation = self._generation

        def accept(reply: str, data: bytes) -> None:
            if generation != self._generation:
                return  # a consumer we already left
            if len(self._inbox) >= self._pending_limit:
                # Dropped: the gap in consumer sequences (or the silence check) shows
                # it, and we start again after the last event handed out.
                return
            self._inbox.append((reply, data))
            self._arrived.set()

        async def receive(msg: Msg) -> None:
            accept(msg.reply, msg.data)

        def receive_directly(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
            accept(reply.decode(), data)

        return receive, receive_directly

    def _take(self, delivered: tuple[str, bytes], out: list[RawEvent]) -> bool:
        reply, data = delivered
        dseq, seq = _sequences(reply)
        if dseq != self._next_dseq:
            return False
        self._next_dseq += 1
        if seq > self.last:
            self.last = seq
            out.append(RawEvent(seq=seq, data=data))
        return True

    async def close(self) -> None:
        sub, consumer, self._sub = self._sub, self._consumer, None
        self._generation += 1
        self._inbox.clear()
        if sub is None:
            return
        if isinstance(self._js._nc, DirectClient):
            self._js._nc.deliver_as_usual(sub)
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self._js.delete_consumer(EVT_STREAM, consumer)

    async def _start(self) -> None:
        config = reader_consumer(self._filter, self.last)
        self._generation += 1
        self._inbox.clear()
        receive, receive_directly = self._receiver()
        self._sub = await self._js.subscribe(
            self._filter,
            stream=EVT_STREAM,
            config=config,
            manual_ack=True,
            cb=receive,
            pending_msgs_limit=self._pending_limit,
        )
        if isinstance(self._js._nc, DirectClient):
            self._js._nc.deliver_directly(self._sub, receive_directly)
        self._consumer = self._sub._consumer
        self._next_dseq = 1
        self._silent_s = 0.0

    async def _restart(self) -> None:
        await self.close()
        await self._start()

    async def _on_silence(self, waited: float) -> None:
        self._silent_s += waited
        if self._checked and self._silent_s < self._watchdog_s:
            return
        self._checked = True
        self._silent_s = 0.0
        try:
            info = await self._js.consumer_info(EVT_STREAM, self._consumer)
        except nats.js.errors.NotFoundError:
            await self._restart()
            return
        delivered = info.delivered.stream_seq if info.delivered else None
        if delivered is not None and delivered > self.last:
            await self._restart()  # delivered but never reached us: dropped on the way


def _sequences(reply: str) -> tuple[int, int]:
    """(consumer sequence, stream sequence) of a JetStream delivery, from its reply
    subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`,
    or the newer form with domain and account hash before the stream (12 tokens)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[6]), int(tokens[5])
    if len(tokens) >= 12:
        return int(tokens[8]), int(tokens[7])
    meta = Msg.Metadata._from_reply(reply)  # any other form nats.py knows
    return int(meta.sequence.consumer), int(meta.sequence.stream)
