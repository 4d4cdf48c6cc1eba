"""A conversation's feed on one edge serves all its viewers: one viewer's failure ends
that viewer's stream only. Found with `make run` (uvloop): a viewer that hung up
mid-answer made the edge's reset of its connection raise, which ended the feed
of every other viewer of the conversation."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import cast

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from api.hub import Delivery, Hubs, HubSettings, Subscription, opens_turn, turn_state, watch
from api.sse import Envelope, Position
from api.streaming import cut
from events.ids import new_id
from events.log import EventLog, StoredEvent
from events.tracing import REQUEST_ID
from events.turns import TurnRecord, TurnRegistry, redis_client
from events.vocabulary import ConversationCreated, Done, Started, Title, UserMessage
from parley import loops
from parley.logs import with_request_id
from parley.services import Servers


class Collecting(Subscription):
    """A viewer that keeps what it is fed."""

    def __init__(self, after: int) -> None:
        super().__init__(Position(after))
        self.seqs: list[int] = []

    def take(self, delivery: Delivery) -> None:
        self.seqs.append(delivery.seq)

    def take_stall(self, error: Envelope) -> None:
        self.end("stalled")


class Failing(Collecting):
    """A viewer whose writing raises from its second live event on."""

    def take(self, delivery: Delivery) -> None:
        super().take(delivery)
        if len(self.seqs) > 1:
            raise RuntimeError("the viewer's connection broke in an unexpected way")


async def watching_turn(hubs: Hubs, cid: str, viewer: Collecting, turn: str) -> asyncio.Task[str]:
    """`viewer` watching the conversation, once it has seen `turn` start: the watch."""
    watching = asyncio.create_task(watch(hubs, cid, viewer, None))
    async with asyncio.timeout(10):
        while viewer.open_turn != turn:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return watching


def _title(cid: str, n: int) -> Title:
    return Title(conversation_id=cid, at=1, event_id=new_id(), title=f"t{n}", source="user")


def _started(cid: str, turn: str) -> Started:
    return Started(
        conversation_id=cid, at=2, event_id=new_id(), turn_id=turn, user_message_id="m", model="x"
    )


def _done(cid: str, turn: str) -> Done:
    return Done(
        conversation_id=cid,
        at=4,
        event_id=new_id(),
        turn_id=turn,
        content=[],
        stop_reason="stop",
        input_tokens=1,
        output_tokens=1,
    )


async def test_a_viewer_that_fails_ends_alone_and_the_others_read_on(
    stack: Servers, nc: NatsClient, event_log: EventLog
) -> None:
    cid = new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    head = await event_log.append(cid, [created], 0)
    hubs = Hubs(nc.jetstream(), event_log, TurnRegistry(redis_client(stack.redis_url)))
    good, bad = Collecting(head), Failing(head)
    try:
        watching = [asyncio.create_task(watch(hubs, cid, s, head)) for s in (good, bad)]
        async with asyncio.timeout(10):
            while not (good.live and bad.live):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        appended = []
        for n in range(5):
            head = await event_log.append(cid, [_title(cid, n)], head)
            appended.append(head)  # the log is shared: positions need not be contiguous
        async with asyncio.timeout(10):
            assert await watching[1] == "broken"
            while len(good.seqs) < 5:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert good.seqs == appended
        assert not good.ended.done() and hubs.following(cid) == head
        watching[0].cancel()
    finally:
        await hubs.close()


def test_cutting_a_connection_the_viewer_already_closed_raises_nothing_on_uvloop() -> None:
    """uvloop's transport keeps a socket object whose descriptor is closed (-1); a
    socket option on it raises ValueError, not OSError. The edge runs on uvloop."""

    async def hang_up_then_cut() -> bool:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            transport = cast(asyncio.Transport, writer.transport)  # uvloop's TCPTransport
            # the edge sizes a stream's send buffer when it opens: uvloop keeps that
            # socket object, and closed, its descriptor reads -1
            assert transport.get_extra_info("socket") is not None
            transport.abort()
            await asyncio.sleep(0.01)
            cut(transport)
            return type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        finally:
            server.close()

    assert loops.run(hang_up_then_cut()), "the edge's loop is uvloop: test on it"


class TurnEndsBetweenReads:
    """The worker ends the turn (appends `done`, then clears its record, as it does)
    right after the first of `turn_state`'s two reads, whichever that is."""

    def __init__(self, event_log: EventLog, turns: TurnRegistry, cid: str, done: Done) -> None:
        self._log, self._turns, self._cid, self._done = event_log, turns, cid, done
        self.done_seq = 0

    async def _end_turn_once(self) -> None:
        if self.done_seq == 0:
            head = await self._log.last_seq(self._cid)
            self.done_seq = await self._log.append(self._cid, [self._done], head)
            await self._turns.release(self._cid, "w1")

    async def last(self, conversation_id: str) -> StoredEvent | None:
        last = await self._log.last(conversation_id)
        await self._end_turn_once()
        return last

    async def get(self, conversation_id: str) -> TurnRecord | None:
        record = await self._turns.get(conversation_id)
        await self._end_turn_once()
        return record


