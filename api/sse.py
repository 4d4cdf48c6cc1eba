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
from typing import Any

import msgspec

from events.log import StoredEvent
from events.vocabulary import (
    BillingRejected,
    Cancelled,
    Chunk,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
)

PING = b": ping\n\n"
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


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    event: str
    data: Any
    message_id: str | None = None


def envelopes(stored: StoredEvent) -> list[Envelope]:
    """The SSE events a log event turns into (none for bookkeeping events)."""
    event = stored.event
    match event:
        case Started():
            return [
                Envelope(
                    "started",
                    {
                        "turn_id": event.turn_id,
                        "message_id": event.turn_id,
                        "user_message_id": event.user_message_id,
                        "model": event.model,
                    },
                    event.turn_id,
                )
            ]
        case Chunk():
            name = "thinking" if event.kind == "thinking" else "token"
            return [Envelope(name, event.text, event.turn_id)]
        case ToolCall():
            return [
                Envelope(
                    "tool_call",
                    {
                        "id": event.call_id,
                        "name": event.name,
                        "arguments": _json_or_text(event.arguments),
                    },
                    event.turn_id,
                )
            ]
        case ToolResult():
            return [
                Envelope(
                    "tool_result",
                    {
                        "id": event.call_id,
                        "name": event.name,
                        "result": event.result,
                        "error": event.error,
                        "duration_ms": event.duration_ms,
                    },
                    event.turn_id,
                )
            ]
        case Title():
            return [Envelope("title", event.title, event.turn_id)]
        case Done():
            return [Envelope("done", "ok", event.turn_id)]
        case Cancelled():
            return [Envelope("done", "stopped", event.turn_id)]
        case Failed():
            return [
                Envelope("error", {"code": event.code, "message": event.message}, event.turn_id),
                Envelope("done", "error", event.turn_id),
            ]
        case BillingRejected():
            return [
                Envelope(
                    "billing_error",
                    {
                        "account": event.account,
                        "needed": event.needed,
                        "available": event.available,
                        "message": f"insufficient credits: {event.available} of {event.needed} micro-credits",
                    },
                    event.turn_id,
                ),
                Envelope("done", "billing_error", event.turn_id),
            ]
        case _:
            return []


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


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text
