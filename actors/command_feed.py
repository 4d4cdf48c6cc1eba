"""A partition's commands, delivered the moment the consumer has them: a continuous pull.

nats.py's `fetch` asks the consumer for commands a request at a time and
waits out each answer message by message; under load a command waited in the
consumer for its partition's next fetch. Timed inside the processes at 1,000
turns (`parley bench capacity`, scratch marks), a command took 1.4-1.5 s p50
from its publish to its fetch, 2.6 s p90: the largest part of a turn's time to
first token.

A `CommandFeed` keeps up to `window` commands asked for, as nats.go's
`Consume` does: each arrives on the feed's inbox as soon as the consumer
holds it, and when half the window has arrived the rest is asked for again.
The server answers a request that expires, or that it ends, with a 408 or
409 status naming how many of its messages it did not send, and sends an idle
heartbeat every `heartbeat_s` while a request waits. So:

- what was asked for and not sent is asked for again;
- a feed that hears nothing for three heartbeats (its requests were lost with
  a connection) asks for a whole window again;
- a consumer that is deleted under it ends the feed with `ConsumerGone`
  (the server says so to waiting requests; a request nobody answers asks
  `exists`, as a stream leader in election answers none either).

While `may_ask` says no (the worker's lease on the partition is in doubt after
an outage or a pause: another worker may hold it by now), the feed asks for
nothing and the commands wait in the consumer for whoever owns it.

Closing the feed (`stop`) asks for nothing more and waits until the server
holds none of its requests (each answered in full, or expired: `expires_s`),
handing what still arrives meanwhile to `late`, then drains its inbox. The
wait keeps order: a command handed back (`nak`) while a request of ours is
still open at the server goes to that request, whose reply subject nobody
listens to any more, and comes back behind the commands after it. A feed
that is cancelled instead (its partition was lost: another worker reads it
now) drains at once and hands back whatever still arrives. Either way no
command is left unacknowledged to wait out its 30 s ack wait, and one
published after the close goes to the partition's next reader
(tests/test_command_feed.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

# A request waits this long at the server for commands before it expires (and a
# closing feed at most this long for its last request to end).
EXPIRES_S = 2.0
HEARTBEAT_S = 1.0
WINDOW = 64
_HEARD_WITHIN = 3  # heartbeats
_DRAIN_S = 2.0


class ConsumerGone(Exception):
    """The consumer the feed reads was deleted."""


class _Request(msgspec.Struct):
    batch: int
    expires: int  # ns
    idle_heartbeat: int  # ns


class CommandFeed:
    """Commands of one durable pull consumer, handed to `deliver` in the consumer's order."""

    def __init__(
        self,
        nc: NatsClient,
        api_prefix: str,
        stream: str,
        consumer: str,
        deliver: Callable[[Msg], Awaitable[None]],
        exists: Callable[[], Awaitable[bool]],
        *,
        late: Callable[[Msg], Awaitable[None]] | None = None,
        may_ask: Callable[[], bool] = lambda: True,
        window: int = WINDOW,
        expires_s: float = EXPIRES_S,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._deliver = deliver
        self._exists = exists
        self._late = late  # None: what arrives while closing is handed back at once
        self._may_ask = may_ask  # false: ask for nothing more for now (a lease in doubt)
        self._window = window
        self._expires_s = expires_s
        self._heartbeat_s = heartbeat_s
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._asked = 0  # asked for and neither received nor given up by the server
        self._heard = time.monotonic()
        self._gone = asyncio.Event()
        self._ask_if_gone = False  # a request had no responder: is the consumer there?
        self._closing = False
        self._abandoned = False  # cancelled, or the consumer is gone: do not wait
        self._settled = asyncio.Event()  # while closing: a request ended, or a command came

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver commands until `stop` is set; ConsumerGone if the consumer is deleted."""
        self._sub = await self._nc.subscribe(self._inbox, cb=self._received)
        try:
            while not stop.is_set():
                if self._ask_if_gone:
                    self._ask_if_gone = False
                    if not await self._exists():
                        self._gone.set()
                if self._gone.is_set():
                    raise ConsumerGone(self._next)
                if not self._nc.is_connected:
                    self._asked = 0  # requests die with the connection
                elif time.monotonic() - self._heard > _HEARD_WITHIN * self._heartbeat_s:
                    self._asked = 0  # nothing heard: the server no longer holds them
                    self._heard = time.monotonic()
                await self._top_up()
                waiting = asyncio.ensure_future(stop.wait())
                gone = asyncio.ensure_future(self._gone.wait())
                try:
                    await asyncio.wait(
                        (waiting, gone),
                        timeout=self._heartbeat_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiting.cancel()
                    gone.cancel()
        finally:
            self._closing = True
            task = asyncio.current_task()
            # cancelled (another worker reads the partition now), or the consumer is
            # gone (and its requests with it): nothing to wait for
            self._abandoned = (task is not None and task.cancelling() > 0) or self._gone.is_set()
            try:
                if not self._abandoned:
                    await self._requests_over()
                sub, self._sub = self._sub, None
                # what the server sent before it heard still arrives (`_received`)
                async with asyncio.timeout(_DRAIN_S):
                    await sub.drain()
            except (nats.errors.Error, TimeoutError):
                pass  # the connection is gone, and the requests with it

    async def _requests_over(self) -> None:
        """Until the server holds no request of ours (or one should have expired)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._expires_s + _DRAIN_S):
                while self._asked > 0 and self._nc.is_connected:
                    self._settled.clear()
                    await self._settled.wait()

    @property
    def closing(self) -> bool:
        """Stopped: nothing more is asked for, and what still arrives goes to `late`."""
        return self._closing

    async def _top_up(self) -> None:
        """Ask for what the window lacks, once half of it has arrived."""
        lacking = self._window - self._asked
        if lacking < self._window // 2 or not self._nc.is_connected or self._sub is None:
            return
        if not self._may_ask():
            return
        request = _Request(
            batch=lacking,
            expires=int(self._expires_s * 1e9),
            idle_heartbeat=int(self._heartbeat_s * 1e9),
        )
        self._asked += lacking
        try:
            await self._nc.publish(self._next, msgspec.json.encode(request), reply=self._inbox)
        except nats.errors.Error:
            self._asked -= lacking  # not sent: asked again on the next round

    async def _received(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            self._asked = max(0, self._asked - 1)
            if not self._closing:
                await self._deliver(msg)
            elif self._late is not None and not self._abandoned:
                await self._late(msg)
            else:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()
        elif status in ("408", "409"):
            # The request expired or the server ended it: what it did not send
            unsent = int(headers.get("Nats-Pending-Messages", "0") or 0)
            self._asked = max(0, self._asked - unsent)
            if "Consumer Deleted" in headers.get("Description", ""):
                self._gone.set()
        elif status == "503":  # no responders: no consumer, or no leader yet
            self._asked = 0
            self._ask_if_gone = True
        # 100: an idle heartbeat; 404: nothing there (no_wait, which we do not ask)
        if self._closing:
            self._settled.set()
        elif status != "503":  # after a 503, asked again on the next round, not at once
            await self._top_up()
