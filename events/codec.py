"""One codec for everything that crosses a process boundary.

Decoders are built once at import time; msgspec validates while it decodes, so
a malformed or unknown event raises `msgspec.ValidationError`/`DecodeError`
instead of producing a half-filled object.

Readers of the log never stop at an entry they cannot decode: `decode_entry`
turns it into an `Unreadable` that keeps the raw bytes and says why, so every
reader can skip it, show it or refuse work by its own rule (DESIGN section 1:
no single event stops the system).
"""

from __future__ import annotations

import datetime as dt
import re
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from events.vocabulary import AnyCommand, AnyEvent


def timestamp(ns: int) -> dt.datetime:
    """An event's `at` (nanoseconds since the epoch) as the read models store it: UTC,
    to the microsecond (Postgres's precision). One conversion, so what the edge
    says of an event before its row exists is what the row says after."""
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)


_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_command_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)

KNOWN_EVENT_TYPES: frozenset[str] = frozenset(
    str(cls.__struct_config__.tag) for cls in typing.get_args(AnyEvent)
)


class Unreadable(msgspec.Struct, frozen=True):
    """A log entry this version cannot decode, kept as it was written.

    `known_type` tells the two cases apart: an unknown `type` was written by a
    newer version (skip it: forward compatibility); a known type that does not
    decode, or bytes that are not an event at all, is damage, and whatever it
    meant is lost to this reader.
    """

    raw: bytes
    type: str | None
    error: str
    subject: str = ""  # the log's subject it was read from, where the reader knew it

    @property
    def known_type(self) -> bool:
        return self.type in KNOWN_EVENT_TYPES


class _Head(msgspec.Struct):
    type: str | None = None


_head_decoder = msgspec.json.Decoder(_Head)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# What no read model can hold (Postgres text and jsonb): NUL, and lone surrogates.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def encodable(text: str) -> str:
    """`text` with lone surrogates, which UTF-8 cannot encode, replaced by U+FFFD.

    Python makes them from outside data (`json.loads('"\\ud800"')`, a file read with
    `surrogateescape`): a tool's result, an exception's message.
    """
    return _LONE_SURROGATE.sub("\ufffd", text)


def storable_text(text: str) -> str:
    """`text` with what no read model can hold (`UNSTORABLE`) replaced by U+FFFD."""
    return UNSTORABLE.sub("\ufffd", text)


def map_strings(value: Any, fix: Callable[[str], str]) -> Any:
    """`value` (as `msgspec.to_builtins` makes it) with every string and key through `fix`."""
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, list):
        return [map_strings(v, fix) for v in value]
    if isinstance(value, dict):
        return {fix(k) if isinstance(k, str) else k: map_strings(v, fix) for k, v in value.items()}
    return value


def encode(value: object) -> bytes:
    """JSON; a lone surrogate anywhere in it becomes U+FFFD rather than an append that fails."""
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError:
        return _encoder.encode(map_strings(msgspec.to_builtins(value), encodable))


def decode_event(data: bytes) -> AnyEvent:
    return _event_decoder.decode(data)


def decode_entry(data: bytes) -> AnyEvent | Unreadable:
    """The event in a log entry, or what is known about an entry that is not one."""
    try:
        return _event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as err:
        return Unreadable(raw=bytes(data), type=_type_of(data), error=str(err))
    except RecursionError:
        return Unreadable(raw=bytes(data), type=None, error="nested too deeply to decode")


def _type_of(data: bytes) -> str | None:
    try:
        head = _head_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    return head.type


def decode_command(data: bytes) -> AnyCommand:
    return _command_decoder.decode(data)


def encode_stored(seq: int, event: AnyEvent | Unreadable) -> bytes:
    """One log line: the event's own fields (with its `type`) plus its position `seq`.

    The format of `parley replay --json` and `GET /v1/conversations/{id}/log`. An
    entry this version cannot read is shown, never dropped: `{"seq", "type",
    "unreadable": true, "error", "raw"}`, where `raw` is the entry's JSON when it
    is JSON, else its text.
    """
    if isinstance(event, Unreadable):
        return _encoder.encode(
            {
                "seq": seq,
                "type": event.type,
                "unreadable": True,
                "error": event.error,
                "raw": _raw_value(event.raw),
            }
        )
    body = _encoder.encode(event)
    return b'{"seq":' + str(seq).encode() + b"," + body[1:]


def _raw_value(raw: bytes) -> Any:
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return raw.decode("utf-8", "replace")
