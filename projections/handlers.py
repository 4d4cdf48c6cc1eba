"""The read models' handlers: one per event type, its SQL beside it.

Each handler is a pure function from one event to the statements that apply
it (`Write`s); the projector runs them inside its transaction
(`projections/projector.py`: batches, checkpoint, poison rule). What may not
enter this module: I/O of any kind, reading the log, transactions, the
checkpoint, error recording, and anything not derived from the event itself.
Rows carry only what events carry: timestamps come from `event.at`, never from
now(), so a rebuild writes identical rows.

A handler's writes run after those of every earlier event of the same
conversation, and take effect once per event. The checkpoint, written in the
same transaction, keeps an event from being applied twice while it and the
rows agree. Should it move back while the rows are ahead of it (an operator's
edit, an event delivered twice), the rows themselves say what is applied: the
conversation's `last_seq` is the position of the last event applied to it.
Every statement applies only while that is below its event's position, and
each event's last statement moves it there (an event's first statements must
leave it alone, or its last would find the event applied); an insert keyed by
an id its event made (a conversation, a message) is kept once by its key. So
an event applied again changes nothing, and rows restored from a backup with
their checkpoint get the events after it as the first time. A conversation
whose creation was never projected has no row to key on: its events apply as
they come.

Every handler here writes only rows of its own event's conversation
(`conversation_local=True`), which lets the projector group a batch's
statements across conversations; a handler that writes shared rows
(accounts, projects, the ledger) belongs to another projection.

To project a new event type, add a handler here (or in a sibling module that
registers on `READ_MODELS`), and its columns to `read_models.sql`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from events.codec import timestamp
from events.vocabulary import (
    BillingRejected,
    Cancelled,
    ContentBlock,
    ContentPart,
    ConversationCreated,
    ConversationDeleted,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
)
from projections.registry import Projection, Write, write

READ_MODELS = Projection(
    "read_models",
    tables=("conversations", "messages"),
    ddl="read_models.sql",
    conversation_local=True,
)
_encoder = msgspec.json.Encoder()


def _json(value: object) -> str:
    return _encoder.encode(value).decode()


def _blocks(blocks: Sequence[ContentBlock]) -> str:
    return _json(list(blocks))


def _unapplied(conversation_id: str, seq: str) -> str:
    """SQL true while the event at `seq` is not yet in the rows of `conversation_id`
    (both are placeholders: `$n`), for the writes to rows other than the conversation's.

    Its last_seq says how far its rows are; a conversation with no row (its creation
    was never projected) has nothing to key on, and its events apply as they come.
    """
    return (
        "NOT EXISTS (SELECT 1 FROM conversations"
        f" WHERE id = {conversation_id} AND last_seq >= {seq})"
    )


# ---------------------------------------------------------------- conversations

_INSERT_CONVERSATION = (
    "INSERT INTO conversations (id, user_id, project_id, title, title_source, model,"
    " created_at, updated_at, last_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)"
    " ON CONFLICT (id) DO NOTHING"
)


@READ_MODELS.on(ConversationCreated)
def conversation_created(seq: int, event: ConversationCreated) -> list[Write]:
    return [
        write(
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
    ]


_SET_TITLE = (
    "UPDATE conversations SET title = $2, title_source = COALESCE($3, title_source),"
    " last_seq = $4 WHERE id = $1 AND last_seq < $4"
)


@READ_MODELS.on(Title)
def title(seq: int, event: Title) -> list[Write]:
    return [
        write(
            _SET_TITLE,
            event.conversation_id,
            event.title,
            event.source if event.source != "existing" else None,
            seq,
        )
    ]


# ---------------------------------------------------------------- messages

# A new message, or a new version of one (edit, regenerate), replaces the
# latest of its version group: the superseded row stops being latest, so the
# conversation's message_count (its latest messages) grows by one per new group
# only. One statement: the three writes of an arriving message go together.
# The insert needs no guard: the row's id is its event's, so a row already
# there was added by this very event.
_ADD_MESSAGE = f"""
WITH superseded AS (
    UPDATE messages SET is_latest = false
    WHERE conversation_id = $2 AND version_group_id = $3 AND is_latest AND id <> $1
        AND {_unapplied("$2", "$13")}
    RETURNING 1
), added AS (
    INSERT INTO messages (id, conversation_id, version_group_id, role, content, status,
        turn_id, user_message_id, parent_message_id, version_number, is_latest, model,
        model_version_id, seq, created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, true, $11, $12, $13, $14, $14)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
UPDATE conversations SET
    message_count = message_count + (SELECT count(*) FROM added)
                                  - (SELECT count(*) FROM superseded),
    updated_at = $14, last_seq = $13
WHERE id = $2 AND last_seq < $13
"""


# An edit or a regeneration starts a new branch: the old version and every
# message that grew from it (the event lists them) leave the latest set, and the
# version it grew from is marked as the fork's origin. It leaves last_seq alone:
# the event's message, written next, moves it, and must still find it below.
_BRANCH = f"""
WITH gone AS (
    UPDATE messages SET is_latest = false
    WHERE conversation_id = $1 AND id = ANY($2::text[]) AND is_latest
        AND {_unapplied("$1", "$4")}
    RETURNING 1
), origin AS (
    UPDATE messages SET is_fork_origin = true
    WHERE conversation_id = $1 AND id = $3 AND {_unapplied("$1", "$4")}
    RETURNING 1
)
UPDATE conversations SET message_count = message_count - (SELECT count(*) FROM gone)
WHERE id = $1 AND last_seq < $4 AND (SELECT count(*) FROM origin) >= 0
"""


def _branch(
    seq: int, conversation_id: str, supersedes: list[str], fork_origin: str | None
) -> list[Write]:
    if supersedes or fork_origin is not None:
        return [write(_BRANCH, conversation_id, supersedes, fork_origin, seq)]
    return []


@READ_MODELS.on(UserMessage)
def user_message(seq: int, event: UserMessage) -> list[Write]:
    return [
        *_branch(seq, event.conversation_id, event.supersedes, event.fork_origin),
        write(
            _ADD_MESSAGE,
            event.message_id,
            event.conversation_id,
            event.version_group_id or event.message_id,
            "user",
            _json([{"role": "user", "content": event.content}]),
            "complete",
            None,
            None,
            event.parent_message_id,
            event.version_number,
            None,
            None,
            seq,
            timestamp(event.at),
        ),
    ]


@READ_MODELS.on(Started)
def started(seq: int, event: Started) -> list[Write]:
    """The assistant row exists from the turn's start, streaming, with no content yet."""
    return [
        *_branch(seq, event.conversation_id, event.supersedes, event.fork_origin),
        write(
            _ADD_MESSAGE,
            event.turn_id,
            event.conversation_id,
            event.version_group_id or event.turn_id,
            "assistant",
            "[]",
            "streaming",
            event.turn_id,
            event.user_message_id,
            event.parent_message_id or event.user_message_id,
            event.version_number,
            event.model,
            event.model_version_id,
            seq,
            timestamp(event.at),
        ),
    ]


# latency_ms: from the turn's start (the row's created_at is started.at) to its
# end, both from event timestamps, so a rebuild computes the same number. Held to
# the column's range (24.8 days either way): an orphaned turn closed when its
# conversation is next touched, a month on, made the end event one Postgres
# refused ("integer out of range"), and the message stayed streaming.
# With content_parts > 0, the content_part events before the end filled the content.
_END_TURN = f"""
WITH ended AS (
    UPDATE messages SET content = CASE WHEN $11 THEN content ELSE $2::jsonb END,
        status = $3, input_tokens = $4, output_tokens = $5, tokens_estimated = $6,
        stop_reason = $7, error_code = $8, error_message = $9, updated_at = $10,
        latency_ms = LEAST(GREATEST(round(extract(epoch FROM $10 - created_at) * 1000),
            -2147483648), 2147483647)::integer
    WHERE id = $1 AND {_unapplied("$13", "$12")}
    RETURNING 1
)
UPDATE conversations SET token_usage_total = token_usage_total + $4 + $5,
    updated_at = $10, last_seq = $12
WHERE id = $13 AND last_seq < $12
"""
_END_STATUS = {Done: "complete", Cancelled: "cancelled", Failed: "failed"}


@READ_MODELS.on(Done, Cancelled, Failed)
def turn_ended(seq: int, event: Done | Cancelled | Failed) -> list[Write]:
    """The turn's final content, tokens and outcome; the conversation's token total
    grows by what the turn consumed, also when it failed or was cancelled."""
    return [
        write(
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
            timestamp(event.at),
            event.content_parts > 0,
            seq,
            event.conversation_id,
        )
    ]


# Pieces arrive in order: a piece of the last block extends it, the first piece
# of a block adds it.
_APPEND_CONTENT_PART = f"""
WITH appended AS (
    UPDATE messages SET content = CASE
        WHEN jsonb_array_length(content) > $2
        THEN jsonb_set(content, ARRAY[$2::text, 'content'],
                       to_jsonb((content->$2->>'content') || $4))
        ELSE content || jsonb_build_array(jsonb_build_object('role', $3::text,
                                                             'content', $4::text))
        END
    WHERE id = $1 AND {_unapplied("$5", "$6")}
)
UPDATE conversations SET last_seq = $6 WHERE id = $5 AND last_seq < $6
"""


@READ_MODELS.on(ContentPart)
def content_part(seq: int, event: ContentPart) -> list[Write]:
    return [
        write(
            _APPEND_CONTENT_PART,
            event.turn_id,
            event.block,
            event.role,
            event.text,
            event.conversation_id,
            seq,
        )
    ]


# ---------------------------------------------------------------- tool calls

# The turn's tool cards, in the order the model asked for them: each call is an
# element of the assistant row's `tool_calls`, pending until its result fills
# result/error/duration_ms (`duration_ms` null = pending).
_ADD_TOOL_CALL = f"""
WITH called AS (
    UPDATE messages SET tool_calls = tool_calls || jsonb_build_array($2::jsonb), updated_at = $3
    WHERE id = $1 AND {_unapplied("$4", "$5")}
)
UPDATE conversations SET last_seq = $5 WHERE id = $4 AND last_seq < $5
"""


@READ_MODELS.on(ToolCall)
def tool_call(seq: int, event: ToolCall) -> list[Write]:
    card = tool_card(event.call_id, event.name, event.arguments)
    return [
        write(
            _ADD_TOOL_CALL,
            event.turn_id,
            _json(card),
            timestamp(event.at),
            event.conversation_id,
            seq,
        )
    ]


# The result goes to the first pending call with its id: ids may repeat across
# the rounds of one turn (a model numbering its calls call_1, call_2 per round).
# With no pending call of that id (its tool_call was not projected), the card is
# added with the result and the arguments unknown, so the page still shows it.
_SET_TOOL_RESULT = f"""
WITH pending AS (
    SELECT (e.i - 1)::integer AS i
    FROM messages x, jsonb_array_elements(x.tool_calls) WITH ORDINALITY AS e(c, i)
    WHERE x.id = $1 AND e.c ->> 'id' = $2 AND e.c -> 'duration_ms' = 'null'::jsonb
    ORDER BY e.i LIMIT 1
), answered AS (
    UPDATE messages m SET
        tool_calls = jsonb_set(m.tool_calls, ARRAY[p.i::text], (m.tool_calls -> p.i) || $3::jsonb),
        updated_at = $4
    FROM pending p
    WHERE m.id = $1 AND {_unapplied("$6", "$7")}
), orphan AS (
    UPDATE messages SET tool_calls = tool_calls || jsonb_build_array($3::jsonb || $5::jsonb),
        updated_at = $4
    WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM pending) AND {_unapplied("$6", "$7")}
)
UPDATE conversations SET last_seq = $7 WHERE id = $6 AND last_seq < $7
"""


@READ_MODELS.on(ToolResult)
def tool_result(seq: int, event: ToolResult) -> list[Write]:
    outcome = {"result": event.result, "error": event.error, "duration_ms": event.duration_ms}
    # the card to add when no call is pending: unknown arguments, then the outcome
    orphan = tool_card(event.call_id, event.name, "")
    for key in outcome:
        del orphan[key]
    return [
        write(
            _SET_TOOL_RESULT,
            event.turn_id,
            event.call_id,
            _json(outcome),
            timestamp(event.at),
            _json(orphan),
            event.conversation_id,
            seq,
        )
    ]


def tool_card(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A pending tool card. `arguments` as an object, as SSE shows it (DESIGN section 6);
    the model's text is kept in `raw_arguments` when it is not a JSON object."""
    parsed = _json_object(arguments)
    card: dict[str, Any] = {"id": call_id, "name": name, "arguments": parsed or {}}
    if parsed is None:
        card["raw_arguments"] = arguments
    card.update(result=None, error=None, duration_ms=None)
    return card


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.strip():
        return {}
    try:
        value = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------- billing

_BILLING_REJECTED = f"""
WITH rejected AS (
    UPDATE messages SET status = 'billing_error', error_code = 'billing_error',
        error_message = $2, updated_at = $3
    WHERE id = $1 AND {_unapplied("$5", "$4")}
    RETURNING 1
)
UPDATE conversations SET updated_at = $3, last_seq = $4 WHERE id = $5 AND last_seq < $4
"""


@READ_MODELS.on(BillingRejected)
def billing_rejected(seq: int, event: BillingRejected) -> list[Write]:
    return [
        write(
            _BILLING_REJECTED,
            event.turn_id,
            f"account {event.account} has {event.available} micro-credits, needs {event.needed}",
            timestamp(event.at),
            seq,
            event.conversation_id,
        )
    ]


# ---------------------------------------------------------------- deletion

_DELETE_MESSAGES = "DELETE FROM messages WHERE conversation_id = $1"
_DELETE_CONVERSATION = "DELETE FROM conversations WHERE id = $1"


@READ_MODELS.on(ConversationDeleted)
def conversation_deleted(seq: int, event: ConversationDeleted) -> list[Write]:
    """The conversation was deleted: every row of it goes. Its log is purged down to
    this tombstone, so a rebuild never makes them; applied again, it finds nothing.
    Its records in `projection_errors` go too, in every projection (registry)."""
    return [
        write(_DELETE_MESSAGES, event.conversation_id),
        write(_DELETE_CONVERSATION, event.conversation_id),
    ]
