"""Streaming a conversation's log to one SSE viewer: catch-up, then live from the hub.

The viewer joins its conversation's hub (`api.hub`), writes what it missed
(from the log or the hub's ring), then goes live: from then on the hub writes
each event's frames, encoded once, straight to the viewer's socket without
waiting for it. The viewer's own coroutine only sends `: ping` comments while
idle and waits for its end.

The turn never depends on the viewer. A viewer that does not keep up ends its
own stream, and resumes from its last id:
- every write the viewer's coroutine awaits is bounded by `write_timeout_s`;
- a live write that finds more than `max_buffer_bytes` unsent, or a socket that
  has not drained for `write_timeout_s`, cuts the connection;
- a viewer still catching up while the hub queues more than `max_pending`
  events for it is cut too.

An edge that stops ends its streams (`Hubs.drain`): a viewer of the whole
conversation at once, a stream of one turn at that turn's end or when the
grace is over, each with a comment that says so (`STOPPING`) and a clean end.
A stream also ends, the same way (`EXPIRED`), when the token that opened it
is refused from then on: a viewer's access lasts as long as its token does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from asyncio import Transport
from collections.abc import Awaitable

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from api.context import CONFIG, HEADERS, HUBS, LOG, METRICS, TURNS, token_good_until
from api.errors import begin_stream
from api.hub import (
    Delivery,
    PendingCommand,
    RedisAway,
    Snapshot,
    Subscription,
    TurnFilter,
    read_range,
    turn_state,
)
from api.sse import EXPIRED, PING, STOPPING, Envelope, Position, frame
from events.errors import PositionGone
from events.turns import TurnRecord
from events.vocabulary import CommandRejected, ConversationDeleted

log = logging.getLogger(__name__)

__all__ = [
    "PendingCommand",
    "TurnFilter",
    "bound_send_buffer",
    "open_sse",
    "running_turn",
    "stream_log",
    "writes_wait",
]


async def open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not buffer a live stream
        }
    )
    bound_send_buffer(request)
    await begin_stream(request, response)
    if request.method != "HEAD":
        await _bounded(request, response.write(b"retry: 1000\n\n"))
    return response


# What a socket option raises once the viewer's connection is gone: OSError on
# asyncio's socket, ValueError ("negative file descriptor") on uvloop's, whose
# transport keeps a socket object whose descriptor is already closed.
_SOCKET_GONE = (OSError, ValueError)


def bound_send_buffer(request: web.Request) -> None:
    """Cap the kernel's send buffer of a stream's socket. Left alone it grows to
    megabytes per connection, which a viewer that stops reading fills first,
    unseen, before the edge notices it is not keeping up."""
    size = request.app[CONFIG].limits.socket_send_buffer_bytes
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if size > 0 and sock is not None:
        with contextlib.suppress(*_SOCKET_GONE):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def cut(transport: Transport) -> None:
    """Drop a connection that stopped reading: reset, not close, so the kernel frees
    what it still holds for it at once instead of trying to deliver it for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(*_SOCKET_GONE):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def writes_wait(transport: Transport | None, protocol: BaseProtocol) -> bool:
    """Whether a connection's client has not taken what was sent: a write would wait."""
    return transport is not None and not transport.is_closing() and protocol.writing_paused


async def _bounded(request: web.Request, write: Awaitable[None]) -> None:
    """Await one write, but never longer than the write timeout (TimeoutError)."""
    async with asyncio.timeout(request.app[CONFIG].limits.write_timeout_s):
        await write


# How long a reader of the running turn waits for a record the log says is coming
# (see `turn_state`): the worker writes it beside the append, so it is a Redis
# round trip away unless something failed.
RECORD_WAIT_S = 1.0


async def running_turn(app: web.Application, conversation_id: str) -> tuple[int, TurnRecord | None]:
    """The log's last position, and the turn running now if there is one."""
    return await turn_state(app[LOG], app[TURNS], conversation_id, RECORD_WAIT_S)