async def test_a_turn_that_ends_between_the_reads_is_never_running_and_endless(
    stack: Servers, event_log: EventLog
) -> None:
    """Under load the stall check told a viewer "turn ... is no longer running and
    its end cannot be read" while the turn's `done` was in the log: the log's end
    was read before the turn ended, its record after."""
    cid, turn = new_id(), new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    started = _started(cid, turn)
    head = await event_log.append(cid, [created, started], 0)
    turns = TurnRegistry(redis_client(stack.redis_url))
    await turns.put(cid, TurnRecord(worker="w1", turn_id=turn, after=head - 1, at=3))
    done = _done(cid, turn)
    between = TurnEndsBetweenReads(event_log, turns, cid, done)

    end, active = await turn_state(cast(EventLog, between), cast(TurnRegistry, between), cid)

    assert between.done_seq > head
    # running with the log's end before its `done`, or ended with `done` read: never
    # "not running" with an end that does not hold its `done`
    assert (end, active) == (between.done_seq, None) or (
        active is not None and active.turn_id == turn
    ), (end, active, between.done_seq)


async def test_the_stall_check_waits_while_the_record_does_not_name_the_turn_yet(
    stack: Servers, nc: NatsClient, event_log: EventLog
) -> None:
    """A worker announces a request's turn (a record without a turn id) before it
    starts, and names the turn in the record just after `started` is appended. In
    between, a viewer of that turn is not told its end cannot be read."""
    cid, turn = new_id(), new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    started = _started(cid, turn)
    turns = TurnRegistry(redis_client(stack.redis_url))
    await turns.put(cid, TurnRecord(worker="w1", turn_id="", after=0, at=3))
    head = await event_log.append(cid, [created, started], 0)
    checks = HubSettings(stall_check_s=0.05, wake_s=0.01, orphan_grace_s=0.2)
    hubs = Hubs(nc.jetstream(), event_log, turns, checks)
    viewer = Collecting(0)
    try:
        watching = await watching_turn(hubs, cid, viewer, turn)
        await asyncio.sleep(10 * checks.orphan_grace_s)  # checks' worth of silence, and more
        assert not watching.done() and viewer.seqs[-1] == head

        await turns.release(cid, "w1")  # now the turn is gone without an end: stalled
        async with asyncio.timeout(10):
            assert await watching == "stalled"
    finally:
        await hubs.close()


