"""The read models' handlers: one per event type, its SQL beside it.

Each handler turns one event into the rows it changes, inside the transaction
the projector opened (`projections/projector.py`: batches, checkpoint, poison
rule). What may not enter this module: reading the log, transactions and
savepoints, the checkpoint, error recording, and anything that is not derived
from the event itself. Rows carry only what events carry: timestamps come from
`event.at`, never from now(), so a rebuild writes identical rows.

A handler may assume it runs exactly once per event and in log order: the
checkpoint, written in the same transaction, makes that so.

To project a new event type, add a handler here (or in a sibling module that
registers on `READ_MODELS`), and its columns to `read_models.sql`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import msgspec

from events.vocabulary import (
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
)
from projections.registry import Db, Projection

READ_MODELS = Projection("read_models", tables=("conversations", "messages"), ddl="read_models.sql")
_encoder = msgspec.json.Encoder()


def timestamp(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)


def _json(value: object) -> str:
    return _encoder.encode(value).decode()


def _blocks(blocks: Sequence[ContentBlock]) -> str:
    return _json(list(blocks))


# ---------------------------------------------------------------- conversations

_INSERT_CONVERSATION = (
    "INSERT INTO conversations (id, user_id, project_id, title, title_source, model,"
    " created_at, updated_at, last_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)"
    " ON CONFLICT (id) DO NOTHING"
)


@READ_MODELS.on(ConversationCreated)
async def conversation_created(db: Db, seq: int, event: ConversationCreated) -> None:
    await db.execute(
        _INSERT_CONVERSATION,
        event.conversation_id,
        event.user_id,
        event.project_id,
        event.title,
        "user" if event.title else None,
        event.model,
        timestamp(event.at),
        seq,
    )


_SET_TITLE = (
    "UPDATE conversations SET title = $2, title_source = COALESCE($3, title_source),"
    " last_seq = $4 WHERE id = $1"
)


@READ_MODELS.on(Title)
async def title(db: Db, seq: int, event: Title) -> None:
    await db.execute(
        _SET_TITLE,
        event.conversation_id,
        event.title,
        event.source if event.source != "existing" else None,
        seq,
    )


_TOUCH = (
    "UPDATE conversations SET"
    " message_count = (SELECT count(*) FROM messages WHERE conversation_id = $1 AND is_latest),"
    " token_usage_total = token_usage_total + $2, updated_at = $3, last_seq = $4"
    " WHERE id = $1"
)


async def _touch(
    db: Db, conversation_id: str, seq: int, at: dt.datetime, *, tokens: int = 0
) -> None:
    """message_count = the conversation's visible messages; token totals grow per turn."""
    await db.execute(_TOUCH, conversation_id, tokens, at, seq)


# ---------------------------------------------------------------- messages

_SUPERSEDE = (
    "UPDATE messages SET is_latest = false"
    " WHERE conversation_id = $1 AND version_group_id = $2 AND is_latest"
)

_INSERT_USER_MESSAGE = (
    "INSERT INTO messages (id, conversation_id, role, content, status,"
    " parent_message_id, version_group_id, version_number, is_latest, seq,"
    " created_at, updated_at)"
    " VALUES ($1, $2, 'user', $3, 'complete', $4, $5, $6, true, $7, $8, $8)"
    " ON CONFLICT (id) DO NOTHING"
)


@READ_MODELS.on(UserMessage)
async def user_message(db: Db, seq: int, event: UserMessage) -> None:
    at = timestamp(event.at)
    group = event.version_group_id or event.message_id
    await db.execute(_SUPERSEDE, event.conversation_id, group)
    await db.execute(
        _INSERT_USER_MESSAGE,
        event.message_id,
        event.conversation_id,
        _json([{"role": "user", "content": event.content}]),
        event.parent_message_id,
        group,
        event.version_number,
        seq,
        at,
    )
    await _touch(db, event.conversation_id, seq, at)


_INSERT_ASSISTANT_MESSAGE = (
    "INSERT INTO messages (id, conversation_id, role, content, status, turn_id,"
    " user_message_id, parent_message_id, version_group_id, version_number, is_latest,"
    " model, model_version_id, seq, created_at, updated_at)"
    " VALUES ($1, $2, 'assistant', '[]', 'streaming', $1, $3, $4, $5, $6, true,"
    " $7, $8, $9, $10, $10) ON CONFLICT (id) DO NOTHING"
)


@READ_MODELS.on(Started)
async def started(db: Db, seq: int, event: Started) -> None:
    at = timestamp(event.at)
    group = event.version_group_id or event.turn_id
    await db.execute(_SUPERSEDE, event.conversation_id, group)
    await db.execute(
        _INSERT_ASSISTANT_MESSAGE,
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
    await _touch(db, event.conversation_id, seq, at)


# With content_parts > 0, the content_part events before the end filled the content.
_END_TURN = (
    "UPDATE messages SET content = CASE WHEN $11 THEN content ELSE $2::jsonb END,"
    " status = $3, input_tokens = $4, output_tokens = $5, tokens_estimated = $6,"
    " stop_reason = $7, error_code = $8, error_message = $9, updated_at = $10 WHERE id = $1"
)
_END_STATUS = {Done: "complete", Cancelled: "cancelled", Failed: "failed"}


@READ_MODELS.on(Done, Cancelled, Failed)
async def turn_ended(db: Db, seq: int, event: Done | Cancelled | Failed) -> None:
    at = timestamp(event.at)
    await db.execute(
        _END_TURN,
        event.turn_id,
        _blocks(event.content),
        _END_STATUS[type(event)],
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
        db, event.conversation_id, seq, at, tokens=event.input_tokens + event.output_tokens
    )


# Pieces arrive in order: a piece of the last block extends it, the first piece
# of a block adds it.
_APPEND_CONTENT_PART = (
    "UPDATE messages SET content = CASE"
    " WHEN jsonb_array_length(content) > $2"
    "  THEN jsonb_set(content, ARRAY[$2::text, 'content'],"
    "                 to_jsonb((content->$2->>'content') || $4))"
    " ELSE content || jsonb_build_array(jsonb_build_object('role', $3::text,"
    "                                                      'content', $4::text))"
    " END WHERE id = $1"
)


@READ_MODELS.on(ContentPart)
async def content_part(db: Db, seq: int, event: ContentPart) -> None:
    await db.execute(_APPEND_CONTENT_PART, event.turn_id, event.block, event.role, event.text)


_BILLING_REJECTED = (
    "UPDATE messages SET status = 'billing_error', error_code = 'billing_error',"
    " error_message = $2, updated_at = $3 WHERE id = $1"
)


@READ_MODELS.on(BillingRejected)
async def billing_rejected(db: Db, seq: int, event: BillingRejected) -> None:
    at = timestamp(event.at)
    await db.execute(
        _BILLING_REJECTED,
        event.turn_id,
        f"account {event.account} has {event.available} micro-credits, needs {event.needed}",
        at,
    )
    await _touch(db, event.conversation_id, seq, at)
