"""Publishing to a JetStream stream and waiting for its ack, at the cost of a plain publish.

A worker appends one event per token of every stream it runs (at 20 tokens/s
each, every token is its own append), so the cost of one acknowledged publish
is paid thousands of times a second. nats.py's `JetStreamContext.publish` is a
request: a fresh inbox from NUID and `secrets`, a `wait_for` around its future,
`json.loads` of the ack and a `PubAck` dataclass. py-spy put that path at 22%
of a worker's samples under `parley bench capacity` (100 turns, split roles).

`AckedPublisher` keeps what a publish needs and drops the rest: one wildcard
subscription receives every ack (straight from the read loop on a
`DirectClient`, events.broker), a counter names each publish's reply
subject, a timer handle (not a task) bounds the wait, and msgspec decodes the
ack. What it raises is what `JetStreamContext.publish` raises (nats.js.errors
for an error the stream answered, `NoStreamResponseError` when no stream
listens on the subject, nats.errors.TimeoutError when nothing answers), so a
caller's retry rules read the same.

What may not enter: what is published or why (events.log decides that).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from events.broker import DirectClient

_NO_RESPONDERS = "503"
_STATUS = "Status"


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
_Answer = tuple[bytes, dict[str, str] | None]


class AckedPublisher:
    """Publishes to a stream on `nc` and returns the stream sequence of each message."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._starting: asyncio.Lock | None = None
        self._counter = itertools.count(1)
        # token -> the answer's payload and headers (headers only on a status message)
        self._waiting: dict[str, asyncio.Future[_Answer]] = {}

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], wait_s: float
    ) -> int:
        """Publish and wait up to `wait_s` for the stream's ack; the message's stream sequence."""
        if self._sub is None:
            await self._subscribe()
        token = str(next(self._counter))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_Answer] = loop.create_future()
        self._waiting[token] = answer
        expiry = loop.call_later(wait_s, _expire, answer)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            data, headers_back = await answer
        finally:
            expiry.cancel()
            self._waiting.pop(token, None)
        return _sequence(data, headers_back)

    async def _subscribe(self) -> None:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._sub is not None:
                return
            prefix = self._nc.new_inbox() + "."
            # nats.py re-creates the subscription after a reconnect, on the same subject
            sub = await self._nc.subscribe(prefix + "*", cb=self._answered)
            if isinstance(self._nc, DirectClient):
                self._nc.deliver_directly(sub, self._answered_directly)
            self._prefix = prefix
            self._sub = sub

    async def _answered(self, msg: Msg) -> None:
        self._resolve(msg.subject, msg.data, msg.headers)

    def _answered_directly(self, subject: bytes, reply: bytes, data: bytes) -> None:
        self._resolve(subject.decode(), data, None)

    def _resolve(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        answer = self._waiting.pop(subject[len(self._prefix) :], None)
        if answer is not None and not answer.done():
            answer.set_result((data, headers))


def _expire(answer: asyncio.Future[_Answer]) -> None:
    if not answer.done():
        answer.set_exception(nats.errors.TimeoutError())


def _sequence(data: bytes, headers: dict[str, str] | None) -> int:
    if not data and headers and headers.get(_STATUS) == _NO_RESPONDERS:
        raise nats.js.errors.NoStreamResponseError
    ack = _decode_ack(data)
    if ack.error is not None:
        # raises the same class nats.py would: ServiceUnavailableError for a 503, ...
        nats.js.errors.APIError.from_error(msgspec.structs.asdict(ack.error))
    return ack.seq
