"""The read-model projector: CHAT_EVT -> Postgres, exactly once.

Exactly-once effect comes from the tracking record, not from the broker: each
batch of events is applied and the position of its last event written to
`projection_checkpoints` in the same transaction. On start the projector reads
its position from Postgres and follows the log from the next sequence with an
ordered consumer (gap-free and in order), so a crash between commit and
anything else neither loses nor doubles a row; an event at or below the
checkpoint is skipped.

Only one projector per schema applies events at a time (a Postgres advisory
lock); a second one waits as a hot standby.

This module is the shell: following the log, batches, the checkpoint, the
poison rule, the lock. What an event does to the rows is its handler's business
(`projections/handlers.py`, looked up through the `Projection` registry); no SQL
about conversations or messages belongs here.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
from nats.js import JetStreamContext

from events.codec import Unreadable, decode_entry
from events.follow import LogFollower, RawEvent
from events.log import StoredEvent
from events.subjects import EVT_SUBJECTS
from events.vocabulary import AnyEvent, event_type
from projections.handlers import READ_MODELS
from projections.registry import Db, Projection

log = logging.getLogger(__name__)


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        pool: Any,
        *,
        projection: Projection = READ_MODELS,
        batch_max: int = 500,
    ) -> None:
        self._js = js
        self._pool = pool
        self.projection = projection
        self.name = projection.name
        self._batch_max = batch_max
        self.position = 0
        self.applied = asyncio.Condition()
        self.ready = asyncio.Event()  # set once following the log

    async def run(self, stopping: asyncio.Event) -> None:
        async with self._pool.acquire() as lock_conn:
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
                    )
                except TRANSIENT as err:
                    # a connection that is gone holds no lock any more
                    log.info("advisory unlock skipped", extra={"error": repr(err)})

    async def _follow(self, stopping: asyncio.Event, lock_conn: Any) -> None:
        self.position = await self._load_position()
        follower = LogFollower(self._js, EVT_SUBJECTS, self.position)
        self.ready.set()
        try:
            while not stopping.is_set():
                if lock_conn.is_closed():
                    # The lock went with its connection: a standby may be applying
                    # now. Stop; the supervisor restarts us as a standby or leader.
                    raise LockLost(f"projection {self.name}: the lock's connection closed")
                batch = await follower.next_batch(self._batch_max, wait_s=1.0)
                if batch:
                    await self.apply([_stored(raw) for raw in batch])
        finally:
            await follower.close()

    async def _load_position(self) -> int:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO projection_checkpoints (name, position) VALUES ($1, 0) "
                "ON CONFLICT (name) DO NOTHING",
                self.name,
            )
            position: int = await conn.fetchval(
                "SELECT position FROM projection_checkpoints WHERE name = $1", self.name
            )
            return position

    async def apply(self, batch: Sequence[StoredEvent]) -> None:
        """Apply a batch and move the checkpoint, in one transaction.

        The whole batch is tried at once (the fast path). If one of its events
        cannot be stored, the transaction is rolled back and the batch applied
        again one event at a time, each in a savepoint, so the failing event is
        handled by the poison rule (`_apply_carefully`) and the rest go in.
        Errors that mean Postgres is away are not poison: they propagate, and
        the role is restarted from the checkpoint.
        """
        try:
            last = await self._apply_batch(batch, careful=False)
        except TRANSIENT:
            raise
        except Exception as err:
            log.warning(
                "batch failed, applying it event by event",
                extra={"projection": self.name, "error": repr(err)},
            )
            last = await self._apply_batch(batch, careful=True)
        async with self.applied:
            self.position = max(self.position, last)
            self.applied.notify_all()

    async def _apply_batch(self, batch: Sequence[StoredEvent], *, careful: bool) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            position: int = await conn.fetchval(
                "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
                self.name,
            )
            last = position
            for item in batch:
                if item.seq <= position:
                    continue  # applied before a crash: the checkpoint says so
                if careful:
                    await self._apply_carefully(conn, item)
                elif isinstance(item.event, Unreadable):
                    await self._record(conn, item, item.event.error, SKIPPED)
                else:
                    await self._apply_event(conn, item.seq, item.event)
                last = max(last, item.seq)
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

    async def _apply_event(self, db: Db, seq: int, event: AnyEvent) -> None:
        handler = self.projection.handler(event)
        if handler is not None:  # no handler: this event changes none of our rows
            await handler(db, seq, event)

    async def _record(self, conn: Any, item: StoredEvent, reason: str, rule: str) -> None:
        event = item.event
        if isinstance(event, Unreadable):
            kind, conversation, raw = event.type or "", None, event.raw
        else:
            kind, conversation, raw = event_type(event), event.conversation_id, _raw(event)
        log.error(
            "event not projected as written",
            extra={"projection": self.name, "seq": item.seq, "type": kind, "rule": rule},
        )
        await conn.execute(
            "INSERT INTO projection_errors (projection, seq, conversation_id, event_type, rule,"
            " reason, raw) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (projection, seq) DO NOTHING",
            self.name,
            item.seq,
            _storable(conversation),
            _storable(kind),
            rule,
            (_storable(reason) or "")[:2000],
            raw,
        )


class LockLost(Exception):
    """The connection holding a projection's advisory lock is gone."""


SKIPPED = "skipped"
SANITISED = "sanitised"
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
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str | None) -> str | None:
    return None if text is None else _UNSTORABLE.sub("\ufffd", text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _storable(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def sanitised(event: AnyEvent) -> AnyEvent | None:
    """The event with text no column can hold replaced by U+FFFD; None if it has none."""
    raw = msgspec.to_builtins(event)
    clean = _clean(raw)
    if clean == raw:
        return None
    result: AnyEvent = msgspec.convert(clean, type=type(event))
    return result


def _raw(event: AnyEvent) -> bytes:
    try:
        return msgspec.json.encode(event)
    except UnicodeEncodeError:
        return msgspec.json.encode(_clean(msgspec.to_builtins(event)))


def _stored(raw: RawEvent) -> StoredEvent:
    return StoredEvent(seq=raw.seq, event=decode_entry(raw.data))
