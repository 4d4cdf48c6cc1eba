"""The pure half of the poison rule: what an event looks like once its text is storable.

Postgres text and jsonb cannot hold NUL or lone surrogates. An event carrying
them is refused by the store; the projector (`projections/projector.py`) then
tries the event once more as `sanitised` returns it, and records what it did.
Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events.codec import encode, map_strings, storable_text
from events.vocabulary import AnyEvent

SKIPPED = "skipped"
SANITISED = "sanitised"
# Not an event's rule: the checkpoint names a position past the end of the log (it
# was restored from an older copy, or deleted and made again). The projection
# stops until it is rebuilt from the log there is (projections/projector.py).
LOG_BEHIND = "log_behind"


def log_behind_reason(projection: str, position: int, end: int) -> str:
    return (
        f"projection {projection} was applied up to position {position}, but CHAT_EVT ends at"
        f" {end}: the log was restored from an older copy, or deleted and created again, and"
        " the rows are of the log that was. Nothing more is applied until"
        " `parley projections rebuild` builds them from this log"
    )


# Not an event's rule either: entries after the checkpoint were removed from the log
# (a retention limit, a purge) before the projection applied them. It goes on from
# the oldest kept entry; the record says which rows may be missing.
REMOVED = "removed"


def removed_reason(projection: str, first: int, last: int) -> str:
    span = f"position {first}" if first == last else f"positions {first} to {last}"
    return (
        f"projection {projection} had not applied {span} when they were removed from"
        " CHAT_EVT (a retention limit or a purge): the rows they made are missing."
        " `parley projections rebuild` makes the read models match the log as it is now"
    )


def storable(text: str | None) -> str | None:
    return None if text is None else storable_text(text)


def _clean(value: Any) -> Any:
    return map_strings(value, storable_text)


def sanitised(event: AnyEvent) -> AnyEvent | None:
    """The event with text no column can hold replaced by U+FFFD; None if it has none."""
    raw = msgspec.to_builtins(event)
    clean = _clean(raw)
    if clean == raw:
        return None
    result: AnyEvent = msgspec.convert(clean, type=type(event))
    return result


def raw_bytes(event: AnyEvent) -> bytes:
    """The event as JSON, for the record of what could not be applied."""
    return encode(event)
