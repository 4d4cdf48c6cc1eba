"""One live subscription per conversation per edge process, fanned out in memory.

A `Hub` follows one conversation's subject of the log (the entries CHAT_EVT
republishes, `events.follow.LiveFollower`, with its gap and watchdog rules) and
hands every entry, decoded and encoded as SSE frames once, to each of its
`Subscription`s, synchronously and without awaiting any of them: a slow viewer
cannot slow the others or the hub. Viewers joining behind the hub catch up
first (from the hub's ring of recent deliveries, else from the log), then go
live; what the hub delivers meanwhile waits in their own bounded queue, so
every position is handed out exactly once and in order:

    registration (no await): snapshot (floor, head, ring); from now on the hub
        feeds the subscription everything after `head`, queued while it catches up
    catch-up: the log from the viewer's position up to `floor`, then the ring
        (floor, head], then the queue; then `live`: the hub's feed is written at once

The stall guard (a stream that could otherwise wait for ever) runs here, once
per hub rather than once per viewer: after `stall_check_s` of silence it reads
the conversation's end and running turn once, and tells each subscription that
can no longer end by itself (`Subscription.open_turn`, `waiting_command`).

A hub with no subscriptions lingers `linger_s` (a reconnecting viewer finds it
warm), then stops its consumer. If the log breaks under it (NATS gone), every
subscription ends without a `done`; viewers resume from their last id.

What may not enter: HTTP. Writing to a socket is the subscriber's business
(`api.streaming`); this module knows positions, deliveries and timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import nats.errors
import nats.js.errors
import redis.exceptions
from nats.js import JetStreamContext

from api.sse import Envelope, Position, envelopes, frame
from events.codec import Unreadable
from events.errors import EventLogError, describe
from events.follow import LiveFollower, RawEvent
from events.log import EventLog, StoredEvent
from events.subjects import CMD_STREAM, event_subject
from events.tracing import REQUEST_ID, unnamed_context
from events.turns import TurnRecord, TurnRegistry
from events.vocabulary import (
    AnswerRequested,
    Chunk,
    CommandRejected,
    ContentPart,
    Started,
    Title,
    ToolCall,
    ToolResult,
    TurnEnd,
    UserMessage,
)

log = logging.getLogger(__name__)

_BATCH = 256


class Delivery(msgspec.Struct, gc=False):
    """One log entry as every viewer receives it: decoded once, encoded once.

    Hubs keep their recent deliveries (the ring), tens of thousands of them in
    a busy edge; such long-lived objects made the collector's full passes
    stop `parley dev` for 70-135 ms under `bench capacity` (100 turns). A
    delivery holds only bytes, strings and the stored event, so it can be no
    part of a reference cycle, and is left out of the collector (`gc=False`).
    """

    stored: StoredEvent
    pieces: tuple[bytes, ...]
    wire: bytes
    ends_turn: bool
    started: str | None
    ended: str | None
    # For a turn end the hub delivers live: no other turn waits (a viewer without a
    # turn filter then ends). An end or a refusal says so itself, as its actor saw
    # it (`idle` of the event: every edge reads the same); for one written before
    # that was recorded, the hub looks: nothing followed it in the log, no turn ran.
    idle_after: bool | None = None
    # the event's own word on it (None: it has none, and the hub looked)
    stated_idle: bool | None = None
    # What the delivery holds, as a hub's ring counts it: its frames and the event
    # it was made from (about as large as the entry was in the log). The event is
    # most of it for what viewers are shown little or nothing of: a user message of
    # 100,000 characters has no frame, a long answer's `done` a short one.
    size: int = 0

    @classmethod
    def of(cls, stored: StoredEvent, entry_bytes: int = 0) -> Delivery:
        """`entry_bytes`: the length of the log entry `stored` was decoded from."""
        pieces = envelopes(stored)
        last = len(pieces) - 1
        # one frame per SSE event; ids as in api.sse.frames (N, or N-i before the last)
        frames = tuple(
            frame(str(stored.seq) if i == last else f"{stored.seq}-{i}", envelope)
            for i, envelope in enumerate(pieces)
        )
        event = stored.event
        stated = event.idle if isinstance(event, CommandRejected | TurnEnd) else None
        wire = b"".join(frames)
        return cls(
            stored=stored,
            pieces=frames,
            wire=wire,
            ends_turn=any(e.event == "done" for e in pieces),
            started=event.turn_id if isinstance(event, Started) else None,
            ended=event.turn_id if isinstance(event, TurnEnd) else None,
            idle_after=stated,
            stated_idle=stated,
            size=len(wire) + entry_bytes,
        )

    @property
    def seq(self) -> int:
        return self.stored.seq

    def wanted_by(self, position: Position) -> bytes:
        """The frames a viewer at `position` has not seen yet."""
        if self.stored.seq > position.seq:
            return self.wire
        if self.stored.seq < position.seq or position.piece is None:
            return b""
        return b"".join(self.pieces[position.piece + 1 :])


class TurnFilter:
    """Selects the events of the turn that answers one request (or its rejection).

    A turn names its request by `started.command_id`; logs written before that
    field existed are matched by the user message the turn answers.
    """

    __slots__ = ("command_id", "repeated", "turn_id", "user_message_id")

    def __init__(self, command_id: str, user_message_id: str | None = None) -> None:
        self.command_id = command_id
        self.user_message_id = user_message_id
        self.turn_id: str | None = None
        # the request's refusal as a repeat of an earlier one, where a stream that
        # follows the earlier request instead met it (api.streaming.SseViewer)
        self.repeated: CommandRejected | None = None

    def admit(self, stored: StoredEvent) -> bool:
        event = stored.event
        if isinstance(event, CommandRejected):
            return event.command_id == self.command_id
        if isinstance(event, Started) and self.turn_id is None and self._answers(event):
            self.turn_id = event.turn_id
        if isinstance(event, UserMessage):
            return False
        if isinstance(event, Title) and event.turn_id is None:
            # the user renamed the conversation while the turn runs: its client shows
            # titles from this stream (as the auto title), and no other stream is open
            return self.turn_id is not None
        return self.turn_id is not None and getattr(event, "turn_id", None) == self.turn_id

    def _answers(self, started: Started) -> bool:
        if started.command_id:
            return started.command_id == self.command_id
        return started.user_message_id == self.user_message_id


class PendingCommand(msgspec.Struct, frozen=True):
    """The command a POST stream waits on: its position in CHAT_CMD."""

    stream_seq: int


class Subscription:
    """One reader of a hub: where it is, what it waits for, and its queue while catching up.

    Two ways a stream could wait for ever, both answered by the hub's stall check
    (`stall`) rather than pings without end:
    - a turn it saw start is no longer running (no turn record for it) and it has
      read the whole log, yet no readable end came. The end may still come: a
      worker that lost its turn to another writer's entry ends it a moment later,
      and a dead worker's turn is ended by the partition's next owner once the
      lease lapses. So the stream waits `orphan_grace_s` for it (`unreadable_grace_s`
      when an unreadable entry followed the turn's start: its end may be that
      entry) before it ends with an error;
    - the command it waits for has left CHAT_CMD without a turn or a rejection
      in the log (lost).
    """

    __slots__ = (
        "command",
        "ended",
        "live",
        "max_pending",
        "open_turn",
        "open_turn_seq",
        "pending",
        "position",
        "request_id",
        "seen",
        "turn",
        "turn_gone_since",
        "unreadable_at",
    )

    def __init__(
        self,
        position: Position,
        *,
        turn: TurnFilter | None = None,
        command: PendingCommand | None = None,
        max_pending: int = 4096,
    ) -> None:
        self.position = position
        self.turn = turn
        self.command = command
        self.seen = position.after()
        self.open_turn: str | None = None
        self.open_turn_seq = 0  # where the open turn started
        self.unreadable_at = 0  # the last entry seen that could not be decoded
        # when the stall check first found the open turn not running (time.monotonic)
        self.turn_gone_since: float | None = None
        self.live = False
        self.pending: deque[Delivery | Envelope] | None = deque()
        self.max_pending = max_pending
        # the request this viewer serves, for the lines the hub logs about it: they
        # are logged from the hub's task, which serves every viewer
        self.request_id = REQUEST_ID.get()
        # set once, with why the subscription is over: "done", "stalled", "slow", "gone",
        # "broken", "stopping" (the edge is stopping: `Hubs.drain`) or "expired" (the
        # token of the stream's request: api.streaming)
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def waiting_command(self) -> PendingCommand | None:
        waiting = self.turn is not None and self.turn.turn_id is None
        return self.command if waiting else None

    def note(self, delivery: Delivery) -> None:
        self.seen = max(self.seen, delivery.seq)
        if delivery.started is not None:
            self.open_turn, self.open_turn_seq = delivery.started, delivery.seq
            self.turn_gone_since = None
        elif delivery.ended is not None and delivery.ended == self.open_turn:
            self.open_turn = None
        elif isinstance(delivery.stored.event, Unreadable):
            self.unreadable_at = delivery.seq

    def named(self) -> dict[str, str]:
        """A log line's field naming this viewer's request, if it has one."""
        return {"request_id": self.request_id} if self.request_id else {}

    def end(self, reason: str) -> None:
        """Set why the subscription is over, once. A stream the stopping edge ends while
        its client has not taken what was sent (its socket's buffer full, a write
        waiting) is cut (`cut_at_stop`), also one that ended already and still writes
        its last bytes (`Hubs.writing`): it would read no last word soon, and its write
        would hold the edge's stop for aiohttp's shutdown timeout, twice (10 s), before
        it was dropped anyway."""
        if reason == "stopping" and self.backed_up():
            self.cut_at_stop()
        if not self.ended.done():
            self.ended.set_result(reason)

    def cut_at_stop(self) -> None:
        """Drop the connection of a stream the stopping edge ends while it is backed up
        (a subscription that writes to a client has one)."""

    def gone(self) -> bool:
        """Whether whoever reads this subscription has left (a closed connection)."""
        return False

    def backed_up(self) -> bool:
        """Whether whoever reads this subscription has not taken what was sent (its
        socket's buffer full): a write to it now would wait."""
        return False

    # a client's request reads it (a stream, a request waiting for its decision), not
    # the edge itself (a turn slot's holder): what a stop's log counts
    for_a_client = True

    def finishes_at_stop(self) -> bool:
        """Whether an edge that is stopping lets this subscription run on to its own
        end, within a grace (`Hubs.drain`): a client's stream of one turn, which ends
        at that turn's end, seconds away, and the watcher holding that turn's slot
        (`api.limits.TurnWatcher`). Any other ends at once."""
        return False

    # -- called by the hub, synchronously

    def feed(self, delivery: Delivery) -> None:
        if self.ended.done():
            return
        if not self.live:
            self._queue(delivery)
            return
        self.note(delivery)
        self.take(delivery)

    def stall(self, error: Envelope) -> None:
        if self.ended.done():
            return
        if not self.live:
            self._queue(error)
            return
        self.take_stall(error)

    def _queue(self, item: Delivery | Envelope) -> None:
        assert self.pending is not None
        if len(self.pending) >= self.max_pending:
            log.info(
                "viewer fell too far behind; disconnected",
                extra={"seen": self.seen, **self.named()},
            )
            self.end("slow")
            return
        self.pending.append(item)

    # -- what a kind of subscription does with what it is fed (while live)

    def take(self, delivery: Delivery) -> None:
        raise NotImplementedError

    def take_stall(self, error: Envelope) -> None:
        raise NotImplementedError


class Snapshot(msgspec.Struct):
    """What a subscription must catch up on when it joins: the log up to `floor`, then `ring`."""

    floor: int
    head: int
    ring: list[Delivery]


def opens_turn(event: object) -> bool:
    """An entry after which a turn runs or is about to: a request accepted, a turn's
    start, its title, its output. (Not a title the user set, nor a refusal.)"""
    if isinstance(event, Title):
        return event.turn_id is not None
    return isinstance(
        event, UserMessage | AnswerRequested | Started | Chunk | ToolCall | ToolResult | ContentPart
    )


_RECORD_POLL_S = 0.01


async def turn_state(
    event_log: EventLog, turns: TurnRegistry, conversation_id: str, record_wait_s: float = 0.0
) -> tuple[int, TurnRecord | None]:
    """The log's last position, and the turn running now if there is one.

    The worker clears its turn record just after appending the turn's end, so a
    record whose turn already ended in the log does not count as running. The
    record is read first: read after the end, a turn that ended in between looked
    gone without its end in the log, and the stall check told its viewers that
    the end could not be read (seen at 1,000 turns at once).

    A worker writes a request's record beside the append that accepts it, not
    before (a Redis round trip less on every turn's way to its first token). A
    reader that needs the running turn (where it starts, which one to cancel)
    gives a record the log says is coming up to `record_wait_s` to arrive; with
    none by then (Redis lost the write, or the worker died), no turn is known.
    """
    active = await turns.get(conversation_id)
    last = await event_log.last(conversation_id)
    if active is None and record_wait_s > 0 and last is not None and opens_turn(last.event):
        active = await _record_on_its_way(turns, conversation_id, record_wait_s)
    end = last.seq if last is not None else 0
    if active is not None and (
        last is not None
        and isinstance(last.event, TurnEnd)
        and last.event.turn_id == active.turn_id
    ):
        active = None
    return end, active


async def _record_on_its_way(
    turns: TurnRegistry, conversation_id: str, wait_s: float
) -> TurnRecord | None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        await asyncio.sleep(_RECORD_POLL_S)
        record = await turns.get(conversation_id)
        if record is not None:
            return record
    return None


async def command_gone(js: JetStreamContext, command: PendingCommand) -> bool:
    try:
        await js.get_msg(CMD_STREAM, seq=command.stream_seq)
    except nats.js.errors.NotFoundError:
        return True
    return False


class RedisAway(Exception):
    """The turn records are unreachable: whether a turn runs is unknown."""


class HubSettings(msgspec.Struct, frozen=True):
    stall_check_s: float = 2.0
    # how long a turn that stopped running may take to get its end (Subscription)
    orphan_grace_s: float = 45.0
    unreadable_grace_s: float = 5.0
    linger_s: float = 5.0
    wake_s: float = 1.0  # how often a quiet hub looks at its subscribers and stop flag
    ring_events: int = 512
    ring_bytes: int = 256 * 1024


class Hub:
    """The live feed of one conversation, for every subscription of this process."""

    def __init__(self, hubs: Hubs, conversation_id: str, head: int | None = None) -> None:
        self._hubs = hubs
        self.conversation_id = conversation_id
        self._known_head = head
        self.subscriptions: set[Subscription] = set()
        self.head = 0
        self.floor = 0
        self._ring: deque[Delivery] = deque()
        self._ring_bytes = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._last_event = time.monotonic()
        self._last_check = 0.0
        self._last_gone_check = 0.0
        self._empty_since: float | None = time.monotonic()

    def join(self, subscription: Subscription) -> Snapshot:
        """Register (no await, so nothing is delivered between the snapshot and the feed)."""
        self.subscriptions.add(subscription)
        self._empty_since = None
        after = subscription.position.after()
        ring = [d for d in self._ring if d.seq > after] if after < self.head else []
        return Snapshot(floor=self.floor, head=self.head, ring=ring)

    def leave(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        if not self.subscriptions:
            self._empty_since = time.monotonic()

    async def run(self) -> None:
        hubs = self._hubs
        follower: LiveFollower | None = None
        try:
            start = self._known_head
            if start is None:
                start = await hubs.log.last_seq(self.conversation_id)
            self.head = self.floor = start
            self.ready.set_result(None)
            follower = LiveFollower(
                hubs.js._nc,
                hubs.log,
                self.conversation_id,
                start,
                on_arrival=self._deliver_on_arrival,
            )
            while not self._idle_long_enough():
                batch = await follower.next_batch(_BATCH, wait_s=hubs.settings.wake_s)
                if not batch:
                    await self._on_silence()
                    continue
                for raw in batch:
                    await self._deliver(raw)
                self._drop_gone()
        except (EventLogError, nats.errors.Error) as err:
            # The viewers' streams end; each resumes from its last id once the broker is back.
            log.warning(
                "conversation feed broken",
                extra={"conversation_id": self.conversation_id, "error": describe(err)},
            )
        except Exception:
            # A bug: the viewers' streams end and resume from their last ids on a new
            # feed; the process and every other conversation's feed go on.
            log.exception(
                "conversation feed failed", extra={"conversation_id": self.conversation_id}
            )
        finally:
            self.closed = True
            hubs.forget(self)
            if not self.ready.done():
                self.ready.set_exception(ConnectionError("the conversation feed did not start"))
            for subscription in list(self.subscriptions):
                subscription.end("broken")
            if follower is not None:
                await follower.close()

    def _idle_long_enough(self) -> bool:
        empty = self._empty_since
        return empty is not None and time.monotonic() - empty >= self._hubs.settings.linger_s

    def _deliver_on_arrival(self, raw: RawEvent) -> bool:
        """Hand out an entry from the connection's read loop, as it arrives (the follower
        calls this while the hub waits for news); False for one that `_deliver` must
        take, awaiting the conversation's state first (or failing, as a bug would)."""
        try:
            delivery = Delivery.of(StoredEvent.decode(raw.seq, raw.data), len(raw.data))
        except Exception:
            return False  # _deliver meets it again, and the feed fails as bugs do
        if self._asks_whether_idle(delivery):
            return False
        self._hand_out(delivery)
        return True

    def _asks_whether_idle(self, delivery: Delivery) -> bool:
        # Only a viewer without a turn filter asks whether the conversation went
        # idle; a POST stream ends on its own turn's end (no Redis, no log read).
        return (
            delivery.ends_turn
            and delivery.idle_after is None
            and any(s.turn is None for s in self.subscriptions)
        )

    async def _deliver(self, raw: RawEvent) -> None:
        delivery = Delivery.of(StoredEvent.decode(raw.seq, raw.data), len(raw.data))
        if self._asks_whether_idle(delivery):
            try:
                end, active = await self._hubs.turn_state(self.conversation_id)
            except RedisAway:
                end, active = await self._hubs.log.last_seq(self.conversation_id), None
            delivery.idle_after = end <= delivery.seq and active is None
        self._hand_out(delivery)

    def _hand_out(self, delivery: Delivery) -> None:
        self.head = delivery.seq
        self._last_event = time.monotonic()
        self._remember(delivery)
        for subscription in list(self.subscriptions):
            try:
                subscription.feed(delivery)
            except Exception:
                self._viewer_failed(subscription)
        self._hubs.delivered(len(self.subscriptions))

    def _viewer_failed(self, subscription: Subscription) -> None:
        """One viewer's failure ends that viewer's stream (it resumes from its last id),
        never the conversation's feed that every other viewer reads."""
        log.exception(
            "a viewer's stream failed; it ends, the others go on",
            extra={"conversation_id": self.conversation_id, **subscription.named()},
        )
        subscription.end("broken")

    def _stall(self, subscription: Subscription, error: Envelope) -> None:
        try:
            subscription.stall(error)
        except Exception:
            self._viewer_failed(subscription)

    def _remember(self, delivery: Delivery) -> None:
        settings = self._hubs.settings
        self._ring.append(delivery)
        self._ring_bytes += delivery.size
        while self._ring and (
            len(self._ring) > settings.ring_events or self._ring_bytes > settings.ring_bytes
        ):
            gone = self._ring.popleft()
            self._ring_bytes -= gone.size
            self.floor = gone.seq

    def _drop_gone(self) -> None:
        """End the viewers that closed their connection while nothing was written to
        them, once per `stall_check_s`, noticed here rather than at their next ping
        (15 s): their stream slots are free again. Also while the conversation is busy:
        a stream of a queued turn is written nothing while the turns before it stream
        (it was noticed only in silence, and held its slot until its ping)."""
        now = time.monotonic()
        if now - self._last_gone_check < self._hubs.settings.stall_check_s:
            return
        self._last_gone_check = now
        for subscription in [s for s in self.subscriptions if s.gone()]:
            subscription.end("gone")

    async def _on_silence(self) -> None:
        """The stall check: once per hub per `stall_check_s` of silence."""
        self._drop_gone()  # entries handed out as they arrive leave no batch behind
        now = time.monotonic()
        interval = self._hubs.settings.stall_check_s
        if now - self._last_event < interval or now - self._last_check < interval:
            return
        self._last_check = now
        waiting = [
            s
            for s in self.subscriptions
            if s.open_turn is not None or s.waiting_command() is not None
        ]
        if not waiting:
            return
        try:
            end, active = await self._hubs.turn_state(self.conversation_id)
        except RedisAway:
            return  # whether a turn runs is not known now: never end a stream on a guess
        settings = self._hubs.settings
        for subscription in waiting:
            if subscription.seen < end:
                continue  # still catching up
            turn = subscription.open_turn
            # A record without a turn id announces a turn about to start: the worker
            # that started this viewer's turn may not have named it there yet.
            if turn is not None and (active is None or active.turn_id not in ("", turn)):
                if subscription.turn_gone_since is None:
                    subscription.turn_gone_since = now
                unreadable = subscription.unreadable_at > subscription.open_turn_seq
                grace = settings.unreadable_grace_s if unreadable else settings.orphan_grace_s
                if now - subscription.turn_gone_since < grace:
                    continue  # its end may still come: wait, pinging
                why = "its end cannot be read" if unreadable else "no end for it came"
                self._stall(
                    subscription,
                    Envelope(
                        "error",
                        f"turn {turn} is no longer running and {why}; see the conversation's log",
                        turn,
                        code="turn_end_unreadable" if unreadable else "turn_end_missing",
                    ),
                )
                continue
            if turn is not None:
                subscription.turn_gone_since = None  # running (again): the wait starts over
            command = subscription.waiting_command()
            if command is not None and await command_gone(self._hubs.js, command):
                # Gone from CHAT_CMD, and nothing in the log: look once more, the
                # worker may have appended just after our check of the end.
                end, _ = await self._hubs.turn_state(self.conversation_id)
                if subscription.seen >= end:
                    self._stall(
                        subscription,
                        Envelope(
                            "error",
                            "the message was lost before a turn started; send it again",
                            code="command_lost",
                        ),
                    )


class Hubs:
    """The hubs of this process, by conversation; owns their tasks."""

    def __init__(
        self,
        js: JetStreamContext,
        event_log: EventLog,
        turns: TurnRegistry,
        settings: HubSettings | None = None,
        on_delivered: Callable[[int], None] | None = None,
    ) -> None:
        self.js = js
        self.log = event_log
        self.turns = turns
        self.settings = settings or HubSettings()
        self._hubs: dict[str, Hub] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_delivered = on_delivered
        self._draining = False
        self._drained = False  # the drain is over: whatever joins now ends at once
        # the subscriptions of streams whose response is still being written (`writing`)
        self._writing: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._hubs)

    async def turn_state(self, conversation_id: str) -> tuple[int, TurnRecord | None]:
        """As `turn_state`; with Redis away, no turn is known to run (`RedisAway` for
        the stall check, which must not end a stream on what it cannot see)."""
        try:
            return await turn_state(self.log, self.turns, conversation_id)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            raise RedisAway from err

    def delivered(self, viewers: int) -> None:
        if self._on_delivered is not None:
            self._on_delivered(viewers)

    async def join(
        self, conversation_id: str, subscription: Subscription, head: int | None = None
    ) -> tuple[Hub, Snapshot]:
        """Subscribe to the conversation's live feed, starting its hub if need be.

        `head`: a position of the log's end read a moment ago (a new request's),
        where a new hub may start instead of reading the end once more; events
        after it that were already there reach the hub's viewers as live ones."""
        while True:
            hub = self._hubs.get(conversation_id)
            if hub is None or hub.closed:
                hub = Hub(self, conversation_id, head)
                self._hubs[conversation_id] = hub
                # The hub outlives the request that starts it and serves every
                # viewer: its own lines name no request (those about one viewer
                # name that viewer's, `Subscription.named`).
                task = asyncio.create_task(
                    hub.run(), name=f"hub-{conversation_id}", context=unnamed_context()
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.shield(hub.ready)
            if not hub.closed:  # it may have stopped while we waited for it
                snapshot = hub.join(subscription)
                if self._drained or (self._draining and not subscription.finishes_at_stop()):
                    subscription.end("stopping")
                return hub, snapshot

    def following(self, conversation_id: str) -> int | None:
        """The last position the conversation's hub handed out, if this process follows
        the conversation now (None: it does not). Every later entry reaches the hub,
        so a new request may start its stream there instead of reading the log's end:
        what lies between is older than the request, and its turn filter passes over it."""
        hub = self._hubs.get(conversation_id)
        if hub is None or hub.closed or not hub.ready.done():
            return None
        return hub.head

    @contextlib.contextmanager
    def writing(self, subscription: Subscription) -> Iterator[None]:
        """While a stream's response is written, to its last byte: after its
        subscription ended and left its hub, a client that stopped reading can
        still hold its last writes, which a drain must not leave to wait (`drain`)."""
        self._writing.add(subscription)
        try:
            yield
        finally:
            self._writing.discard(subscription)

    def forget(self, hub: Hub) -> None:
        if self._hubs.get(hub.conversation_id) is hub:
            del self._hubs[hub.conversation_id]

    async def drain(self, grace_s: float) -> None:
        """End every subscription, as an edge that stops must, without cutting answers
        short where it can wait: the streams of one turn (`finishes_at_stop`) are
        given `grace_s` to reach their turn's end, and so are the watchers that hold
        turns' slots; the rest (a viewer of the whole conversation, waiting for turns
        to come; a request's decision watcher) end at once,
        "stopping", and so do those still open when the grace is over. An EventSource
        reconnects by itself with the last id it saw; a client of a turn's stream
        resumes it the same way (api/streaming.py, api/ai_sdk.py say so in the stream).

        Joins after the drain began are ended as they join (a request that was under
        way when the edge stopped listening), but for a turn's stream while the drain
        still waits; once it is over, every one is: nothing else would end it, and
        aiohttp would hold the stop for its shutdown timeout, twice, then drop it."""
        self._draining = True
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + grace_s
        ended_at_once = streams_waited = slots_waited = 0
        while True:
            ended, finishing = self._end_all_but_turn_streams()
            ended_at_once += ended
            streams = sum(subscription.for_a_client for subscription in finishing)
            slots = len(finishing) - streams  # the edge's own: turn slots' holders
            if finishing and not (streams_waited or slots_waited):  # its first look
                log.info(
                    "edge stopping: %d stream(s) ended at once; %d stream(s) and %d turn "
                    "slot(s) of running turns wait for their turn's end, for up to %.1f s",
                    ended_at_once,
                    streams,
                    slots,
                    grace_s,
                )
            streams_waited = max(streams_waited, streams)
            slots_waited = max(slots_waited, slots)
            left = deadline - loop.time()
            if not finishing or left <= 0:
                break
            # every one ends by itself at its turn's end (a new one may have joined
            # meanwhile: looked for again)
            await asyncio.wait([subscription.ended for subscription in finishing], timeout=left)
        self._drained = True
        cut = lapsing = 0
        for hub in list(self._hubs.values()):
            for subscription in list(hub.subscriptions):
                if not subscription.ended.done():
                    if subscription.for_a_client:
                        cut += 1
                    else:
                        lapsing += 1
                subscription.end("stopping")
        log.info(
            "edge stopped its streams in %.1f s: %d ended at once; %d stream(s) and %d turn "
            "slot(s) waited for; %d stream(s) cut and %d slot(s) left to lapse when the "
            "grace ran out",
            loop.time() - began,
            ended_at_once,
            streams_waited,
            slots_waited,
            cut,
            lapsing,
        )
        # and a stream that ended but still writes its last bytes to a client that
        # stopped reading is cut (its `end`), not waited for
        for subscription in list(self._writing):
            subscription.end("stopping")

    def _end_all_but_turn_streams(self) -> tuple[int, list[Subscription]]:
        """End at once what a stop need not wait for: how many of a client's that
        ended, and what it waits for."""
        ended = 0
        finishing: list[Subscription] = []
        for hub in list(self._hubs.values()):
            for subscription in list(hub.subscriptions):
                if subscription.ended.done():
                    continue
                if subscription.finishes_at_stop():
                    finishing.append(subscription)
                else:
                    subscription.end("stopping")
                    ended += subscription.for_a_client
        return ended, finishing

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def read_range(
    event_log: EventLog, conversation_id: str, after: int, until: int
) -> AsyncIterator[StoredEvent]:
    """The conversation's entries in (after, until], in order, one at a time.

    Always ends: entries that retention removed meanwhile are not waited for.
    """
    subject = event_subject(conversation_id)
    while after < until:
        batch, pending = await event_log.read_events(subject, after)
        for raw in batch:
            if raw.seq > until:
                return
            yield StoredEvent.decode(raw.seq, raw.data)
        if not batch or pending == 0:
            return
        after = batch[-1].seq


async def watch(
    hubs: Hubs, conversation_id: str, subscription: Subscription, head: int | None = None
) -> str:
    """Feed a subscription that writes nowhere (a watcher) from its position to its end:
    the log up to the hub's floor, the hub's ring, what queued meanwhile, then live.
    Returns why it ended. `head` as for `Hubs.join`."""
    hub, snapshot = await hubs.join(conversation_id, subscription, head)
    try:
        after = subscription.position.after()
        if after < snapshot.floor:
            async for stored in read_range(hubs.log, conversation_id, after, snapshot.floor):
                delivery = Delivery.of(stored)
                subscription.note(delivery)
                subscription.take(delivery)
                if subscription.ended.done():
                    return subscription.ended.result()
        for delivery in snapshot.ring:
            subscription.note(delivery)
            subscription.take(delivery)
        pending = subscription.pending
        while pending and not subscription.ended.done():
            item = pending.popleft()
            if isinstance(item, Envelope):
                subscription.take_stall(item)
            else:
                subscription.note(item)
                subscription.take(item)
        subscription.live = True
        subscription.pending = None
        return await subscription.ended
    finally:
        hub.leave(subscription)
