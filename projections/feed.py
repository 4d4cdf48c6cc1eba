"""How a projector reads CHAT_EVT: every entry after a position, in order, at full speed.

A projector reads far more than a viewer does: a rebuild reads the whole log,
and most of it is `chunk` events it skips. `events.follow.LogFollower` (push,
one `next_msg` per entry) tops out near 15,000 entries/s and, when Postgres is
slower than the server pushes, overflows the client buffer and starts over. So
projectors pull instead:

- an ephemeral pull consumer, no acks, delivering from the next position we need;
- we ask for entries in requests of `window` and keep at most two requests
  open, so at most 2 x `window` entries are ever in flight or buffered: the
  server cannot outrun us, however slow the batch in hand is;
- entries are taken straight from the subscription's queue, as many as are
  there (nats.py's `next_msg` costs a task per entry, a callback a coroutine);
- every delivery carries its consumer sequence: a gap means an entry was lost
  on the way, and we start a new consumer right after the last entry handed out;
- a request that expires, or a consumer the server forgot (restart, inactivity),
  is replaced; a silence longer than `watchdog_s` checks that the consumer exists.

A projector that keeps up reads a trickle, and two open requests make the
server send each entry on its own as it is stored: a wake-up of the projector,
a write of the server's and a read of ours per entry, 5,000 a second at 250
turns of `parley bench capacity`. Given `gather_s`, a feed that has caught up
asks instead for one entry (which wakes it), waits `gather_s` while the
server holds what follows, then asks with `no_wait` for what has gathered, up
to the batch's limit: that comes at once, in a few writes. While behind (a
batch came full) it asks for the next batch as it hands one out, so that one
arrives while the caller applies the other. Given `busy_gather_s` too, a
batch that came large lets the next one gather longer: fewer, larger batches
while the log is busy (a projector's transaction costs the same for one entry
as for a hundred), the short wait again once the log is quiet.

Every entry an append wrote carries three headers, and nats.py parses them
into a dict for every message it receives: measured, 40% of the time it takes
to read the log. A projector never reads them, so give it a connection of its
own made by `connect` here (`events.broker.EntryClient`), which parses status
lines only.
So read, one process takes ~60,000 entries/s off a million-entry log here,
most of it nats.py's protocol parser (py-spy).

Nothing here decodes an event: entries go out as bytes with their position, and
the projector decides what to decode. Nothing here writes to Postgres either.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from events.broker import EntryClient, NatsSecurity, connect_client
from events.errors import describe
from events.follow import RawEvent, reader_consumer
from events.ids import new_id
from events.subjects import EVT_STREAM, EVT_SUBJECTS

log = logging.getLogger(__name__)


async def connect(
    url: str,
    *,
    name: str,
    reconnect_forever: bool = True,
    security: NatsSecurity | None = None,
) -> EntryClient:
    """A connection for a projector or a rebuild to read the log through.

    `url` as every process takes it (events/broker.py): one server or the
    comma-separated nodes of a cluster, tried in the order given. A projector
    (a role) reconnects for ever; a one-shot command passes
    `reconnect_forever=False` and gives up as the other commands do.
    """
    return await connect_client(
        EntryClient(), url, name=name, reconnect_forever=reconnect_forever, security=security
    )


class LogBehind(Exception):
    """The log ends before a position already read from it: it is not the same log."""


async def log_end(js: JetStreamContext) -> int:
    """CHAT_EVT's last position (kept when entries are removed from its start)."""
    return int((await js.stream_info(EVT_STREAM)).state.last_seq)


# A request waits this long on the server for entries before it expires (408).
_REQUEST_EXPIRES_S = 20.0
# A `no_wait` request is answered at once; one unanswered after this was lost
# with its connection, and the feed starts again after the last entry handed out.
_ANSWER_S = 10.0
# `close` deletes the feed's consumer within this, else leaves it to the server,
# which removes it once it has had no reader for a minute (`reader_consumer`): a
# server that stopped answering held a stopping projector JetStream's 5 s.
_DELETE_WITHIN_S = 1.0
_STATUS = "Status"
_DESCRIPTION = "Description"


