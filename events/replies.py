"""Requests whose answers come back on one inbox of the connection, matched by a counter.

nats.py's `request` gives every request a future that its reply subscription's
task resolves (the answer built into a `Msg`, queued, and awaited under
`wait_for`), and a batched direct get read through a subscription of its own
costs a SUB, an UNSUB and a queued `Msg` with email-parsed headers per entry.
Under load each of those steps waits for a turn of a busy loop: timed inside
the processes during `parley bench burst` (split), a new actor's read of its
conversation took 3.6-9.4 ms p50 and 24-46 ms p99, the edge's read of a
conversation's last position 1.5-3.1 ms p50 and 13-34 ms p99; in runs
alternating with the old code, 2.6-3.4 / 13-17 and 1.8-2.1 / 15-24 ms after.

`Replies` keeps one wildcard subscription per connection for every answer. On
a `DirectClient` (events.broker) the answers go from the read loop straight to
the waiting call, status lines included (so an end of batch or "no responders"
is read here, from the raw header bytes), and only the caller's own await is
left: one wake-up per request instead of three or more. On another client the
subscription's callback does the same work, a little later.

What may not enter: what is asked or why (events.log and events.publisher decide).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any, Final

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from events.broker import DirectClient


class Answer:
    """One message of an answer: payload, raw headers (b"" when it has none)."""

    __slots__ = ("data", "headers")

    def __init__(self, data: bytes, headers: bytes) -> None:
        self.data = data
        self.headers = headers

    @property
    def status(self) -> str | None:
        """The status code of a status message ("503", "204", "404", ...), else None."""
        headers = self.headers
        if headers[_STATUS_AT : _STATUS_AT + 1] != b" ":
            return None
        return headers[_STATUS_AT + 1 : _STATUS_AT + 4].decode(errors="replace")

    def header(self, name: bytes) -> str | None:
        """The value of header `name` (b"Nats-Sequence"), or None.

        The last one counts: a direct get's answer is the stored entry's own headers
        with the server's appended after them, and a writer may have put any header
        on its entry (a `Nats-Sequence: 999999` taken for the position made every
        reader of the conversation jump past the rest of its log)."""
        at = self.headers.rfind(b"\r\n" + name + b":")
        if at < 0:
            return None
        start = at + len(name) + 3
        end = self.headers.find(b"\r\n", start)
        return self.headers[start:end].strip().decode(errors="replace")


_STATUS_AT = len(b"NATS/1.0")


# How often the time limits of the requests in flight are looked at, so how late
# one may fire. One sweep per connection while anything waits: a timer per
# request (armed, then cancelled by its answer, a few thousand a second) was 4%
# of a worker's CPU at 1,000 turns (py-spy).
_SWEEP_S: Final = 0.05


class _Waiting:
    """One request's answers so far; done at its first answer, or (`until_status`)
    at the first status message after any number of others. `wait_s` bounds the
    silence before each answer, so a long batch is not cut off for being long."""

    __slots__ = ("answers", "deadline", "done", "until_status", "wait_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, wait_s: float, until_status: bool) -> None:
        self.answers: list[Answer] = []
        self.done: asyncio.Future[list[Answer]] = loop.create_future()
        self.wait_s = wait_s
        self.until_status = until_status
        self.deadline = loop.time() + wait_s

    def take(self, answer: Answer) -> None:
        self.answers.append(answer)
        if not self.until_status or answer.status is not None:
            self.done.set_result(self.answers)
            return
        self.deadline = self.done.get_loop().time() + self.wait_s


class Replies:
    """Requests on `nc` whose answers all come back on one subscription of its own."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._starting: asyncio.Lock | None = None
        self._counter = itertools.count(1)
        self._waiting: dict[str, _Waiting] = {}
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Requests still waiting for their answer (none, between calls)."""
        return len(self._waiting)

    async def request(
        self,
        subject: str,
        payload: bytes,
        wait_s: float,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Publish and wait up to `wait_s` for the first answer (a status message too).

        Raises nats.errors.TimeoutError when nothing answers in time."""
        [answer] = await self._ask(subject, payload, wait_s, headers, until_status=False)
        return answer

    async def request_each(
        self, subject: str, requests: Sequence[tuple[bytes, dict[str, str]]], wait_s: float
    ) -> list[Answer | Exception]:
        """Publish every request (payload, headers) in order, back to back, then wait up to
        `wait_s` for each one's first answer: one round trip for them all. Each result is
        the answer, or what failed it (nats.errors.TimeoutError when nothing answered; a
        publish that failed fails every request after it, which is not sent)."""
        if self._sub is None:
            await self._subscribe()
        sent: list[tuple[str, _Waiting]] = []
        failed: Exception | None = None
        try:
            for payload, headers in requests:
                token, waiting = self._wait_for_answer(wait_s, until_status=False)
                sent.append((token, waiting))
                try:
                    await self._nc.publish(
                        subject, payload, reply=self._prefix + token, headers=headers
                    )
                except Exception as err:
                    failed = err
                    sent.pop()
                    self._waiting.pop(token, None)
                    break
            results: list[Answer | Exception] = []
            for _, waiting in sent:
                try:
                    results.append((await waiting.done)[0])
                except nats.errors.TimeoutError as err:
                    results.append(err)
            if failed is not None:
                results += [failed] * (len(requests) - len(results))
            return results
        finally:
            for token, _ in sent:
                self._waiting.pop(token, None)

    async def request_many(self, subject: str, payload: bytes, wait_s: float) -> list[Answer]:
        """Publish and collect every answer up to and including the first status message
        (a batched direct get ends with one); TimeoutError after `wait_s` without an answer."""
        return await self._ask(subject, payload, wait_s, None, until_status=True)

    async def _ask(
        self,
        subject: str,
        payload: bytes,
        wait_s: float,
        headers: dict[str, str] | None,
        *,
        until_status: bool,
    ) -> list[Answer]:
        if self._sub is None:
            await self._subscribe()
        token, waiting = self._wait_for_answer(wait_s, until_status)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await waiting.done
        finally:
            self._waiting.pop(token, None)

    def _wait_for_answer(self, wait_s: float, until_status: bool) -> tuple[str, _Waiting]:
        """A new request's token (its reply subject's last token) and what waits for its
        answers, with the sweep of time limits running."""
        token = str(next(self._counter))
        loop = asyncio.get_running_loop()
        waiting = _Waiting(loop, wait_s, until_status)
        self._waiting[token] = waiting
        if self._sweep is None:
            self._sweep = loop.call_later(_SWEEP_S, self._expire_late)
        return token, waiting

    def _expire_late(self) -> None:
        """Fail every request past its time limit; look again while any waits."""
        self._sweep = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for waiting in self._waiting.values():
            done = waiting.done
            if waiting.deadline <= now and not done.done():
                done.set_exception(nats.errors.TimeoutError())
        self._sweep = loop.call_later(_SWEEP_S, self._expire_late)

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
                self._nc.deliver_directly(sub, self._answered_directly, statuses=True)
            self._prefix = prefix
            self._sub = sub

    async def _answered(self, msg: Msg) -> None:
        # the callback's way: nats.py parsed the headers (and the status line into
        # "Status"); they are written back in the raw form the direct way reads
        raw = b""
        if msg.headers:
            status = msg.headers.get("Status")
            lines = [f"NATS/1.0 {status}" if status else "NATS/1.0"]
            lines += [f"{k}: {v}" for k, v in msg.headers.items() if k != "Status"]
            raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self._take(msg.subject.encode(), msg.data, raw)

    def _answered_directly(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        self._take(subject, data, headers)

    def _take(self, subject: bytes, data: bytes, headers: bytes) -> None:
        waiting = self._waiting.get(subject[len(self._prefix) :].decode())
        if waiting is not None and not waiting.done.done():
            waiting.take(Answer(data, headers))


def no_responders(answer: Answer) -> bool:
    """nats-server's answer when nothing listens on the subject asked."""
    return answer.status == "503" and not answer.data