class SseViewer(Subscription):
    """A subscription that writes to one HTTP response."""

    __slots__ = (
        "_blocked_since",
        "_chunked",
        "_max_buffer",
        "_protocol",
        "_transport",
        "_write_timeout_s",
        "good_until",
    )

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        position: Position,
        *,
        turn: TurnFilter | None,
        command: PendingCommand | None,
    ) -> None:
        config = request.app[CONFIG]
        super().__init__(
            position, turn=turn, command=command, max_pending=config.limits.max_pending
        )
        self._transport: Transport | None = request.transport
        self._protocol = request.protocol
        # aiohttp frames the body in chunks for HTTP/1.1; live writes bypass it, so do the same
        self._chunked = response.headers.get("Transfer-Encoding", "") == "chunked"
        self._max_buffer = config.limits.max_buffer_bytes
        self._write_timeout_s = config.limits.write_timeout_s
        self._blocked_since: float | None = None
        # when the request's token is refused (wall clock): the stream ends then
        self.good_until = token_good_until(request)

    def admits(self, delivery: Delivery, idle_after: bool | None) -> bool:
        """Whether the delivery belongs to this stream (a POST stream: only its turn).

        A viewer of the whole conversation is not shown a request refused as busy
        or as a repeat of an earlier one (its sender is answered with that one), nor
        any refusal while it watches a turn or while other turns wait to run
        (`idle_after` false: a queued message whose branch an edit took away is
        refused between two turns): that request never became a turn, and its
        `error` and `done` would end, for the viewer's frontend, a conversation
        whose turns go on. Its sender had the refusal (a 409, or its own stream)."""
        event = delivery.stored.event
        if isinstance(event, ConversationDeleted):
            # the tombstone: after the stopped turn's `done`, the stream ends (no
            # `done` of its own: nothing ran), and a reconnect is answered 404
            self.end("deleted")
            return False
        if self.turn is not None:
            if (
                isinstance(event, CommandRejected)
                and event.code == "repeated"
                and event.repeats
                and event.command_id == self.turn.command_id
            ):
                # decided after the POST stopped waiting for it: its stream goes on with
                # the earlier request's turn (api.turn_routes), never shows the refusal
                self.turn.repeated = event
                self.end("repeated")
                return False
            return self.turn.admit(delivery.stored)
        if isinstance(event, CommandRejected):
            return (
                event.code not in ("busy", "repeated")
                and self.open_turn is None
                and bool(idle_after)
            )
        return True

    def take(self, delivery: Delivery) -> None:
        if not self.admits(delivery, delivery.idle_after):
            return
        data = delivery.wanted_by(self.position)
        if not data:
            return  # seen already: `after=N-0` of a one-piece end is all of it, as `N` is
        self.send(data)
        if delivery.ends_turn and (self.turn is not None or delivery.idle_after):
            self.end("done")

    def take_stall(self, error: Envelope) -> None:
        self.send(stall_frames(error))
        self.end("stalled")

    def send(self, data: bytes) -> None:
        """Write now, without waiting; cut a connection that does not drain."""
        transport = self._transport
        if self.ended.done():
            return
        if transport is None or transport.is_closing():
            self.cut("gone")  # a closing transport would wait for ever to flush to it
            return
        if self._stuck(transport):
            return
        if self._chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)

    def gone(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def finishes_at_stop(self) -> bool:
        return self.turn is not None  # a POST's stream: its turn's end is near

    def backed_up(self) -> bool:
        """Whether the client has not taken what was sent: a write now would wait."""
        return writes_wait(self._transport, self._protocol)

    def cut_at_stop(self) -> None:
        """Drop the connection of a stream the stopping edge ends while it is backed up."""
        log.info("slow viewer disconnected at stop", extra={"seen": self.seen, **self.named()})
        if self._transport is not None:
            cut(self._transport)

    def cut(self, reason: str) -> None:
        """End the stream and drop its connection (the transport taken when it opened:
        aiohttp may already have let go of it)."""
        if self._transport is not None:
            cut(self._transport)
        self.end(reason)

    def _stuck(self, transport: Transport) -> bool:
        buffered = transport.get_write_buffer_size()
        if buffered == 0:
            self._blocked_since = None
            return False
        now = time.monotonic()
        if self._blocked_since is None:
            self._blocked_since = now
        if buffered > self._max_buffer or now - self._blocked_since > self._write_timeout_s:
            log.info("slow viewer disconnected", extra={"buffered": buffered, "seen": self.seen})
            self.cut("slow")
            return True
        return False


def stall_frames(error: Envelope) -> bytes:
    return frame(None, error) + frame(None, Envelope("done", "error", error.message_id))


async def stream_log(
    request: web.Request,
    response: web.StreamResponse,
    conversation_id: str,
    position: Position,
    *,
    turn: TurnFilter | None = None,
    command: PendingCommand | None = None,
    fresh: bool = False,
) -> web.StreamResponse:
    """Write the conversation's events after `position` until the stream's end.

    `fresh`: `position` is the log's end as read a moment ago (a new POST
    stream's), so retention cannot have passed it. (Its hub is already there:
    the request's decision watcher started it at that position.)

    With `turn`, only that turn's events, ending at its `done`. Without, every
    event, ending after a `done` once the log is caught up and no turn is active
    (an EventSource then reconnects with Last-Event-ID and waits for the next).
    Either way the stream ends with a `done` even when the log cannot supply
    one (the hub's stall check).
    """
    if request.method == "HEAD":
        return response
    app = request.app
    if not fresh:
        try:
            await app[LOG].check_position(conversation_id, position.after())
        except PositionGone as gone:
            await _bounded(
                request,
                response.write(frame(None, Envelope("error", str(gone), code="position_gone"))),
            )
            position = Position(seq=gone.first_available - 1)
    viewer = SseViewer(request, response, position, turn=turn, command=command)
    with app[HUBS].writing(viewer):
        return await _stream_to(request, response, viewer, conversation_id)


async def _stream_to(
    request: web.Request, response: web.StreamResponse, viewer: SseViewer, conversation_id: str
) -> web.StreamResponse:
    """`stream_log` from the hub's join to the response's last byte."""
    app = request.app
    config = app[CONFIG]
    metrics = app[METRICS]
    expires = viewer.good_until
    hub, snapshot = await app[HUBS].join(conversation_id, viewer)
    metrics.sse_viewers(1)
    try:
        await _catch_up(request, response, viewer, conversation_id, snapshot)
        while not viewer.ended.done():
            left = expires - time.time()
            if left <= 0:
                viewer.end("expired")
                break
            done, _ = await asyncio.wait({viewer.ended}, timeout=min(config.ping_interval_s, left))
            if not done and time.time() < expires:
                viewer.send(PING)
    except (ConnectionResetError, TimeoutError):
        # the viewer went away or stopped reading; the turn goes on without it
        viewer.cut("gone")
    finally:
        hub.leave(viewer)
        metrics.sse_viewers(-1)
    reason = viewer.ended.result()
    if reason == "deleted":
        app[HEADERS].forget(conversation_id)  # whether or not the announcement came
    if reason == "stopping" and viewer.backed_up():
        viewer.cut_at_stop()  # its last word would hold the stop, unread
    elif reason in ("done", "stalled", "broken", "stopping", "expired", "deleted"):
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            last_word = {"stopping": STOPPING, "expired": EXPIRED}.get(reason)
            if last_word is not None:
                await _bounded(request, response.write(last_word))
            await _bounded(request, response.write_eof())
    return response


async def _catch_up(
    request: web.Request,
    response: web.StreamResponse,
    viewer: SseViewer,
    conversation_id: str,
    snapshot: Snapshot,
) -> None:
    """Write what the viewer missed, then switch it to the hub's live feed."""
    app = request.app

    async def write(delivery: Delivery, idle_after: bool | None) -> None:
        viewer.note(delivery)
        if viewer.turn is None and delivery.ends_turn and idle_after is None:
            # from the log or the ring: idle only if it is the last the hub had seen
            # and then by its own word, or, for an end that has none, if looking now
            # nothing followed and no turn runs (a viewer catching up over an end
            # that turns followed goes on through it in one stream)
            stated = delivery.stated_idle
            idle_after = delivery.seq >= snapshot.head and (
                stated
                if stated is not None
                else await _idle_after(app, conversation_id, delivery.seq)
            )
        if not viewer.admits(delivery, idle_after):
            return
        data = delivery.wanted_by(viewer.position)
        if data and time.time() >= viewer.good_until:
            viewer.end("expired")  # a long catch-up, read slowly, outlives a token too
        if not data or viewer.ended.done():
            # seen already (an end the viewer had does not end it again), or the stream
            # ended meanwhile (the edge is stopping, the token expired): what is left is
            # read on resuming
            return
        await _bounded(request, response.write(data))
        if not delivery.ends_turn or viewer.ended.done():
            return
        if viewer.turn is not None or idle_after:
            viewer.end("done")

    after = viewer.position.after()
    if after < snapshot.floor:
        async for stored in read_range(app[LOG], conversation_id, after, snapshot.floor):
            delivery = Delivery.of(stored)
            await write(delivery, _refusals_word(delivery))
            if viewer.ended.done():
                return
    for delivery in snapshot.ring:
        # what the hub found live of a turn's end is looked at again (a later turn
        # may follow it now); a refusal's own word (`CommandRejected.idle`) stands
        await write(delivery, _refusals_word(delivery))
        if viewer.ended.done():
            return
    pending = viewer.pending
    assert pending is not None
    while pending and not viewer.ended.done():
        item = pending.popleft()
        if isinstance(item, Envelope):
            await _bounded(request, response.write(stall_frames(item)))
            viewer.end("stalled")
            return
        # fed live by the hub, which looked at once whether the conversation went idle
        await write(item, item.idle_after)
    # No await between the queue running dry and going live: the hub writes from here on.
    viewer.live = True
    viewer.pending = None


def _refusals_word(delivery: Delivery) -> bool | None:
    """A refusal's own word on whether the conversation was idle; None for the rest."""
    return delivery.idle_after if isinstance(delivery.stored.event, CommandRejected) else None


async def _idle_after(app: web.Application, conversation_id: str, seq: int) -> bool:
    """After a turn's end: nothing more in the log and no other turn running.

    With Redis away, decided as the hub decides for its live feed: from the log alone."""
    try:
        last, active = await app[HUBS].turn_state(conversation_id)
    except RedisAway:
        last, active = await app[LOG].last_seq(conversation_id), None
    return last <= seq and active is None
