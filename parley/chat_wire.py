"""The SSE stream of parley's API as `parley chat` reads it (DESIGN section 6). Pure.

`SseDecoder` turns the bytes of a text/event-stream, however the network cuts
them, into `WireEvent`s; `id_order` puts the events' ids in their order, which
is how a resumed stream's repeats are recognised. No I/O and nothing of how an
event looks: that is `parley/chat_view.py`.
"""

from __future__ import annotations

from typing import Any

import msgspec


class WireEvent(msgspec.Struct, frozen=True):
    """One SSE event as parley sends it: the envelope `{"event", "data", ...}` and its id."""

    id: str | None
    event: str
    data: Any
    message_id: str | None = None
    code: str | None = None
    raw_arguments: str | None = None


class _Envelope(msgspec.Struct, frozen=True):
    event: str
    data: Any = None
    message_id: str | None = None
    code: str | None = None
    raw_arguments: str | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


class SseDecoder:
    """text/event-stream bytes -> events. Fields other than `id` and `data` (`retry`,
    `event`) and comments (`: ping`) are read past. Make one per connection: a frame
    cut off by a dropped connection must not run into the next stream's first.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[WireEvent]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out: list[WireEvent] = []
        for raw in lines:
            # whole lines only: a UTF-8 character cut between two chunks is whole here
            line = raw.decode("utf-8", "replace").removesuffix("\r")
            if line == "":
                event = self._dispatch()
                if event is not None:
                    out.append(event)
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                self._id = value
            elif name == "data":
                self._data.append(value)
        return out

    def _dispatch(self) -> WireEvent | None:
        event_id, data = self._id, self._data
        self._id, self._data = None, []
        if not data:
            return None
        try:
            envelope = _decode_envelope("\n".join(data))
        except msgspec.DecodeError:
            return None  # not parley's envelope: nothing a person could be shown
        return WireEvent(
            id=event_id,
            event=envelope.event,
            data=envelope.data,
            message_id=envelope.message_id,
            code=envelope.code,
            raw_arguments=envelope.raw_arguments,
        )


# A whole log event `N` comes after every piece `N-i` made from it (api/sse.py).
_WHOLE = 1 << 62


def id_order(event_id: str) -> tuple[int, int] | None:
    """Where an SSE id stands in its conversation's order; None for an id parley does not write."""
    head, dash, piece = event_id.partition("-")
    if not head.isdigit() or not head.isascii() or (dash and not piece.isdigit()):
        return None
    return int(head), int(piece) if dash else _WHOLE
