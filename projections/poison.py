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