async def test_a_turn_that_stopped_running_gets_its_late_end_rather_than_a_stall(
    stack: Servers, nc: NatsClient, event_log: EventLog
) -> None:
    """A dead worker's turn stops running (its record expires) some 15 s before the
    partition's next owner appends its end: the viewer waits for that end."""
    cid, turn = new_id(), new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    head = await event_log.append(cid, [created, _started(cid, turn)], 0)
    checks = HubSettings(stall_check_s=0.05, wake_s=0.01, orphan_grace_s=30)
    hubs = Hubs(nc.jetstream(), event_log, TurnRegistry(redis_client(stack.redis_url)), checks)
    viewer = Collecting(0)
    try:
        watching = await watching_turn(hubs, cid, viewer, turn)
        await asyncio.sleep(20 * checks.stall_check_s)  # no record: not running, no end yet
        assert not watching.done(), "a turn that stopped running may still get its end"
        end = await event_log.append(cid, [_done(cid, turn)], head)
        async with asyncio.timeout(10):
            while viewer.seqs[-1] != end:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert viewer.open_turn is None and not watching.done(), "the end came, no stall"
    finally:
        await hubs.close()


async def test_a_reader_of_the_running_turn_waits_for_a_record_the_log_says_is_coming(
    stack: Servers, event_log: EventLog
) -> None:
    """A worker writes a request's record beside the append that accepts it. In the
    moment between the two, a viewer joining without a position (or a cancel) read
    no record and took the conversation for idle, and started after the turn's
    start. Readers of the running turn now give the record a moment to arrive."""
    cid, turn = new_id(), new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    before = await event_log.append(cid, [created], 0)
    started = _started(cid, turn)
    head = await event_log.append(cid, [started], before)
    turns = TurnRegistry(redis_client(stack.redis_url))
    coming = TurnRecord(worker="w1", turn_id="", after=before, at=3)

    assert await turn_state(event_log, turns, cid) == (head, None), "no wait asked for"

    async def written_late() -> None:
        await asyncio.sleep(0.1)
        await turns.put(cid, coming)

    late = asyncio.create_task(written_late())
    assert await turn_state(event_log, turns, cid, 5.0) == (head, coming)
    await late


async def test_no_record_is_waited_for_after_a_turns_end_and_none_for_ever(
    stack: Servers, event_log: EventLog
) -> None:
    cid, turn = new_id(), new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    started = _started(cid, turn)
    head = await event_log.append(cid, [created, started], 0)
    turns = TurnRegistry(redis_client(stack.redis_url))
    # the record never comes (the worker died): none after the wait, not a hang
    async with asyncio.timeout(5):
        assert await turn_state(event_log, turns, cid, 0.2) == (head, None)
    done = _done(cid, turn)
    end = await event_log.append(cid, [done], head)
    renamed = await event_log.append(cid, [_title(cid, 2)], end)
    for waited in (done, _title(cid, 2)):
        assert not opens_turn(waited)
    # after an end, or a title the user set, nothing is coming: a long wait returns at once
    async with asyncio.timeout(1):
        assert await turn_state(event_log, turns, cid, 30.0) == (renamed, None)


class Noting(Collecting):
    """A viewer of the whole conversation that notes what the hub says after each end."""

    def __init__(self, after: int) -> None:
        super().__init__(after)
        self.idle_after: dict[int, bool | None] = {}

    def take(self, delivery: Delivery) -> None:
        super().take(delivery)
        if delivery.ends_turn:
            self.idle_after[delivery.seq] = delivery.idle_after


async def test_every_edge_reads_from_the_end_itself_whether_turns_wait(
    stack: Servers, nc: NatsClient, event_log: EventLog
) -> None:
    """Each edge asked Redis, at the moment it read a turn's end, whether another turn
    waited: two edges could answer differently when a message came in that moment (one
    viewer went on into the next turn, the other's stream closed). The end says it now,
    as the actor saw it; Redis here knows of no waiting turn at all."""
    cid, first, second = new_id(), new_id(), new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    head = await event_log.append(cid, [created, _started(cid, first)], 0)
    turns = TurnRegistry(redis_client(stack.redis_url))
    settings = HubSettings(stall_check_s=5.0)
    edges = [Hubs(nc.jetstream(), event_log, turns, settings) for _ in range(2)]
    viewers = [Noting(0), Noting(0)]
    try:
        watches = [
            await watching_turn(hubs, cid, viewer, first)
            for hubs, viewer in zip(edges, viewers, strict=True)
        ]
        waits = msgspec.structs.replace(_done(cid, first), idle=False)
        end = await event_log.append(cid, [waits], head)
        async with asyncio.timeout(10):  # each hub has read it before anything follows
            while any(end not in v.idle_after for v in viewers):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        head = await event_log.append(cid, [_started(cid, second)], end)
        last = await event_log.append(
            cid, [msgspec.structs.replace(_done(cid, second), idle=True)], head
        )
        async with asyncio.timeout(10):
            while any(last not in v.idle_after for v in viewers):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        for viewer in viewers:
            assert viewer.idle_after == {end: False, last: True}, viewer.idle_after
        assert not any(w.done() for w in watches)  # these viewers never end on their own
    finally:
        for hubs in edges:
            await hubs.close()


