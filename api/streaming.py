"""Streaming a conversation's log to one SSE viewer: catch-up, then live.

The log is followed by a pump task into a bounded queue; the response loop
takes from it, writes frames and sends `: ping` comments while idle. The turn
never depends on the viewer: a slow or gone viewer only ends its own stream
(a viewer that stops taking events for `slow_viewer_timeout_s` is cut off and
resumes from its last id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web

from api.context import CONFIG, JS, LOG, TURNS
from api.sse import PING, Envelope, Position, envelopes, frame, frames
from events.errors import EventLogError, PositionGone
from events.log import StoredEvent
from events.subjects import CMD_STREAM
from events.turns import TurnRecord
from events.vocabulary import CommandRejected, Started, TurnEnd, UserMessage

log = logging.getLogger(__name__)

_QUEUE = 1024
_POLL_S = 1.0
_STOP_WAIT_S = 2.0


class TurnFilter:
    """Selects the events of the turn that answers one user message (or its rejection)."""

    def __init__(self, user_message_id: str) -> None:
        self.user_message_id = user_message_id
        self.turn_id: str | None = None

    def admit(self, stored: StoredEvent) -> bool:
        event = stored.event
        if isinstance(event, CommandRejected):
            return event.message_id == self.user_message_id
        if isinstance(event, Started) and event.user_message_id == self.user_message_id:
            self.turn_id = event.turn_id
        if isinstance(event, UserMessage):
            return False
        return self.turn_id is not None and getattr(event, "turn_id", None) == self.turn_id


class PendingCommand(msgspec.Struct, frozen=True):
    """The command a POST stream waits on: its position in CHAT_CMD."""

    stream_seq: int


class _Progress:
    """What one stream has seen, to tell a stream that will still end from one that cannot.

    Two ways a stream could wait for ever, both answered with `error` and
    `done: "error"` rather than pings without end:
    - a turn it saw start is no longer running (no turn record for it) and the
      stream has read the whole log, yet no readable end came (the end could not
      be decoded, or its worker died and the turn is not closed yet);
    - the command it waits for has left CHAT_CMD without a turn or a rejection
      in the log (lost).
    """

    def __init__(self, turn: TurnFilter | None, command: PendingCommand | None) -> None:
        self.turn = turn
        self.command = command
        self.seen = 0
        self.open_turn: str | None = None

    def note(self, stored: StoredEvent) -> None:
        self.seen = max(self.seen, stored.seq)
        event = stored.event
        if isinstance(event, Started):
            self.open_turn = event.turn_id
        elif isinstance(event, TurnEnd) and event.turn_id == self.open_turn:
            self.open_turn = None

    async def stalled(self, app: web.Application, conversation_id: str) -> Envelope | None:
        """The error that ends this stream, if it can no longer end by itself."""
        end, active = await running_turn(app, conversation_id)
        if self.seen < end:
            return None  # still catching up
        if self.open_turn is not None and (active is None or active.turn_id != self.open_turn):
            return Envelope(
                "error",
                f"turn {self.open_turn} is no longer running and its end cannot be read; "
                "see the conversation's log",
                self.open_turn,
                code="turn_end_unreadable",
            )
        waiting = self.turn is not None and self.turn.turn_id is None
        if waiting and self.command is not None and await _command_gone(app, self.command):
            # Gone from CHAT_CMD, and nothing in the log: look once more, the
            # worker may have appended just after our check of the end.
            end, _ = await running_turn(app, conversation_id)
            if self.seen >= end:
                return Envelope(
                    "error",
                    "the message was lost before a turn started; send it again",
                    code="command_lost",
                )
        return None


async def _command_gone(app: web.Application, command: PendingCommand) -> bool:
    try:
        await app[JS].get_msg(CMD_STREAM, seq=command.stream_seq)
    except nats.js.errors.NotFoundError:
        return True
    return False


async def open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not buffer a live stream
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    return response


async def stream_log(
    request: web.Request,
    response: web.StreamResponse,
    conversation_id: str,
    position: Position,
    *,
    turn: TurnFilter | None = None,
    command: PendingCommand | None = None,
) -> web.StreamResponse:
    """Write the conversation's events after `position` until the stream's end.

    With `turn`, only that turn's events, ending at its `done`. Without, every
    event, ending after a `done` once the log is caught up and no turn is active
    (an EventSource then reconnects with Last-Event-ID and waits for the next).
    Either way the stream ends with a `done` even when the log cannot supply
    one (see `_Progress`).
    """
    app = request.app
    config = app[CONFIG]
    event_log = app[LOG]
    try:
        await event_log.check_position(conversation_id, position.after())
    except PositionGone as gone:
        await response.write(frame(None, Envelope("error", str(gone), code="position_gone")))
        position = Position(seq=gone.first_available - 1)

    queue: asyncio.Queue[StoredEvent] = asyncio.Queue(maxsize=_QUEUE)
    stop = asyncio.Event()
    pump = asyncio.create_task(
        _pump(
            event_log.follow(conversation_id, position.after(), stop=stop),
            queue,
            stop,
            config.slow_viewer_timeout_s,
        )
    )
    progress = _Progress(turn, command)
    progress.seen = position.after()
    last_write = last_event = time.monotonic()
    try:
        while True:
            if pump.done() and queue.empty():
                break
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands as its inner future completes.
                async with asyncio.timeout(_POLL_S):
                    stored = await queue.get()
            except TimeoutError:
                now = time.monotonic()
                if now - last_event >= config.stall_check_s:
                    last_event = now
                    error = await progress.stalled(app, conversation_id)
                    if error is not None:
                        await response.write(frame(None, error))
                        await response.write(
                            frame(None, Envelope("done", "error", error.message_id))
                        )
                        break
                if now - last_write >= config.ping_interval_s:
                    await response.write(PING)
                    last_write = now
                continue
            last_event = time.monotonic()
            progress.note(stored)
            if turn is not None and not turn.admit(stored):
                continue
            out = frames(stored, position)
            if not out:
                continue
            for data in out:
                await response.write(data)
            last_write = time.monotonic()
            if not _ends_turn(stored):
                continue
            if turn is not None:
                break
            if await _idle_after(request, conversation_id, stored):
                break
    except ConnectionResetError:
        return response  # the viewer went away; the turn goes on without it
    finally:
        await _stop_pump(pump, stop)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


def _ends_turn(stored: StoredEvent) -> bool:
    return any(e.event == "done" for e in envelopes(stored))


async def running_turn(app: web.Application, conversation_id: str) -> tuple[int, TurnRecord | None]:
    """The log's last position, and the turn running now if there is one.

    The worker clears its turn record just after appending the turn's end, so a
    record whose turn already ended in the log does not count as running.
    """
    last = await app[LOG].last(conversation_id)
    end = last.seq if last is not None else 0
    active = await app[TURNS].get(conversation_id)
    if active is not None and _ends(last, active.turn_id):
        active = None
    return end, active


def _ends(stored: StoredEvent | None, turn_id: str) -> bool:
    return (
        stored is not None and isinstance(stored.event, TurnEnd) and stored.event.turn_id == turn_id
    )


async def _idle_after(request: web.Request, conversation_id: str, end: StoredEvent) -> bool:
    """After a turn's end: nothing more in the log and no other turn running."""
    last, active = await running_turn(request.app, conversation_id)
    return last <= end.seq and active is None


async def _pump(
    source: AsyncIterator[StoredEvent],
    queue: asyncio.Queue[StoredEvent],
    stop: asyncio.Event,
    slow_timeout: float,
) -> None:
    try:
        async for stored in source:
            if stop.is_set():
                return
            try:
                async with asyncio.timeout(slow_timeout):
                    await queue.put(stored)
            except TimeoutError:
                log.info("slow viewer disconnected", extra={"seq": stored.seq})
                return
    except (EventLogError, nats.errors.Error) as err:
        # The viewer's stream ends; it resumes from its last id once the broker is back.
        log.warning("event stream broken", extra={"error": str(err)})


async def _stop_pump(pump: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Stop the pump and wait for it, but never forever.

    The flag covers a cancellation lost inside a library call (nats.py waits with
    asyncio.wait_for, which on 3.11 can swallow one): the pump then ends at its
    next event or silence instead of following the log for ever.
    """
    stop.set()
    pump.cancel()
    done, _ = await asyncio.wait({pump}, timeout=_STOP_WAIT_S)
    if not done:
        log.warning("event pump did not stop in time; it ends at its next wake-up")
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("event pump failed", extra={"error": repr(task.exception())})
