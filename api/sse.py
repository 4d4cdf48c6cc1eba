"""The SSE wire format (DESIGN section 6), as pure functions.

One log event becomes zero, one or two SSE events. Each SSE event's `id:` is
the log position it came from: `N` when it is the last (or only) SSE event made
from log event N, `N-i` for the i-th of several before the last. A viewer that
resumes from `N` has seen all of event N; from `N-i`, the pieces up to i. Ids
are therefore monotonic per conversation and resuming never repeats or skips.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec

from events.codec import Unreadable, encodable, map_strings
from events.log import StoredEvent
from events.vocabulary import (
    BillingRejected,
    Cancelled,
    Chunk,
    CommandRejected,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
)

PING = b": ping\n\n"
# The last words of a stream the edge ends because it is stopping (a deploy, a
# scale-down): a comment, which an EventSource ignores before it reconnects with the
# last id it saw, as any client of the stream may (README "Stopping an edge").
STOPPING = b": this server is stopping; reconnect with Last-Event-ID to go on\n\n"
# ... of a stream whose token was refused from then on: what a new request with it
# would be (a token's expiry bounds what it may read, also on a stream open for hours)
EXPIRED = b": your token expired; reconnect with a fresh one and Last-Event-ID to go on\n\n"
_encoder = msgspec.json.Encoder()
# ASCII digits only (\d would take "١٢"), and small enough for a JetStream uint64 sequence.
_POSITION = re.compile(r"^([0-9]{1,18})(?:-([0-9]{1,3}))?$")


class Position(msgspec.Struct, frozen=True):
    """Where a viewer is: log sequence `seq` fully seen, or only its pieces up to `piece`."""

    seq: int
    piece: int | None = None

    def after(self) -> int:
        """The log position to follow from (events with a greater sequence)."""
        return self.seq if self.piece is None else self.seq - 1

    def wants(self, seq: int, piece: int, last_piece: int) -> bool:
        if seq > self.seq:
            return True
        if seq < self.seq or self.piece is None:
            return False
        return piece > self.piece


def parse_position(raw: str) -> Position | None:
    match = _POSITION.fullmatch(raw.strip())
    if match is None:
        return None
    piece = match.group(2)
    return Position(seq=int(match.group(1)), piece=int(piece) if piece is not None else None)


class StartedData(msgspec.Struct, frozen=True):
    turn_id: str
    message_id: str
    user_message_id: str
    model: str


class ToolCallData(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: dict[str, Any]


class ToolResultData(msgspec.Struct, frozen=True):
    id: str
    name: str
    result: str | None
    error: str | None
    duration_ms: float


class TitleData(msgspec.Struct, frozen=True):
    title: str


DoneData = Literal["ok", "stopped", "billing_error", "error"]

# The `data` of each SSE event, DESIGN section 6; /openapi.json describes the
# stream from this table (api/openapi.py), and `envelopes` builds these types.
DATA_SHAPES: dict[str, Any] = {
    "started": StartedData,
    "thinking": str,
    "token": str,
    "tool_call": ToolCallData,
    "tool_result": ToolResultData,
    "title": TitleData,
    "billing_error": str,
    "error": str,
    "done": DoneData,
}


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """One SSE event. `data` has exactly the shape the original frontend reads
    (DESIGN section 6); anything more rides beside it in the envelope."""

    event: str
    data: Any
    message_id: str | None = None
    code: str | None = None  # on `error` and `billing_error`: the machine-readable reason
    raw_arguments: str | None = None  # on `tool_call`, when they are not a JSON object
    # on `started` and `done`: how many earlier messages the turn's model calls left
    # out of its history for the rest to fit in the model's context window (none: 0)
    history_omitted: int | None = None


def envelopes(stored: StoredEvent) -> list[Envelope]:
    """The SSE events a log event turns into (none for bookkeeping events)."""
    event = stored.event
    match event:
        case Unreadable():
            return []  # a newer version's event, or damage: the viewer steps past it
        case Started():
            return [
                Envelope(
                    "started",
                    StartedData(
                        turn_id=event.turn_id,
                        message_id=event.turn_id,
                        user_message_id=event.user_message_id,
                        model=event.model,
                    ),
                    event.turn_id,
                    history_omitted=event.history_omitted or None,
                )
            ]
        case Chunk():
            name = "thinking" if event.kind == "thinking" else "token"
            return [Envelope(name, event.text, event.turn_id)]
        case ToolCall():
            arguments = _json_object(event.arguments)
            return [
                Envelope(
                    "tool_call",
                    ToolCallData(id=event.call_id, name=event.name, arguments=arguments or {}),
                    event.turn_id,
                    # the model's text, when it is not a JSON object the frontend can show
                    raw_arguments=event.arguments if arguments is None else None,
                )
            ]
        case ToolResult():
            return [
                Envelope(
                    "tool_result",
                    ToolResultData(
                        id=event.call_id,
                        name=event.name,
                        result=event.result,
                        error=event.error,
                        duration_ms=event.duration_ms,
                    ),
                    event.turn_id,
                )
            ]
        case Title():
            return [Envelope("title", TitleData(title=event.title), event.turn_id)]
        case Done():
            return [Envelope("done", "ok", event.turn_id, history_omitted=_omitted(event))]
        case Cancelled():
            return [Envelope("done", "stopped", event.turn_id, history_omitted=_omitted(event))]
        case Failed():
            return [
                Envelope("error", event.message, event.turn_id, code=event.code),
                Envelope("done", "error", event.turn_id, history_omitted=_omitted(event)),
            ]
        case CommandRejected():
            message_id = event.message_id or None
            return [
                Envelope("error", event.message, message_id, code=event.code),
                Envelope("done", "error", message_id),
            ]
        case BillingRejected():
            return [
                Envelope(
                    "billing_error",
                    f"insufficient credits: the account {event.account} has "
                    f"{event.available} micro-credits, this turn needs {event.needed}",
                    event.turn_id,
                    code="insufficient_credits",
                ),
                Envelope("done", "billing_error", event.turn_id),
            ]
        case _:
            return []


def _omitted(end: Done | Cancelled | Failed) -> int | None:
    return end.history_omitted or None


def frames(stored: StoredEvent, position: Position | None = None) -> list[bytes]:
    """The encoded SSE events of one log event, minus those a viewer at `position` has seen."""
    pieces = envelopes(stored)
    last = len(pieces) - 1
    out: list[bytes] = []
    for i, envelope in enumerate(pieces):
        if position is not None and not position.wants(stored.seq, i, last):
            continue
        event_id = str(stored.seq) if i == last else f"{stored.seq}-{i}"
        out.append(frame(event_id, envelope))
    return out


def frame(event_id: str | None, envelope: Envelope) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id is not None else b""
    return head + b"data: " + _encoder.encode(envelope) + b"\n\n"


def json_value(text: str) -> Any:
    """The JSON value in `text` (a model's tool arguments, a tool's result), its strings
    made encodable; ValueError when there is none.

    The text comes from outside, and Python's parser turns some valid JSON into what
    nothing here can use: a lone surrogate escape (`"\\ud800"`) into a string no
    encoder takes, a number of more than 4,300 digits into a ValueError of its own,
    deep nesting into a RecursionError. Either way, raised while a conversation's
    entry was turned into frames, the edge's feed of the conversation ended for every
    viewer, and again for each one that resumed from before it.
    """
    try:
        return map_strings(json.loads(text), encodable)
    except RecursionError as err:
        raise ValueError("nested too deeply") from err


def _json_object(text: str) -> dict[str, Any] | None:
    """The arguments as an object; None when the model wrote something else."""
    if not text.strip():
        return {}
    try:
        value = json_value(text)
    except ValueError:  # json.JSONDecodeError is one
        return None
    return value if isinstance(value, dict) else None
