"""One codec for everything that crosses a process boundary.

Decoders are built once at import time; msgspec validates while it decodes, so
a malformed or unknown event raises `msgspec.ValidationError`/`DecodeError`
instead of producing a half-filled object.
"""

from __future__ import annotations

import msgspec

from events.vocabulary import AnyCommand, AnyEvent

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_command_decoder = msgspec.json.Decoder(AnyCommand)


def encode(value: object) -> bytes:
    return _encoder.encode(value)


def decode_event(data: bytes) -> AnyEvent:
    return _event_decoder.decode(data)


def decode_command(data: bytes) -> AnyCommand:
    return _command_decoder.decode(data)


def encode_stored(seq: int, event: object) -> bytes:
    """One log line: the event's own fields (with its `type`) plus its position `seq`.

    The format of `parley replay --json` and `GET /v1/conversations/{id}/log`.
    """
    body = _encoder.encode(event)
    return b'{"seq":' + str(seq).encode() + b"," + body[1:]
