"""Publishing to a JetStream stream and waiting for its ack, at the cost of a plain publish.

A worker appends one event per token of every stream it runs (at 20 tokens/s
each, every token is its own append), so the cost of one acknowledged publish
is paid thousands of times a second. nats.py's `JetStreamContext.publish` is a
request: a fresh inbox from NUID and `secrets`, a `wait_for` around its future,
`json.loads` of the ack and a `PubAck` dataclass. py-spy put that path at 22%
of a worker's samples under `parley bench capacity` (100 turns, split roles).

`AckedPublisher` keeps what a publish needs and drops the rest: its acks
come back through `Replies` (events.replies: one wildcard subscription, a
counter for reply subjects, straight from the read loop on a `DirectClient`,
a timer handle instead of a task), and msgspec decodes them. What it raises is
what `JetStreamContext.publish` raises (nats.js.errors for an error the stream
answered, `NoStreamResponseError` when no stream listens on the subject,
nats.errors.TimeoutError when nothing answers), so a caller's retry rules read
the same.

What may not enter: what is published or why (events.log decides that).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import nats.js.errors

from events.replies import Answer, Replies, no_responders


class _Error(msgspec.Struct):
    code: int
    err_code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    seq: int = 0
    stream: str = ""
    duplicate: bool = False
    error: _Error | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


class AckedPublisher:
    """Publishes to a stream on a connection and returns the stream sequence of each message."""

    def __init__(self, replies: Replies) -> None:
        self._replies = replies

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], wait_s: float
    ) -> int:
        """Publish and wait up to `wait_s` for the stream's ack; the message's stream sequence."""
        return _sequence(await self._replies.request(subject, payload, wait_s, headers))

    async def publish_each(
        self, subject: str, messages: Sequence[tuple[bytes, dict[str, str]]], wait_s: float
    ) -> list[int | Exception]:
        """Publish every message (payload, headers) back to back, before any ack comes, and
        wait up to `wait_s` for each one's: its stream sequence, or what `publish` would
        have raised for it."""
        results: list[int | Exception] = []
        for answer in await self._replies.request_each(subject, messages, wait_s):
            if isinstance(answer, Exception):
                results.append(answer)
                continue
            try:
                results.append(_sequence(answer))
            except Exception as err:
                results.append(err)
        return results


def _sequence(answer: Answer) -> int:
    """The stream sequence an ack gives, or the error it carries, raised."""
    if no_responders(answer):
        raise nats.js.errors.NoStreamResponseError
    ack = _decode_ack(answer.data)
    if ack.error is not None:
        # raises the same class nats.py would: ServiceUnavailableError for a 503, ...
        nats.js.errors.APIError.from_error(msgspec.structs.asdict(ack.error))
    return ack.seq
