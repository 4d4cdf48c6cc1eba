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
"""

from __future__ import annotations

import asyncio
import datetime as dt
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
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    ContentBlock,
    ContentPart,
    ConversationCreated,
    Done,
    Failed,
    Started,
    Title,
    UserMessage,
    event_type,
)

log = logging.getLogger(__name__)

NAME = "read_models"
_blocks_encoder = msgspec.json.Encoder()


def timestamp(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        pool: Any,
        *,
        name: str = NAME,
        batch_max: int = 500,
    ) -> None:
        self._js = js
        self._pool = pool
        self.name = name
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
                    await apply_event(conn, item.seq, item.event)
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
                await apply_event(conn, item.seq, event)
            return
        except TRANSIENT:
            raise
        except Exception as err:
            first_error = f"{type(err).__name__}: {err}"
        clean = sanitised(event)
        if clean is not None:
            try:
                async with conn.transaction():
                    await apply_event(conn, item.seq, clean)
            except TRANSIENT:
                raise
            except Exception as err:
                first_error += f"; sanitised: {type(err).__name__}: {err}"
            else:
                await self._record(conn, item, first_error, SANITISED)
                return
        await self._record(conn, item, first_error, SKIPPED)

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


async def apply_event(conn: Any, seq: int, event: AnyEvent) -> None:
    at = timestamp(event.at)
    match event:
        case ConversationCreated():
            await conn.execute(
                "INSERT INTO conversations (id, user_id, project_id, title, title_source, model,"
                " created_at, updated_at, last_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)"
                " ON CONFLICT (id) DO NOTHING",
                event.conversation_id,
                event.user_id,
                event.project_id,
                event.title,
                "user" if event.title else None,
                event.model,
                at,
                seq,
            )
        case UserMessage():
            await _supersede(
                conn, event.conversation_id, event.version_group_id or event.message_id
            )
            await _branch(conn, event.supersedes, event.fork_origin)
            await conn.execute(
                "INSERT INTO messages (id, conversation_id, role, content, status,"
                " parent_message_id, version_group_id, version_number, is_latest, seq,"
                " created_at, updated_at)"
                " VALUES ($1, $2, 'user', $3, 'complete', $4, $5, $6, true, $7, $8, $8)"
                " ON CONFLICT (id) DO NOTHING",
                event.message_id,
                event.conversation_id,
                _blocks_encoder.encode([{"role": "user", "content": event.content}]).decode(),
                event.parent_message_id,
                event.version_group_id or event.message_id,
                event.version_number,
                seq,
                at,
            )
            await _touch(conn, event.conversation_id, seq, at)
        case Started():
            group = event.version_group_id or event.turn_id
            await _supersede(conn, event.conversation_id, group)
            await _branch(conn, event.supersedes, event.fork_origin)
            await conn.execute(
                "INSERT INTO messages (id, conversation_id, role, content, status, turn_id,"
                " user_message_id, parent_message_id, version_group_id, version_number, is_latest,"
                " model, model_version_id, seq, created_at, updated_at)"
                " VALUES ($1, $2, 'assistant', '[]', 'streaming', $1, $3, $4, $5, $6, true,"
                " $7, $8, $9, $10, $10) ON CONFLICT (id) DO NOTHING",
                event.turn_id,
                event.conversation_id,
                event.user_message_id,
                event.parent_message_id or event.user_message_id,
                group,
                event.version_number,
                event.model,
                event.model_version_id,
                seq,
                at,
            )
            await _touch(conn, event.conversation_id, seq, at)
        case Done() | Cancelled() | Failed():
            status = (
                "complete"
                if isinstance(event, Done)
                else "cancelled"
                if isinstance(event, Cancelled)
                else "failed"
            )
            # with content_parts, the content_part events before this one filled it
            await conn.execute(
                "UPDATE messages SET content = CASE WHEN $11 THEN content ELSE $2::jsonb END,"
                " status = $3, input_tokens = $4,"
                " output_tokens = $5, tokens_estimated = $6, stop_reason = $7,"
                " error_code = $8, error_message = $9, updated_at = $10 WHERE id = $1",
                event.turn_id,
                _blocks(event.content),
                status,
                event.input_tokens,
                event.output_tokens,
                event.tokens_estimated,
                event.stop_reason if isinstance(event, Done) else None,
                event.code if isinstance(event, Failed) else None,
                event.message if isinstance(event, Failed) else None,
                at,
                event.content_parts > 0,
            )
            await _touch(
                conn,
                event.conversation_id,
                seq,
                at,
                tokens=event.input_tokens + event.output_tokens,
            )
        case ContentPart():
            # Pieces arrive in order: a piece of the last block extends it, the
            # first piece of a block adds it.
            await conn.execute(
                "UPDATE messages SET content = CASE"
                " WHEN jsonb_array_length(content) > $2"
                "  THEN jsonb_set(content, ARRAY[$2::text, 'content'],"
                "                 to_jsonb((content->$2->>'content') || $4))"
                " ELSE content || jsonb_build_array(jsonb_build_object('role', $3::text,"
                "                                                      'content', $4::text))"
                " END WHERE id = $1",
                event.turn_id,
                event.block,
                event.role,
                event.text,
            )
        case BillingRejected():
            await conn.execute(
                "UPDATE messages SET status = 'billing_error', error_code = 'billing_error',"
                " error_message = $2, updated_at = $3 WHERE id = $1",
                event.turn_id,
                f"account {event.account} has {event.available} micro-credits, needs {event.needed}",
                at,
            )
            await _touch(conn, event.conversation_id, seq, at)
        case Title():
            await conn.execute(
                "UPDATE conversations SET title = $2, title_source = COALESCE($3, title_source),"
                " last_seq = $4"
                " WHERE id = $1",
                event.conversation_id,
                event.title,
                event.source if event.source != "existing" else None,
                seq,
            )
        case _:
            pass  # chunks, tool calls and results live in the log; no read model needs them yet


def _blocks(blocks: Sequence[ContentBlock]) -> str:
    return _blocks_encoder.encode(list(blocks)).decode()


async def _supersede(conn: Any, conversation_id: str, group: str) -> None:
    await conn.execute(
        "UPDATE messages SET is_latest = false"
        " WHERE conversation_id = $1 AND version_group_id = $2 AND is_latest",
        conversation_id,
        group,
    )


async def _branch(conn: Any, supersedes: list[str], fork_origin: str | None) -> None:
    """A new version replaced these messages (the old version and what grew from it)."""
    if supersedes:
        await conn.execute(
            "UPDATE messages SET is_latest = false WHERE id = ANY($1::text[])", supersedes
        )
    if fork_origin is not None:
        await conn.execute("UPDATE messages SET is_fork_origin = true WHERE id = $1", fork_origin)


async def _touch(
    conn: Any, conversation_id: str, seq: int, at: dt.datetime, *, tokens: int = 0
) -> None:
    """message_count = the conversation's visible messages; token totals grow per turn."""
    await conn.execute(
        "UPDATE conversations SET"
        " message_count = (SELECT count(*) FROM messages"
        "   WHERE conversation_id = $1 AND is_latest),"
        " token_usage_total = token_usage_total + $2, updated_at = $3, last_seq = $4"
        " WHERE id = $1",
        conversation_id,
        tokens,
        at,
        seq,
    )