class LogFeed:
    """Raw CHAT_EVT entries after `after`, in stream order, pulled in windows."""

    def __init__(
        self,
        js: JetStreamContext,
        after: int,
        *,
        window: int = 2000,
        filter_subject: str = EVT_SUBJECTS,
        watchdog_s: float = 10.0,
        gather_s: float = 0.0,
        busy_gather_s: float | None = None,
        busy_batch: int = 0,
    ) -> None:
        """`gather_s` > 0: a feed that has caught up lets entries gather that long on
        the server before it takes them (the module's doc). With `busy_gather_s`, a
        batch of `busy_batch` entries or more says the log is busy, and the next batch
        gathers `busy_gather_s` instead, until a smaller batch comes again."""
        self._js = js
        # The pull protocol is a publish and a subscription on the client that made
        # this context; nats.py keeps it here, and its own pull subscription hands
        # entries out one awaited call at a time.
        self._nc: Any = js._nc
        self._api: str = js._prefix
        self.last = after  # the last sequence handed out
        self._window = window
        self._filter = filter_subject
        self._watchdog_s = watchdog_s
        self._consumer = ""
        self._inbox = ""
        self._sub: Any = None
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        # open requests, oldest first: reply subject -> entries it may still deliver
        self._open: dict[str, int] = {}
        self._next_dseq = 1
        self._broken = False  # a gap or a vanished consumer: start again after `last`
        self._silent_s = 0.0
        # > 0: ask for what has gathered rather than keep requests open (module doc)
        self._gather_s = gather_s
        self._busy_gather_s = gather_s if busy_gather_s is None else busy_gather_s
        self._busy_batch = busy_batch
        self.gathering_s = gather_s  # what the next batch gathers
        self._ahead = ""  # a request sent as a full batch went out: more was waiting

    async def next_batch(
        self, limit: int, wait_s: float, *, stop: asyncio.Event | None = None
    ) -> list[RawEvent]:
        """Up to `limit` entries, as soon as there is one; [] after `wait_s` of silence,
        or as soon as `stop` is set (a stopping reader does not wait out the silence)."""
        if self._sub is None:
            await self._start()
        if self._broken:
            await self._restart()
        if self._gather_s > 0:
            return await self._gathered(limit, wait_s, stop)
        await self._request_more()
        out: list[RawEvent] = []
        self._take(out, limit)
        if not out and not self._broken:
            if not await self._handle_next(out, wait_s, stop):
                return []
            self._take(out, limit)
        self._silent_s = 0.0
        if out:
            self.last = out[-1].seq
        return out

    async def _gathered(
        self, limit: int, wait_s: float, stop: asyncio.Event | None
    ) -> list[RawEvent]:
        """`next_batch` of a feed given `gather_s`: the first entry wakes us, the rest
        of the batch is asked for once it has gathered on the server."""
        out: list[RawEvent] = []
        ahead, self._ahead = self._ahead, ""
        if ahead:
            await self._take_answer(ahead, out, stop)
        else:
            self._take(out, limit)  # one that came as the last call stopped waiting
            if not out:
                if not self._open:
                    await self._ask(1, expires_s=_REQUEST_EXPIRES_S)
                if not await self._handle_next(out, wait_s, stop):
                    return []
                if not out:
                    return []  # the request expired or ended: the next call asks again
                self._silent_s = 0.0
                await asyncio.sleep(self.gathering_s)
            if len(out) < limit and not self._broken:
                request = await self._ask(limit - len(out), no_wait=True)
                await self._take_answer(request, out, stop)
        busy = self._busy_batch > 0 and len(out) >= self._busy_batch
        self.gathering_s = self._busy_gather_s if busy else self._gather_s
        if len(out) >= limit and not self._broken:
            # behind: the next batch comes while the caller applies this one
            self._ahead = await self._ask(limit, no_wait=True)
        if out:
            self.last = out[-1].seq
        return out

    async def _handle_next(
        self, out: list[RawEvent], wait_s: float, stop: asyncio.Event | None
    ) -> bool:
        """The next delivery, waited for up to `wait_s`, handled into `out`; False after
        that silence (counted towards the watchdog) or once `stop` is set."""
        first = await _first(self._queue, stop, wait_s)
        if first is None:
            if stop is None or not stop.is_set():  # a stopping reader asks nothing more
                await self._on_silence(wait_s)
            return False
        self._handle(first, out)
        return True

    async def _take_answer(
        self, request: str, out: list[RawEvent], stop: asyncio.Event | None
    ) -> None:
        """Entries until `request` is closed: by its count, or by the status that ends
        a `no_wait` request with less; only those that came, once `stop` is set.

        An answer is owed at once, but a server that stopped answering (frozen, a
        network cut) owes it for ever: a projector told to stop then waited out
        `_ANSWER_S` here before it saw the stop. The entries taken so far are a
        prefix of the log's, and the caller stops: nothing is passed over."""
        if stop is None:
            await self._answer(request, out)
            return
        taking = asyncio.ensure_future(self._answer(request, out))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({taking, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            taking.cancel()  # a cancelled get leaves its message in the queue
        if taking.done() and not taking.cancelled():
            taking.result()

    async def _answer(self, request: str, out: list[RawEvent]) -> None:
        try:
            async with asyncio.timeout(_ANSWER_S):
                while request in self._open and not self._broken:
                    self._handle(await self._queue.get(), out)
        except TimeoutError:
            log.warning("feed request unanswered; starting again", extra={"after": self.last})
            self._broken = True

    def _take(self, out: list[RawEvent], limit: int) -> None:
        """What already arrived, up to `limit` entries, without waiting.

        Straight from the subscription's queue (nats.py's own fetch does the
        same): a callback or `next_msg` per entry costs a coroutine or a task
        each, the largest cost of reading a million entries.
        """
        queue = self._queue
        while len(out) < limit and not self._broken and not queue.empty():
            self._handle(queue.get_nowait(), out)

    async def close(self) -> str | None:
        """Stop reading. None once the server deleted the feed's consumer, else why it
        did not (it removes the consumer itself a minute later)."""
        sub, consumer, self._sub = self._sub, self._consumer, None
        self._open.clear()
        if sub is None:
            return None
        try:
            await sub.unsubscribe()
        except nats.errors.Error as err:  # the connection is closing: the server forgets it
            log.debug("feed unsubscribe skipped", extra={"error": describe(err)})
        try:
            async with asyncio.timeout(_DELETE_WITHIN_S):
                await self._js.delete_consumer(EVT_STREAM, consumer)
        except TimeoutError:
            return f"the server did not answer within {_DELETE_WITHIN_S:g} s"
        except (nats.errors.Error, nats.js.errors.Error) as err:
            # gone already, or the server is unreachable: inactive_threshold removes it
            log.debug(
                "feed consumer not deleted", extra={"consumer": consumer, "error": describe(err)}
            )
            return describe(err)
        return None

    # ------------------------------------------------------------ consumer

    async def _start(self) -> None:
        end = await log_end(self._js)
        if self.last > end:
            # The log was replaced under us (restored from an older copy, deleted and
            # made again): a consumer from `last` would wait, silent, for positions
            # the new log reuses, and hand out what comes after them.
            raise LogBehind(
                f"the log ends at {end}, before position {self.last} that this feed"
                " reached: it was restored from an older copy, or deleted and created again"
            )
        self._consumer = f"parley-feed-{new_id()}"
        config = reader_consumer(self._filter, self.last, name=self._consumer)
        await self._js.add_consumer(EVT_STREAM, config)
        self._inbox = self._nc.new_inbox()
        # Sized above what two open requests can deliver: nats.py never drops for us.
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*",
            pending_msgs_limit=4 * self._window + 100,
            pending_bytes_limit=0,  # 0: no byte limit (content_part entries are large)
        )
        self._queue = self._sub._pending_queue
        self._next_dseq = 1
        self._broken = False
        self._silent_s = 0.0
        self._ahead = ""

    async def _restart(self) -> None:
        await self.close()
        await self._start()

    async def _request_more(self) -> None:
        """Ask for another window while what is requested and not yet handed out (queued
        here or still on the way) stays within two windows."""
        requested = sum(self._open.values())
        while len(self._open) < 2 and requested + self._window <= 2 * self._window:
            await self._ask(self._window, expires_s=_REQUEST_EXPIRES_S)
            requested += self._window

    async def _ask(self, batch: int, *, expires_s: float = 0.0, no_wait: bool = False) -> str:
        """One pull request for up to `batch` entries; its reply subject."""
        subject = f"{self._inbox}.{new_id()}"
        self._open[subject] = batch
        body: dict[str, Any] = {"batch": batch}
        if expires_s:
            body["expires"] = int(expires_s * 1e9)
        if no_wait:
            body["no_wait"] = True  # answered at once, with what there is (404: nothing)
        await self._nc.publish(
            f"{self._api}.CONSUMER.MSG.NEXT.{EVT_STREAM}.{self._consumer}",
            json.dumps(body).encode(),
            reply=subject,
        )
        return subject

    def _handle(self, msg: Msg, out: list[RawEvent]) -> None:
        # (nats.py's count of queued bytes is left as it is: our subscription has no
        # byte limit, and nothing else reads it.)
        headers = msg.headers
        status = None if headers is None else headers.get(_STATUS)
        if status is not None:
            if status == "100":
                return  # a heartbeat: the request is still open
            # 408 the request expired, 409 the server ended it (max waiting, consumer
            # deleted, leadership change), 404 nothing to deliver: it is closed.
            # Status messages come on the request's own reply subject.
            self._open.pop(msg.subject, None)
            if status == "409" and "Deleted" in (msg.headers or {}).get(_DESCRIPTION, ""):
                self._broken = True
            elif status == "503":
                # no responders: the consumer is gone (a request sent after the server
                # forgot it); asking again would be answered the same, at once, for ever
                self._broken = True
            return
        # Entries come with their own subject, not the request's: the server fills
        # waiting requests oldest first, so count them against the oldest.
        for subject, left in self._open.items():
            if left <= 1:
                del self._open[subject]
            else:
                self._open[subject] = left - 1
            break
        seq, dseq = _sequences(msg.reply)
        if dseq != self._next_dseq:
            self._broken = True  # lost on the way: resume after the last handed out
            return
        self._next_dseq += 1
        out.append(RawEvent(seq=seq, data=msg.data, subject=msg.subject))

    async def _on_silence(self, waited: float) -> None:
        self._silent_s += waited
        if self._broken or self._silent_s < self._watchdog_s:
            return
        self._silent_s = 0.0
        try:
            await self._js.consumer_info(EVT_STREAM, self._consumer)
        except nats.js.errors.NotFoundError:
            self._broken = True


async def _first(
    queue: asyncio.Queue[Msg], stop: asyncio.Event | None, wait_s: float
) -> Msg | None:
    """The next message, waiting up to `wait_s`; None after that, or once `stop` is set."""
    getter = asyncio.ensure_future(queue.get())
    waiters: list[asyncio.Future[Any]] = [getter]
    if stop is not None:
        waiters.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()  # a cancelled get leaves its message in the queue
    return getter.result() if getter.done() and not getter.cancelled() else None


def _sequences(reply: str) -> tuple[int, int]:
    """(stream sequence, consumer sequence) from a JetStream delivery's reply subject.

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>[.<token>]
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6])
    return int(tokens[7]), int(tokens[8])
