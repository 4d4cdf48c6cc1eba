"""The event writer: the one place a conversation's events are appended.

`EventWriter` holds the conversation's folded state and its position in the
log. Every append goes through it, one at a time (a lock), so a message
accepted while a turn streams lands between two chunks, never inside an
append, and the state after each append is the fold of the log. Decisions that
must see the latest state run under the same lock (`append_decided`).

Each event of an append is its own JetStream message, checked against the one
before it, and they leave together: one round trip per append (events.log).

`TurnStream` batches a turn's events with one append in flight (adaptive
batching): text that arrives meanwhile shares the next `chunk`. Text also waits
for the worker's next `AppendTick` (a few milliseconds), so the appends of all
the worker's streams leave in one loop iteration and one write to NATS.

What may not enter: decisions (actors.decide) and the turn's logic (actors.turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from actors.chunks import Pending, coalesce
from actors.sizing import fit
from actors.snapshots import Folded, SnapshotStore
from actors.state import Conversation, evolve, fold
from events.codec import Unreadable, decode_entry
from events.errors import EventLogConflict, EventLogError
from events.log import EventLog, StoredEvent
from events.subjects import event_subject
from events.vocabulary import ChunkKind, ConversationCreated, ConversationDeleted, Event

log = logging.getLogger(__name__)


class WriteGate(Protocol):
    """Whether this worker may append to a conversation now (actors.partitions: its
    partition leases). A worker that was paused longer than they live (a stopped
    process, a frozen VM) may have lost conversations to another worker meanwhile:
    it appends nothing until a renewal says which it still holds."""

    def holds(self, conversation_id: str) -> bool:
        """The conversation is this worker's, and its lease was renewed recently enough
        that nobody can have taken it."""
        ...

    async def renewed(self, conversation_id: str) -> bool:
        """`holds`, once a renewal has made the leases current again."""
        ...


class _AlwaysCurrent:
    """For a writer outside a worker (tests, the benchmarks' direct path)."""

    def holds(self, conversation_id: str) -> bool:
        return True

    async def renewed(self, conversation_id: str) -> bool:
        return True


ALWAYS_CURRENT: WriteGate = _AlwaysCurrent()


class LeaseLost(EventLogError):
    """The conversation's partition went to another worker while this one was away:
    nothing more is appended here (the worker is stopping its actor)."""


class EventWriter:
    def __init__(
        self,
        conversation_id: str,
        event_log: EventLog,
        *,
        max_event_bytes: int,
        new_id: Callable[[], str],
        folded: Folded | None = None,
        gate: WriteGate = ALWAYS_CURRENT,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self._gate = gate
        self._log = event_log
        self._max_event_bytes = max_event_bytes
        self._new_id = new_id
        self._snapshots = snapshots
        self.state: Conversation
        self.seq: int
        self.entries: int
        self._saved: int
        self._event_id: str
        # where the conversation's tombstone is in the log (0: none folded): its
        # erasure takes what is before it, and leaves it and what follows it
        self.tombstone_seq: int
        self._restore(folded or Folded(Conversation(conversation_id=conversation_id)))
        # The log refused our last append (another writer): `state` was forgotten
        # and is empty until `catch_up` reads the log again. Nothing may be decided
        # on it meanwhile.
        self.stale = False
        # the turn that was running when another writer's entry refused an append
        self.stopped_turn: str | None = None
        self._lock = asyncio.Lock()

    async def catch_up(self) -> None:
        """Fold every entry appended since our position (ours or another writer's).

        Entries this version cannot read are folded too (`evolve` skips a newer
        version's event and marks the conversation broken for a damaged one).
        """
        async with self._lock:
            await self._catch_up()

    async def _catch_up(self) -> None:
        if self.seq == 0 and self._snapshots is not None:
            # From the start: a log longer than one read may have a snapshot to begin at.
            raw, more = await self._log.read_events(event_subject(self.conversation_id), 0)
            # Only a log that still begins where the conversation began: one whose start
            # retention removed is refused as unreadable (README: Retention), whether or
            # not a snapshot of it happens to be in Redis.
            whole = bool(raw) and isinstance(decode_entry(raw[0].data), ConversationCreated)
            snapshot = (
                await self._snapshots.load(self.conversation_id, self._log)
                if more and whole
                else None
            )
            if snapshot is not None and snapshot.seq > raw[-1].seq:
                self._restore(snapshot)
            else:
                self._fold_stored([StoredEvent.decode(entry.seq, entry.data) for entry in raw])
                if not more:  # that was all of it
                    self.stale = False
                    return
        self._fold_stored(await self._log.read(self.conversation_id, after=self.seq))
        self.stale = False

    def _fold_stored(self, entries: Sequence[StoredEvent]) -> None:
        for stored in entries:
            if isinstance(stored.event, Unreadable):
                log.warning(
                    "unreadable event in the log",
                    extra={
                        "conversation_id": self.conversation_id,
                        "seq": stored.seq,
                        "type": stored.event.type,
                        "error": stored.event.error,
                    },
                )
            self.state = evolve(self.state, stored.event)
            self.seq = stored.seq
            self.entries += 1
            if isinstance(stored.event, ConversationDeleted):
                self.tombstone_seq = stored.seq
            self._event_id = "" if isinstance(stored.event, Unreadable) else stored.event.event_id

    def _restore(self, folded: Folded) -> None:
        self.state = folded.state
        self.seq = folded.seq
        # for snapshots (actors.snapshots): entries folded so far, as many at the last
        # snapshot, the event id of the entry at `seq`
        self.entries = folded.entries
        self._saved = folded.saved
        self._event_id = folded.event_id
        self.tombstone_seq = 0  # a kept state (a snapshot, an idle one) is never deleted

    def folded(self) -> Folded:
        """The conversation as folded now, and its position."""
        return Folded(self.state, self.seq, self.entries, self._saved, self._event_id)

    async def append(self, events: Sequence[Event]) -> None:
        async with self._lock:
            await self._append(events)

    async def quiet(self) -> None:
        """Wait until no append is being decided or awaited: whatever was decided before
        is folded in."""
        async with self._lock:
            pass

    async def append_decided(
        self,
        decide: Callable[[Conversation], Sequence[Event]],
        *,
        before: Callable[[Conversation], Awaitable[None]] | None = None,
    ) -> Sequence[Event]:
        """Decide on the latest state and append what was decided, with no append between.

        `before` is awaited first, on that same state, inside the same turn of the
        lock (what must be done before an append and see everything appended
        before it).

        Raises EventLogConflict, deciding nothing, while the view is stale: an
        append refused a moment ago (while this call waited for the lock, say)
        left an empty state, and a decision on it would take a live
        conversation for one that does not exist."""
        async with self._lock:
            if self.stale:
                raise EventLogConflict(self.conversation_id, self.seq, "read the log again first")
            if before is not None:
                await before(self.state)
            events = decide(self.state)
            if events:
                await self._append(events)
            return events

    async def _append(self, events: Sequence[Event]) -> None:
        if self.stale:
            # another writer's refusal left the view empty: nothing goes on a view the
            # log lacks
            raise EventLogConflict(self.conversation_id, self.seq, "read the log again first")
        cid = self.conversation_id
        if not self._gate.holds(cid) and not await self._gate.renewed(cid):
            raise LeaseLost(f"conversation {cid}: its partition lease was lost")
        fitted = self._fit(events)
        try:
            self.seq = await self._log.append(self.conversation_id, fitted, self.seq)
        except EventLogConflict:
            # Our view is stale (another writer appended): forget it; whoever
            # continues reloads from the log.
            self._forget()
            raise
        self.state = fold(self.state, fitted)
        for back, event in enumerate(reversed(fitted)):
            if isinstance(event, ConversationDeleted):  # appended together: seqs in a row
                self.tombstone_seq = self.seq - back
        self.entries += len(fitted)
        self._event_id = fitted[-1].event_id if fitted else self._event_id

    def _fit(self, events: Sequence[Event]) -> list[Event]:
        # No event may be larger than a JetStream message: split or cut the rare
        # one that would be (actors.sizing), or its append fails and the turn hangs.
        return fit(list(events), self._max_event_bytes, self._new_id)

    def _forget(self) -> None:
        if self.state.active is not None:
            self.stopped_turn = self.state.active.turn_id
        self._restore(Folded(Conversation(conversation_id=self.conversation_id)))
        self.stale = True


# The append window adapts to how busy the worker's process is: its CPU time over
# wall time, sampled about once a second. Below LIGHT_BELOW of a core there is CPU
# to spare and streamed text waits only the light window (lower per-token latency,
# more writes); above HEAVY_ABOVE it waits the full window again (fewer, fuller
# writes: the capacity a saturated machine needs). Between the two the window stays
# as it is, so the choice does not flap as its own cost moves the figure.
LIGHT_BELOW = 0.4
HEAVY_ABOVE = 0.6
SAMPLE_S = 1.0


def choose_window(current_s: float, busy: float, *, light_s: float, full_s: float) -> float:
    """The next append window, given the process's share of a core since the last sample."""
    if busy < LIGHT_BELOW:
        return light_s
    if busy > HEAVY_ABOVE:
        return full_s
    return current_s


class AppendTick:
    """Wakes every turn stream with new text at most once per window, all at once.

    One JetStream append per token per stream does not scale: at 1,000 streams
    of 20 tokens/s, py-spy showed the worker spending a fifth of its time in the
    NATS client's socket writes, one per append. Streams that have text wait
    for the next tick, then all append in the same loop iteration, which the
    client sends in one write; a stream whose tokens come faster than the
    window also sends them as one chunk.

    The tick leads: text after a quiet window goes out in the next loop
    iteration, and only text within the window of the last tick waits for the
    next one. A lone stream (a viewer-heavy conversation at 50 tokens/s) thus
    pays nothing, and a busy worker still ticks at most once per window.

    The window is `window_s` (PARLEY_APPEND_WINDOW_MS) while the process is busy
    and `light_window_s` (PARLEY_APPEND_WINDOW_LIGHT_MS) while it has CPU to
    spare (`choose_window`). It is the latency this adds at most (README:
    Configuration). `window_s` 0: every stream appends as soon as it has text.
    """

    def __init__(
        self,
        window_s: float,
        light_window_s: float | None = None,
        *,
        cpu_time: Callable[[], float] = time.process_time,
        wall_time: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full_window_s = window_s
        self.light_window_s = window_s if light_window_s is None else min(light_window_s, window_s)
        self.window_s = window_s
        self._cpu_time = cpu_time
        self._wall_time = wall_time
        self._waiting: list[asyncio.Event] = []
        self._scheduled = False
        self._last_tick = float("-inf")
        self._sampled_at: float | None = None
        self._cpu_at = 0.0

    def wake(self, event: asyncio.Event) -> None:
        if self.window_s <= 0:
            event.set()
            return
        self._waiting.append(event)
        if self._scheduled:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        due = self._last_tick + self.window_s
        if loop.time() >= due:
            loop.call_soon(self._fire)  # after the wakes of this loop iteration
        else:
            loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._scheduled = False
        self._last_tick = asyncio.get_running_loop().time()
        if self.light_window_s < self.full_window_s:
            self._sample(self._wall_time())
        waiting, self._waiting = self._waiting, []
        for event in waiting:
            event.set()

    def _sample(self, now: float) -> None:
        if self._sampled_at is None:
            self._sampled_at, self._cpu_at = now, self._cpu_time()
            return
        elapsed = now - self._sampled_at
        if elapsed < SAMPLE_S:
            return
        cpu = self._cpu_time()
        busy = (cpu - self._cpu_at) / elapsed
        self._sampled_at, self._cpu_at = now, cpu
        self.window_s = choose_window(
            self.window_s, busy, light_s=self.light_window_s, full_s=self.full_window_s
        )


NO_TICK = AppendTick(0.0)


class TurnStream:
    """Appends a turn's events in order with one append in flight (adaptive batching).

    While an append is on its way, new text piles up; the next append carries all
    of it as one chunk per run of the same kind. At a low token rate every token
    goes out alone, at a high rate tokens share an event, and the log never
    becomes the bottleneck of the stream.
    """

    def __init__(
        self,
        writer: EventWriter,
        turn_id: str,
        clock: Callable[[], int],
        new_id: Callable[[], str],
        tick: AppendTick = NO_TICK,
    ) -> None:
        self._writer = writer
        self._turn_id = turn_id
        self._clock = clock
        self._new_id = new_id
        self._tick = tick
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._waiting_tick = False
        self._first_text = True
        self._closing = False
        self._aborted = False
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._run(), name=f"stream-{writer.conversation_id}")

    def chunk(self, kind: ChunkKind, text: str) -> None:
        if not text:
            return
        self._pending.append((kind, text))
        first, self._first_text = self._first_text, False
        if self._wake.is_set() or self._waiting_tick:
            return
        if first:
            # The turn's first text is its time to first token: it leaves at once
            # rather than waiting up to a window for the next tick (bench burst
            # measured that wait at 3 ms p50, 8 ms p99, one append per turn).
            self._wake.set()
            return
        self._waiting_tick = True
        self._tick.wake(self._wake)

    def event(self, event: Event) -> None:
        self._pending.append(event)
        self._wake.set()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Stop at once, dropping what is pending (the turn is ending anyway)."""
        self._aborted = True
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def close(self) -> None:
        """Write everything pending, stop, and re-raise an append failure.

        After `abort` there is nothing to write: the cancellation that stopped the
        task is no failure to re-raise. (It was: a turn that crashed is aborted, then
        closed on its way to `failed: internal_error`, and that close raised
        CancelledError, so the turn got no end until the partition's next owner
        ended it as `worker_lost`.)"""
        if self._aborted:
            return
        self._closing = True
        self._wake.set()
        try:
            await self._task
        except asyncio.CancelledError:
            if self._error is None:
                raise
        self.raise_if_failed()

    async def _run(self) -> None:
        writer = self._writer
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._waiting_tick = False
                while self._pending:
                    batch, self._pending = self._pending, []
                    await writer.append(
                        coalesce(
                            batch,
                            writer.conversation_id,
                            self._turn_id,
                            self._clock(),
                            self._new_id,
                        )
                    )
                if self._closing:
                    return
        except BaseException as err:
            self._error = err
            raise
