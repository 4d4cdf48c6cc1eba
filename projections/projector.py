"""The projector: CHAT_EVT -> Postgres, exactly once.

Exactly-once effect comes from the tracking record, not from the broker: each
batch of events is applied and the position of its last entry written to
`projection_checkpoints` in the same transaction. On start the projector reads
its position from Postgres and follows the log from the next sequence
(`projections/feed.py`: gap-free, in order, pulled in windows), so a crash
between commit and anything else neither loses nor doubles a row; an event at
or below the checkpoint is skipped. Should the checkpoint ever move back under
a running projector, the projector notices at its next batch and follows again
from there. Rows restored from a backup with it are as far as it says, and get
what followed applied again; rows ahead of it (an operator set it back, or an
event came twice) are left as they are, because every handler's effect is
keyed on the event's log position: an event the rows already reflect changes
nothing (`projections/handlers.py`, `projections/billing.py`). Moved forward
(a rebuild swapped in a projection further along, `projections/rebuild.py`),
it skips what is applied.

Only one projector per schema applies events at a time (a Postgres advisory
lock); a second one waits as a hot standby.

Entries the projection has no handler for are not decoded: `chunk` events,
most of the log, are recognised by their first bytes (msgspec writes the tag
first) and only move the checkpoint. One that does not start that way is
decoded like any other, so the shortcut can skip work, never an event.

This module is the shell: following the log, batches, the checkpoint, the
poison rule, the lock. What an event does to the rows is its handler's business
(`projections/handlers.py`, looked up through the `Projection` registry); no SQL
about conversations or messages belongs here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from events.codec import Unreadable
from events.errors import describe
from events.follow import RawEvent
from events.log import StoredEvent
from events.subjects import EVT_STREAM, conversation_of
from events.vocabulary import AnyEvent, Chunk, event_type
from projections.feed import LogBehind, LogFeed, log_end
from projections.handlers import READ_MODELS
from projections.poison import (
    LOG_BEHIND,
    REMOVED,
    SANITISED,
    SKIPPED,
    log_behind_reason,
    raw_bytes,
    removed_reason,
    sanitised,
    storable,
)
from projections.registry import Projection, Write
from projections.store import recorded_stop

log = logging.getLogger(__name__)

# How every chunk event starts as msgspec writes it (the tag field comes first).
CHUNK_PREFIX = b'{"type":"chunk"'
# How long a small batch waits for more entries to share its transaction: the
# read models trail the log by this much more, at most, while it is quiet.
LINGER_S = 0.02
# While the log is busy (a batch of BUSY_BATCH entries or more came in LINGER_S:
# 1,000 entries a second, some fifty streams), batches gather for BUSY_LINGER_S
# instead. Each batch is a transaction (BEGIN, the checkpoint's row, the writes,
# COMMIT), and at 250 turns of `parley bench capacity` the projector and Postgres
# spent 0.04-0.06 of a core less with 100 ms than with 20 (README "Benchmark log").
BUSY_LINGER_S = 0.1
BUSY_BATCH = 20
# A stopping projector gives its lock and its connection back within this, else
# drops the connection (the lock goes with it): Postgres that stopped answering
# would hold the stop for ever.
_GOODBYE_WITHIN_S = 2.0
# A batch cut at a stop that still has not ended this much later is waiting on
# something the cut cannot reach (`_cut_when_stopping`): its connection is dropped.
_CUT_HEARD_WITHIN_S = 1.0


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        pool: Any,
        *,
        projection: Projection = READ_MODELS,
        batch_max: int = 500,
        linger_s: float = LINGER_S,
    ) -> None:
        self._js = js
        self._pool = pool
        self.projection = projection
        self.name = projection.name
        self.batch_max = batch_max  # entries a batch (one transaction) holds at most
        self._linger_s = linger_s
        # a projection with no chunk handler never needs a chunk decoded
        self.skip_prefix: bytes | None = None if Chunk in projection.handled else CHUNK_PREFIX
        self.position = 0
        self.counts: Counter[str] = Counter()  # entries read since start, by type
        self.batches = 0  # batches read from the log since start (one transaction each)
        self.applied = asyncio.Condition()
        self.ready = asyncio.Event()  # set once following the log
        self._applying: asyncio.Timeout | None = None  # the batch being stored, if any

    async def run(self, stopping: asyncio.Event) -> None:
        lock_conn = await self._pool.acquire()
        try:
            # One lock per projection per schema: a second projector waits as a standby.
            while not await lock_conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext(current_schema() || '/' || $1))", self.name
            ):
                if stopping.is_set():
                    return
                await asyncio.sleep(1.0)
            try:
                await self._follow(stopping, lock_conn)
            finally:
                try:
                    await lock_conn.execute(
                        "SELECT pg_advisory_unlock(hashtext(current_schema() || '/' || $1))",
                        self.name,
                        timeout=_GOODBYE_WITHIN_S,
                    )
                except _GOODBYE_FAILURES as err:
                    # a connection that is gone holds no lock any more
                    log.info("advisory unlock skipped", extra={"error": describe(err)})
        finally:
            try:
                # dropped, not reset, when Postgres does not answer
                await self._pool.release(lock_conn, timeout=_GOODBYE_WITHIN_S)
            except _GOODBYE_FAILURES as err:
                log.warning(
                    "projector's connection to Postgres dropped, not given back",
                    extra={"projection": self.name, "error": describe(err)},
                )

    async def _follow(self, stopping: asyncio.Event, lock_conn: Any) -> None:
        self.position = await self.load_position(lock_conn)
        await self._check_log(lock_conn)
        feed = self._feed()
        started = True  # the next entry is the first the feed hands out
        self.ready.set()
        cutting = asyncio.ensure_future(self._cut_when_stopping(stopping, lock_conn))
        try:
            while not stopping.is_set():
                if lock_conn.is_closed():
                    # The lock went with its connection: a standby may be applying
                    # now. Stop; the supervisor restarts us as a standby or leader.
                    raise LockLost(f"projection {self.name}: the lock's connection closed")
                batch = await feed.next_batch(self.batch_max, wait_s=1.0, stop=stopping)
                if not batch or stopping.is_set():
                    # told to stop while it read: the batch is left to the next projector
                    # (the checkpoint has not moved). Applied now, it would run past the
                    # stop's cut, set once when the stop came (`_cut_when_stopping`):
                    # on a Postgres that does not answer, until the roles' deadline.
                    continue
                if started:
                    started = False
                    # From 0 (a new projection, a rebuild's) there are no rows the
                    # removed entries could be missing from: they are the log as it is.
                    if self.position > 0 and batch[0].seq > self.position + 1:
                        gap = await self._removed_in(self.position + 1, batch[0].seq - 1)
                        if gap is not None:
                            await self._record_removed(lock_conn, *gap)
                self.batches += 1
                applying = self._applying = asyncio.timeout(None)
                try:
                    # On the connection that holds the lock: no pool checkout, and no
                    # reset round trip on its return, per batch (the reset was 6% of
                    # the projector's samples under bench capacity); and a projector
                    # that lost its lock with its connection cannot write either.
                    async with applying:
                        await self.apply(self.decode(batch), through=batch[-1].seq, conn=lock_conn)
                except Rewound as moved:
                    log.warning(
                        "checkpoint moved back; following again from it",
                        extra={"projection": self.name, "position": moved.position},
                    )
                    await feed.close()
                    self.position = moved.position
                    feed, started = self._feed(), True
                except Exception as err:
                    if not applying.expired():
                        raise
                    # cut: TimeoutError, or the error of the connection dropped under it
                    log.warning(
                        "projector stopped before its batch was stored; Postgres did not"
                        " answer (the next projector applies it)",
                        extra={
                            "projection": self.name,
                            "within_s": _GOODBYE_WITHIN_S,
                            "error": describe(err),
                        },
                    )
                    return
                finally:
                    self._applying = None
        finally:
            cutting.cancel()
            left = await feed.close()
            if left is not None and stopping.is_set():
                log.warning(
                    "projector stopped without deleting its log reader's consumer; the"
                    " server removes it within a minute",
                    extra={"projection": self.name, "reason": left},
                )

    async def _cut_when_stopping(self, stopping: asyncio.Event, conn: Any) -> None:
        """A batch being stored when the projector is told to stop gets
        `_GOODBYE_WITHIN_S`, then is cut (its transaction never commits, the checkpoint
        stays): Postgres that stopped answering held the stop until the deadline of
        the process's roles (a statement without a timeout waits for ever).

        A cut is a cancel, and asyncpg's `executemany` swallows one that comes while
        its writes wait for Postgres to read (large rows, a busy server), then waits
        for an answer the server never sends (the statement's end was never written);
        its transaction's ROLLBACK waits on that too, past any further cancel. Seen
        in CI: a projector catching up on content parts outlived its role's deadline
        and the process never exited. A batch still there `_CUT_HEARD_WITHIN_S` after
        its cut gets its connection dropped, which ends every wait on it; the lock
        goes with the connection."""
        await stopping.wait()
        applying = self._applying
        if applying is None:
            return
        loop = asyncio.get_running_loop()
        applying.reschedule(loop.time() + _GOODBYE_WITHIN_S)
        await asyncio.sleep(_GOODBYE_WITHIN_S + _CUT_HEARD_WITHIN_S)
        if self._applying is applying:
            log.warning(
                "projector's batch did not end when cut; dropping its connection",
                extra={"projection": self.name},
            )
            conn.terminate()

    async def _check_log(self, conn: Any) -> None:
        """Refuse to follow a log that ends before the checkpoint (`LogBehind`).

        The checkpoint only ever moves to positions read from the log, so one past
        its end means the log is not the one the rows were projected from: restored
        from an older copy, or deleted and made again. Its next appends reuse
        positions the rows already hold, and following from the checkpoint would
        pass them over without a word, then apply what comes after in the middle of
        turns it never saw. So the projection stops, and says so in
        `projection_errors` (`parley projections errors`, `/readyz`), which keeps it
        stopped after the log has grown past the old checkpoint too, until
        `parley projections rebuild` builds it from the log there is (the rebuild
        replaces that row with its own)."""
        reason = await recorded_stop(conn, self.name)
        if reason is not None:
            raise LogBehind(reason)
        end = await log_end(self._js)
        if self.position <= end:
            return
        reason = log_behind_reason(self.name, self.position, end)
        log.error(
            "checkpoint past the end of the log; not following it",
            extra={"projection": self.name, "position": self.position, "log_end": end},
        )
        await self._write_error(conn, self.position, LOG_BEHIND, reason, replace=True)
        raise LogBehind(reason)

    async def _removed_in(self, first: int, last: int) -> tuple[int, int] | None:
        """The first and last of positions `first`..`last` that the log no longer holds,
        or None when it holds them all.

        The feed hands out parley's subjects only, and a CHAT_EVT made by an operator
        may hold others (README "The streams"): positions passed over are not all
        removed ones. Removed are those before the log's first entry (a retention
        limit, a purge of its start) and those deleted inside it (a purge of a
        subject, max_msgs_per_subject): found by asking for the entry, of any
        subject, at or after each position, one question per entry kept there."""
        state = (await self._js.stream_info(EVT_STREAM)).state
        lo: int | None = None
        hi = 0
        if state.first_seq > first:
            lo, hi = first, min(last, state.first_seq - 1)
            first = hi + 1
        at = first
        while state.num_deleted != 0 and at <= last:  # (None: a server that does not say)
            try:
                kept = (await self._js.get_msg(EVT_STREAM, seq=at, subject=">", next=True)).seq
            except nats.js.errors.NotFoundError:
                kept = None  # nothing kept from `at` on (the feed's entry was since removed)
            if kept is None or kept > at:
                lo = at if lo is None else lo
                hi = min(last, kept - 1) if kept is not None else last
            if kept is None:
                break
            at = kept + 1
        return None if lo is None else (lo, hi)

    async def _record_removed(self, conn: Any, first: int, last: int) -> None:
        """Entries `first`..`last` were removed from the log before this projection
        applied them (a retention limit or a purge while it was behind): the feed
        starts from the oldest kept one, which is all there is to do, but the rows
        they made are missing, so it is said (the log, `projection_errors`), never
        passed over in silence. Seen where the feed starts (a projector that starts,
        or follows again), the gap a projector left behind for long meets."""
        reason = removed_reason(self.name, first, last)
        log.warning(
            "entries removed from the log before they were applied",
            extra={"projection": self.name, "first": first, "last": last},
        )
        await self._write_error(conn, first, REMOVED, reason)

    def _feed(self) -> LogFeed:
        # A trickle gathers `linger_s` on the server: what follows within a few
        # milliseconds shares the transaction (py-spy on `parley bench burst`: the
        # projector's time went to BEGIN, COMMIT and the pool's reset, once per
        # entry) and comes in one answer (projections/feed.py).
        return LogFeed(
            self._js,
            self.position,
            window=self.batch_max,
            gather_s=self._linger_s,
            busy_gather_s=max(self._linger_s, BUSY_LINGER_S),
            busy_batch=BUSY_BATCH,
        )

    def decode(self, batch: Sequence[RawEvent]) -> list[StoredEvent]:
        """The entries this projection needs decoded; chunks are passed over as bytes.

        An event on one conversation's log that names another (a writer's bug, or a
        forged entry) is not projected into that other conversation, whose log does
        not hold it: it is recorded as one this projection cannot apply."""
        skip = self.skip_prefix
        out: list[StoredEvent] = []
        counts = self.counts
        for raw in batch:
            if skip is not None and raw.data.startswith(skip):
                continue
            item = StoredEvent.decode(raw.seq, raw.data)
            event = item.event
            if isinstance(event, Unreadable):
                counts["unreadable"] += 1
                # its subject says whose it was: the record names the conversation
                item = StoredEvent(item.seq, msgspec.structs.replace(event, subject=raw.subject))
            elif (owner := conversation_of(raw.subject)) is not None and (
                event.conversation_id != owner
            ):
                counts["unreadable"] += 1
                foreign = Unreadable(
                    raw=raw.data,
                    type=event_type(event),
                    error=f"it names conversation {event.conversation_id!r}, not the one whose "
                    "log holds it",
                    subject=raw.subject,
                )
                item = StoredEvent(item.seq, foreign)
            else:
                counts[event_type(event)] += 1
            out.append(item)
        counts["chunk"] += len(batch) - len(out)
        return out

    async def load_position(self, conn: Any = None) -> int:
        """The stored position (0 for a new projection, whose checkpoint row is made);
        read on `conn`, else on a connection of the pool."""
        if conn is None:
            async with self._pool.acquire() as pooled:
                return await self.load_position(pooled)
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, position) VALUES ($1, 0) "
            "ON CONFLICT (name) DO NOTHING",
            self.name,
        )
        position: int = await conn.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", self.name
        )
        return position

    async def apply(
        self, batch: Sequence[StoredEvent], *, through: int = 0, conn: Any = None
    ) -> None:
        """Apply a batch and move the checkpoint to its last entry (or `through`, when
        entries after the last event were passed over), in one transaction; on `conn`,
        else on a connection of the pool."""
        if conn is not None:
            last = await self.apply_on(conn, batch, through=through)
        else:
            async with self._pool.acquire() as pooled:
                last = await self.apply_on(pooled, batch, through=through)
        async with self.applied:
            self.position = max(self.position, last)
            self.applied.notify_all()

    async def apply_on(self, conn: Any, batch: Sequence[StoredEvent], *, through: int = 0) -> int:
        """`apply` on a connection the caller holds; returns the new position.

        Inside a transaction of the caller's (a rebuild's swap), ours is a
        savepoint. The whole batch is tried at once (the fast path). If one of
        its events cannot be stored, that is rolled back and the batch applied
        again one event at a time, each in a savepoint, so the failing event is
        handled by the poison rule (`_apply_carefully`) and the rest go in.
        Errors that mean Postgres is away are not poison: they propagate, and
        the role is restarted from the checkpoint.
        """
        try:
            return await self._apply_batch(conn, batch, through, careful=False)
        except NOT_POISON:
            raise
        except Exception as err:
            log.warning(
                "batch failed, applying it event by event",
                extra={"projection": self.name, "error": describe(err)},
            )
            return await self._apply_batch(conn, batch, through, careful=True)

    async def _apply_batch(
        self, conn: Any, batch: Sequence[StoredEvent], through: int, *, careful: bool
    ) -> int:
        async with conn.transaction():
            position: int = await conn.fetchval(
                "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
                self.name,
            )
            if position < self.position:
                raise Rewound(position)
            # at or below the checkpoint: applied before a crash, the checkpoint says so
            fresh = [item for item in batch if item.seq > position]
            if careful:
                for item in fresh:
                    await self._apply_carefully(conn, item)
            else:
                for item in fresh:
                    if isinstance(item.event, Unreadable):
                        await self._record(conn, item, item.event.error, SKIPPED)
                await self._run(conn, self.plan(fresh))
            last = fresh[-1].seq if fresh else position
            last = max(last, through)
            if last != position:
                await conn.execute(
                    "UPDATE projection_checkpoints SET position = $2 WHERE name = $1",
                    self.name,
                    last,
                )
            return last

    async def _apply_carefully(self, conn: Any, item: StoredEvent) -> None:
        """The poison rule, one event:

        1. an entry this version cannot decode is skipped and recorded;
        2. an event Postgres refuses is tried once more with its text sanitised
           (NUL and lone surrogates, which no text column can hold, become
           U+FFFD); if that goes in, it is recorded as `sanitised`;
        3. otherwise it is skipped and recorded as `skipped`.
        Recorded errors are rows of `projection_errors`; a rebuild starts them
        afresh, so whatever a newer rule allows is applied then.
        """
        event = item.event
        if isinstance(event, Unreadable):
            await self._record(conn, item, event.error, SKIPPED)
            return
        try:
            async with conn.transaction():
                await self._apply_event(conn, item.seq, event)
            return
        except TRANSIENT:
            raise
        except Exception as err:
            first_error = f"{type(err).__name__}: {err}"
        clean = sanitised(event)
        if clean is not None:
            try:
                async with conn.transaction():
                    await self._apply_event(conn, item.seq, clean)
            except TRANSIENT:
                raise
            except Exception as err:
                first_error += f"; sanitised: {type(err).__name__}: {err}"
            else:
                await self._record(conn, item, first_error, SANITISED)
                return
        await self._record(conn, item, first_error, SKIPPED)

    def plan(self, batch: Sequence[StoredEvent]) -> list[Write]:
        """The batch's writes, in an order they may run in.

        In log order, unless the projection is conversation-local. Then each
        conversation's writes keep their order, but conversations commute (the
        projection's promise), so the writes are merged to put equal statements
        side by side: again and again, take the statement that most
        conversations have next, with every conversation's next writes of it.
        Turns go through the same steps (message, start, tool call, end), so a
        batch of many interleaved conversations becomes a few runs of one
        statement each, and `_run` sends one `executemany` per run instead of
        one round trip per event.
        """
        readable = [(i.seq, i.event) for i in batch if not isinstance(i.event, Unreadable)]
        writes = self.projection.writes
        if not self.projection.conversation_local:
            return [w for seq, event in readable for w in writes(seq, event)]
        pending: dict[str, deque[Write]] = {}
        for seq, event in readable:
            pending.setdefault(event.conversation_id, deque()).extend(writes(seq, event))
        queues = [q for q in pending.values() if q]
        out: list[Write] = []
        while queues:
            sql = Counter(q[0].sql for q in queues).most_common(1)[0][0]
            for queue in queues:
                while queue and queue[0].sql == sql:
                    out.append(queue.popleft())
            queues = [q for q in queues if q]
        return out

    async def _run(self, conn: Any, writes: Sequence[Write]) -> None:
        for sql, group in itertools.groupby(writes, key=lambda w: w.sql):
            rows = [w.args for w in group]
            if len(rows) == 1:
                await conn.execute(sql, *rows[0])
            else:
                await conn.executemany(sql, rows)

    async def _apply_event(self, conn: Any, seq: int, event: AnyEvent) -> None:
        for write in self.projection.writes(seq, event):
            await conn.execute(write.sql, *write.args)

    async def _record(self, conn: Any, item: StoredEvent, reason: str, rule: str) -> None:
        event = item.event
        if isinstance(event, Unreadable):
            kind, conversation, raw = event.type or "", conversation_of(event.subject), event.raw
        else:
            kind, conversation, raw = event_type(event), event.conversation_id, raw_bytes(event)
        log.error(
            "event not projected as written",
            extra={"projection": self.name, "seq": item.seq, "type": kind, "rule": rule},
        )
        await self._write_error(
            conn, item.seq, rule, reason, conversation=conversation, kind=kind, raw=raw
        )

    async def _write_error(
        self,
        conn: Any,
        seq: int,
        rule: str,
        reason: str,
        *,
        conversation: str | None = None,
        kind: str = "",
        raw: bytes | None = None,
        replace: bool = False,
    ) -> None:
        """A row of `projection_errors` at `seq`: an event not projected as written, or
        (no event) what happened to the log there. A row already at `seq` is kept,
        unless `replace` (a stop that must hold over whatever was recorded there)."""
        on_conflict = "DO UPDATE SET rule = $5, reason = $6" if replace else "DO NOTHING"
        await conn.execute(
            "INSERT INTO projection_errors (projection, seq, conversation_id, event_type, rule,"
            f" reason, raw) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (projection, seq)"
            f" {on_conflict}",
            self.name,
            seq,
            storable(conversation),
            storable(kind),
            rule,
            (storable(reason) or "")[:2000],
            raw,
        )


class LockLost(Exception):
    """The connection holding a projection's advisory lock is gone."""


class Rewound(Exception):
    """The stored checkpoint is behind what this projector applied: someone moved it."""

    def __init__(self, position: int) -> None:
        super().__init__(f"checkpoint moved back to {position}")
        self.position = position


# Postgres is away or busy: not the event's fault. The role stops and is
# restarted from its checkpoint; nothing is recorded against the event.
TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    OSError,
)
# What a stopping projector's unlock and its connection's return may meet
_GOODBYE_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, TimeoutError)
# Raised through the poison rule untouched: neither is an event's fault.
NOT_POISON: tuple[type[BaseException], ...] = (*TRANSIENT, Rewound)