async def test_a_hub_keeps_no_more_of_a_long_conversation_than_its_ring_bytes(
    stack: Servers, nc: NatsClient, event_log: EventLog
) -> None:
    """The ring of recent deliveries is bounded by bytes counting what each delivery
    holds, its event too: a user message has no frame for viewers, and a hub counted
    frames only, so one on a conversation of pasted documents (100,000 characters a
    message, short answers) kept the last 512 messages whole, megabytes a hub."""
    cid = new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    first = head = await event_log.append(cid, [created], 0)
    settings = HubSettings()
    hubs = Hubs(nc.jetstream(), event_log, TurnRegistry(redis_client(stack.redis_url)), settings)
    viewer = Collecting(head)
    try:
        watching = asyncio.create_task(watch(hubs, cid, viewer, head))
        async with asyncio.timeout(10):
            while not viewer.live:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        document = "lorem ipsum " * 8_000
        for n in range(20):
            message = UserMessage(
                conversation_id=cid,
                at=3,
                event_id=new_id(),
                message_id=new_id(),
                content=f"{n}: {document}",
            )
            head = await event_log.append(cid, [message], head)
        async with asyncio.timeout(10):
            while not viewer.seqs or viewer.seqs[-1] != head:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        late = Collecting(first)
        hub, snapshot = await hubs.join(cid, late)
        hub.leave(late)
        held = sum(len(d.wire) + len(msgspec.json.encode(d.stored.event)) for d in snapshot.ring)
        assert snapshot.ring and snapshot.ring[-1].seq == head
        assert held <= settings.ring_bytes, (held, len(snapshot.ring))
        watching.cancel()
    finally:
        await hubs.close()


def _of_request(request_id: str) -> contextvars.Context:
    """A context in which the edge serves the request `request_id`."""
    context = contextvars.copy_context()
    context.run(REQUEST_ID.set, request_id)
    return context


async def test_the_hubs_line_about_a_viewer_names_that_viewers_request(
    stack: Servers, nc: NatsClient, event_log: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub is started by its first viewer's request and serves every later one:
    what it logs about one viewer names that viewer's request, not the first's."""
    caplog.set_level(logging.ERROR, logger="api.hub")
    caplog.handler.addFilter(with_request_id)
    cid = new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    head = await event_log.append(cid, [created], 0)
    hubs = Hubs(nc.jetstream(), event_log, TurnRegistry(redis_client(stack.redis_url)))
    first, second = _of_request("viewer-first"), _of_request("viewer-second")
    good, bad = first.run(Collecting, head), second.run(Failing, head)
    try:
        watching = asyncio.create_task(watch(hubs, cid, good, head), context=first)
        async with asyncio.timeout(10):
            while not good.live:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        failing = asyncio.create_task(watch(hubs, cid, bad, head), context=second)
        async with asyncio.timeout(10):
            while not bad.live:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        for n in range(2):
            head = await event_log.append(cid, [_title(cid, n)], head)
        async with asyncio.timeout(10):
            assert await failing == "broken"
        watching.cancel()
    finally:
        await hubs.close()
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("a viewer's stream failed")]
    assert failed.__dict__.get("request_id") == "viewer-second", failed.__dict__
