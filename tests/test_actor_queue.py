"""The actor's queue on the real log and Redis: a request accepted at any moment gets its turn.

Found by `parley bench capacity` (split roles, 250 turns at once): a message
sent the instant the previous turn ended was appended to the log and then never
answered. The drain task had finished its queue and was releasing the turn
record in Redis (slow under load) when the request arrived; `_kick` saw the task
still running and left the request to it, and the task ended without looking
again. Here the release is held open by a gate so the moment is not left to
chance: the registry is the real one, on the real Redis, only made to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import types
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from redis.asyncio import Redis

from actors.actor import ConversationActor, Inbox
from actors.billing import Accounts, Refused
from actors.decide import Rejected, decide_request, decide_start, next_turn
from actors.models import choose_model
from actors.state import Conversation
from actors.turn import ActorContext, TurnRunner
from actors.writer import EventWriter
from api.hub import turn_state
from events.billing import AccountState, project_account
from events.errors import EventLogConflict
from events.ids import new_id
from events.log import EventLog, StoredEvent
from events.subjects import account_subject
from events.turns import TurnRecord, TurnRegistry, redis_client
from events.vocabulary import (
    Cancelled,
    CancelTurn,
    Chunk,
    CommandRejected,
    ConversationCreated,
    CreditsGranted,
    Done,
    Event,
    SendMessage,
    Started,
    Title,
    TurnEnd,
    UserMessage,
)
from parley.services import Servers
from tests.conftest import demo_streams
from tests.conftest import test_catalog as catalog_for_tests
from tests.held_log import HeldLog, Hold


class GatedRegistry(TurnRegistry):
    """The Redis turn registry, whose release waits for `gate` once `hold` is set."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.hold = False
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()

    async def release(
        self, conversation_id: str, worker: str, written: TurnRecord | None = None
    ) -> None:
        if self.hold:
            self.holding.set()
            await self.gate.wait()
        await super().release(conversation_id, worker, written)


class Delivery:
    """How the actor settles a command; what the worker does with a JetStream message."""

    def __init__(self) -> None:
        self.settled: list[str] = []

    @property
    def attempts(self) -> int:
        return 1

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append("nak")

    async def in_progress(self) -> None:
        pass


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _has(kind: type[Event] | types.UnionType) -> Callable[[Sequence[Any]], bool]:
    """Whether any of some events is of `kind` (a class, or a union of them)."""
    return lambda events: any(isinstance(e, kind) for e in events)


def _counted(kind: type[Event], n: int) -> Callable[[Sequence[Any]], bool]:
    """Whether exactly `n` of some events are of `kind`."""
    return lambda events: sum(isinstance(e, kind) for e in events) == n


async def until(log: EventLog, cid: str, check: Callable[[list[Any]], bool], what: str) -> None:
    """Wait until `check` holds for the conversation's events (polled: the log is the truth)."""
    try:
        async with asyncio.timeout(20):
            while not check([s.event for s in await log.read(cid)]):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within 20 s: {what}") from None


async def test_a_message_sent_while_the_last_turn_is_being_wrapped_up_still_gets_its_turn(
    stack: Servers, event_log: EventLog, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """(See the module's note.) And its turn does not wait for the release: at 1,000
    turns a record's release took a loaded worker 500 ms p50, and the next message of
    a chat waited for it. Here the second turn runs and ends while the first turn's
    release is still held."""
    registry = GatedRegistry(redis_client(stack.redis_url))
    ctx = _context(event_log, registry, http, demo_model_url)
    cid = new_id()
    await event_log.append(
        cid,
        [
            ConversationCreated(
                conversation_id=cid, at=1, event_id=new_id(), user_id="u", title="", model=None
            )
        ],
        0,
    )

    def send(text: str) -> SendMessage:
        return _message(cid, f"{text} [[tokens=5]]")

    actor = ConversationActor(cid, ctx)
    async with _running(actor) as inbox:
        first, second = send("one"), send("two")
        registry.hold = True
        inbox.put_nowait((first, Delivery()))
        async with asyncio.timeout(20):
            await registry.holding.wait()  # turn one ended; its record is being released
        events = [s.event for s in await event_log.read(cid)]
        assert any(isinstance(e, Done) for e in events), "turn one has not ended"

        inbox.put_nowait((second, Delivery()))
        await until(
            event_log,
            cid,
            lambda events: any(getattr(e, "message_id", None) == second.message_id for e in events),
            "the second message accepted",
        )
        await until(
            event_log,
            cid,
            lambda events: any(
                isinstance(e, Started) and e.user_message_id == second.message_id for e in events
            ),
            "the second message's turn started",
        )
        await until(
            event_log,
            cid,
            _counted(Done, 2),
            "the second turn ended",
        )
        registry.hold = False
        registry.gate.set()
        async with asyncio.timeout(10):
            while await registry.get(cid) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def test_a_message_reaching_an_actor_whose_view_the_log_refused_is_handed_back(
    stack: Servers, event_log: EventLog, http: aiohttp.ClientSession
) -> None:
    """Found by tests/test_roles.py's race of two workers, once reads got faster: the
    first worker's turn hit the second's append (a conflict, and the writer forgot
    its view), and a message that reached the first worker before its turn stopped
    was decided on the empty view, refused as a conversation that does not exist,
    recorded nowhere, and acked: lost."""
    registry = TurnRegistry(redis_client(stack.redis_url))
    ctx = _context(event_log, registry, http, "http://127.0.0.1:1/v1")
    cid, head = await _conversation(event_log)
    actor = ConversationActor(cid, ctx)
    async with _running(actor) as inbox:
        loaded = Delivery()
        cancel = CancelTurn(conversation_id=cid, command_id=new_id(), user_id="u", at=1)
        inbox.put_nowait((cancel, loaded))
        await _settled(loaded)

        # another writer appends; our next append (its turn's, say) is refused
        await event_log.append(cid, [_title(cid, "theirs")], head)
        with pytest.raises(EventLogConflict):
            await actor.writer.append([_title(cid, "ours")])

        delivery = Delivery()
        inbox.put_nowait((_message(cid, "hello"), delivery))
        await _settled(delivery)
        assert delivery.settled == ["nak"]
        events = [s.event for s in await event_log.read(cid)]
        assert not any(isinstance(e, CommandRejected) for e in events), events


@contextlib.asynccontextmanager
async def _running(actor: ConversationActor) -> AsyncIterator[Inbox]:
    """The actor running on an inbox of its own, stopped at the end."""
    inbox: Inbox = asyncio.Queue()
    running = asyncio.create_task(actor.run(inbox, idle_s=30))
    try:
        yield inbox
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@contextlib.asynccontextmanager
async def _actor_on_held_log(
    nc: NatsClient,
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    trace: aiohttp.TraceConfig,
    *holds: Hold,
) -> AsyncIterator[tuple[str, Inbox]]:
    """A new conversation's actor running on the real log with `holds`, its model
    calls seen by `trace`: the conversation's id and the actor's inbox."""
    held = HeldLog(nc.jetstream(), *holds)
    registry = TurnRegistry(redis_client(stack.redis_url))
    async with aiohttp.ClientSession(trace_configs=[trace]) as model_http:
        cid, _ = await _conversation(event_log)
        actor = ConversationActor(cid, _context(held, registry, model_http, demo_model_url))
        async with _running(actor) as inbox:
            yield cid, inbox


async def _a_turn_then_a_queued_one(
    event_log: EventLog, cid: str, inbox: Inbox, first: str, then: str
) -> None:
    """Send `first`; once its turn started, `then` with on_busy enqueue; wait for both ends."""
    inbox.put_nowait((_message(cid, first), Delivery()))
    await until(event_log, cid, _has(Started), "first started")
    queued = msgspec.structs.replace(_message(cid, then), on_busy="enqueue")
    inbox.put_nowait((queued, Delivery()))
    await until(event_log, cid, _counted(Done, 2), "both turns ended")


async def _conversation(event_log: EventLog) -> tuple[str, int]:
    """A new conversation in the log: its id, and the log's position after it."""
    cid = new_id()
    created = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    return cid, await event_log.append(cid, [created], 0)


def _context(
    log: EventLog, turns: TurnRegistry, http: aiohttp.ClientSession, model_url: str
) -> ActorContext:
    return ActorContext(
        log=log,
        turns=turns,
        http=http,
        catalog=catalog_for_tests(),
        default_base_url=model_url,
        default_api_key=None,
        worker_id="test-" + new_id(),
    )


def _message(cid: str, content: str) -> SendMessage:
    return SendMessage(
        conversation_id=cid,
        command_id=new_id(),
        user_id="u",
        at=1,
        message_id=new_id(),
        content=content,
    )


async def _settled(delivery: Delivery) -> None:
    """Until the actor acked or handed back the command (polled: it says nothing else)."""
    async with asyncio.timeout(10):
        while not delivery.settled:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def _title(cid: str, title: str) -> Title:
    return Title(conversation_id=cid, at=1, event_id=new_id(), title=title, source="user")


async def test_a_writer_whose_append_was_refused_decides_nothing_until_it_reads_again(
    event_log: EventLog,
) -> None:
    """The race inside the one above: a request's decision waited for the writer's lock
    while the turn's append held it and was refused. It must not be decided on the
    empty view that refusal left."""
    cid, head = await _conversation(event_log)
    writer = EventWriter(cid, event_log, max_event_bytes=64 * 1024, new_id=new_id)
    await writer.catch_up()
    await event_log.append(cid, [_title(cid, "theirs")], head)
    with pytest.raises(EventLogConflict):
        await writer.append([_title(cid, "ours")])

    seen: list[bool] = []

    def decide(state: Conversation) -> list[Event]:
        seen.append(state.exists)
        return []

    with pytest.raises(EventLogConflict):
        await writer.append_decided(decide)
    assert seen == []
    await writer.catch_up()
    assert not writer.stale
    assert await writer.append_decided(lambda s: [_title(cid, "ours, now")])
    assert [s.event.title for s in await event_log.read(cid) if isinstance(s.event, Title)] == [
        "theirs",
        "ours, now",
    ]


class AppendLog(EventLog):
    """The real log, remembering which events went out in each append."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js)
        self.appends: list[list[str]] = []

    async def append_to(self, subject: str, events: Sequence[Event], expected_seq: int) -> int:
        self.appends.append([type(e).__name__ for e in events])
        return await super().append_to(subject, events, expected_seq)


async def test_an_idle_conversations_request_starts_its_turn_in_the_same_append(
    stack: Servers, nc: NatsClient, event_log: EventLog, demo_model_url: str
) -> None:
    """`user_message`, `started` and the turn's title were three appends, one after the
    other, on every turn's way to its first token. On an idle conversation the
    request and its turn's start (its title too) are one append, whose events leave
    together (tests/test_event_log.py); a request queued behind a running turn is
    still accepted alone and started when its turn comes."""
    counted = AppendLog(nc.jetstream())
    async with aiohttp.ClientSession() as http:
        ctx = _context(counted, TurnRegistry(redis_client(stack.redis_url)), http, demo_model_url)
        cid, _ = await _conversation(event_log)
        actor = ConversationActor(cid, ctx)
        async with _running(actor) as inbox:
            await _a_turn_then_a_queued_one(
                event_log, cid, inbox, "the first [[tokens=40]]", "the second [[tokens=3]]"
            )
    assert counted.appends[0] == ["UserMessage", "Started", "Title"], counted.appends
    kinds = [type(s.event).__name__ for s in await event_log.read(cid)]
    assert kinds[:5] == ["ConversationCreated", "UserMessage", "Started", "Title", "Chunk"], kinds
    # the queued request: accepted alone while the first turn ran, started after its end
    first_done = kinds.index("Done")
    assert "UserMessage" in kinds[2:first_done] and kinds[first_done + 1] == "Started", kinds
    assert ["UserMessage"] in counted.appends and ["Started", "Title"] in counted.appends


class ReadGatedLog(EventLog):
    """The real log, whose reads wait until `gate` is set."""

    def __init__(self, js: JetStreamContext, gate: asyncio.Event) -> None:
        super().__init__(js)
        self.gate = gate

    async def read(self, conversation_id: str, after: int = 0) -> list[StoredEvent]:
        async with asyncio.timeout(10):
            await self.gate.wait()
        return await super().read(conversation_id, after)


async def test_a_new_actor_announces_a_request_while_it_reads_the_conversation(
    stack: Servers, nc: NatsClient, event_log: EventLog, demo_model_url: str
) -> None:
    """A new actor read the conversation, then wrote the turn record to Redis, then
    accepted: two round trips one after the other. The request carries where the edge
    read the log's end, so the record is written from there while the read runs.
    Here the read is held until the record is in; before the change it never was."""
    gate = asyncio.Event()
    registry = TurnRegistry(redis_client(stack.redis_url))
    async with aiohttp.ClientSession() as http:
        ctx = _context(ReadGatedLog(nc.jetstream(), gate), registry, http, demo_model_url)
        cid, head = await _conversation(event_log)
        actor = ConversationActor(cid, ctx)
        async with _running(actor) as inbox:
            try:
                request = msgspec.structs.replace(_message(cid, "hello [[tokens=3]]"), after=head)
                inbox.put_nowait((request, Delivery()))
                async with asyncio.timeout(10):
                    while (record := await registry.get(cid)) is None:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                assert record.after == head and record.turn_id == ""
                gate.set()
                await until(
                    event_log,
                    cid,
                    _has(Done),
                    "the turn ended",
                )
            finally:
                gate.set()


async def test_a_cancel_right_behind_its_request_stops_the_turn_before_the_model_is_asked(
    stack: Servers, event_log: EventLog, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """Stop pressed the moment a message is sent: the cancel reached the actor after
    the turn was started but before its runner existed, found nothing to stop, and
    the whole answer ran. The turn now ends as cancelled, and the model's answer is
    not read (the call sent as the turn started is closed)."""
    ctx = _context(event_log, TurnRegistry(redis_client(stack.redis_url)), http, demo_model_url)
    cid, _ = await _conversation(event_log)
    actor = ConversationActor(cid, ctx)
    async with _running(actor) as inbox:
        inbox.put_nowait((_message(cid, "a long answer [[tokens=200]]"), Delivery()))
        cancel = CancelTurn(conversation_id=cid, command_id=new_id(), user_id="u", at=1)
        inbox.put_nowait((cancel, Delivery()))
        await until(
            event_log,
            cid,
            _has(Cancelled | Done),
            "the turn ended",
        )
    kinds = [type(s.event).__name__ for s in await event_log.read(cid)]
    assert kinds == ["ConversationCreated", "UserMessage", "Started", "Title", "Cancelled"], kinds


async def test_a_turn_cancelled_before_it_ran_bills_what_its_early_call_was_answered(
    nc: NatsClient,
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
) -> None:
    """The model is asked as a turn starts, before the turn runs. A cancel that came
    in between ended the turn as cancelled and closed that call unread with 0 tokens,
    though the provider had answered it: a call it bills, not billed. What has
    arrived of the answer is now counted as any call's is. Here a queued turn's
    `started` is held in the log until the model has written its whole answer, usage
    included, and the cancel comes meanwhile."""
    starts = Hold(_has(Started))
    answered: list[str] = []

    async def on_request_end(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        answered.append(str(params.url))  # a model call's status and headers are in

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    before = await demo_streams(http, demo_model_url)
    actor = _actor_on_held_log(nc, stack, event_log, demo_model_url, trace, starts)
    async with actor as (cid, inbox):
        first = _message(cid, "first question [[tokens=20]] [[rate=20]]")
        inbox.put_nowait((first, Delivery()))
        await until(event_log, cid, _has(Started), "the first turn's start")
        starts.on = True
        queued = _message(cid, "second question [[tokens=5]]")
        inbox.put_nowait((msgspec.structs.replace(queued, on_busy="enqueue"), Delivery()))
        async with asyncio.timeout(20):
            await starts.holding.wait()  # the second turn's `started`
            while len(answered) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            # the model has written the whole second answer
            while (await demo_streams(http, demo_model_url))["open"] > before["open"]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await _cancelled_as_it_starts(event_log, cid, inbox, starts)
    events = [s.event for s in await event_log.read(cid)]
    last = max(i for i, e in enumerate(events) if isinstance(e, Started))
    turn = events[last:]
    assert not any(isinstance(e, Chunk) for e in turn), turn
    cancelled = turn[-1]
    assert isinstance(cancelled, Cancelled), turn
    # the provider's own count, which came with the answer: not an estimate
    assert cancelled.output_tokens == 5 and cancelled.input_tokens > 0, cancelled
    assert not cancelled.tokens_estimated


async def _cancelled_as_it_starts(
    event_log: EventLog, cid: str, inbox: Inbox, starts: Hold
) -> None:
    """Cancel the turn whose `started` `starts` holds; once the actor has settled the
    cancel, let the start go on, and wait for the turn's end."""
    cancel_settled = Delivery()
    cancel = CancelTurn(conversation_id=cid, command_id=new_id(), user_id="u", at=1)
    inbox.put_nowait((cancel, cancel_settled))
    await _settled(cancel_settled)
    starts.gate.set()
    await until(event_log, cid, _has(Cancelled), "the turn's end")


# A non-streamed answer, as a server that ignores `stream: true` sends it.
WHOLE_ANSWER = {
    "id": "chatcmpl-whole",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "All at once."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21},
}


async def test_a_turn_cancelled_before_it_ran_bills_an_early_call_answered_whole(
    nc: NatsClient, stack: Servers, event_log: EventLog
) -> None:
    """As above, with a server that ignores `stream: true` and answers one JSON body.
    Such an answer is read whole as the call is sent, so none of it was left to
    arrive when the turn was cancelled: the turn ended cancelled with 0 tokens, the
    provider's count for a call it bills dropped. The answer read is counted now.
    The first turn's answer waits until the second message is queued behind it."""
    queued_in = asyncio.Event()
    second_answered = asyncio.Event()
    calls = 0

    async def whole(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        await request.read()
        if calls == 1:
            async with asyncio.timeout(20):
                await queued_in.wait()
        response = web.json_response(WHOLE_ANSWER)
        await response.prepare(request)
        await response.write_eof()  # all of it sent before the cancel below
        if calls == 2:
            second_answered.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", whole)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    starts = Hold(_has(Started))
    try:
        model_url = str(server.make_url("/v1"))
        actor = _actor_on_held_log(nc, stack, event_log, model_url, aiohttp.TraceConfig(), starts)
        async with actor as (cid, inbox):
            inbox.put_nowait((_message(cid, "first question"), Delivery()))
            await until(event_log, cid, _has(Started), "the first turn's start")
            starts.on = True
            queued = _message(cid, "second question")
            inbox.put_nowait((msgspec.structs.replace(queued, on_busy="enqueue"), Delivery()))
            await until(event_log, cid, _counted(UserMessage, 2), "the second message queued")
            queued_in.set()
            async with asyncio.timeout(20):
                await starts.holding.wait()  # the second turn's `started`
                await second_answered.wait()
            await _cancelled_as_it_starts(event_log, cid, inbox, starts)
    finally:
        queued_in.set()
        starts.gate.set()
        await server.close()
    cancelled = (await event_log.read(cid))[-1].event
    assert isinstance(cancelled, Cancelled), cancelled
    # the provider's own count, which came with the answer: not an estimate
    assert (cancelled.input_tokens, cancelled.output_tokens) == (17, 4), cancelled
    assert not cancelled.tokens_estimated


class Held(Protocol):
    """Something the actor waits on, made to hold (`holding` set) until `gate` opens."""

    holding: asyncio.Event
    gate: asyncio.Event


@contextlib.asynccontextmanager
async def _cancelled_while_held(
    actor: ConversationActor, event_log: EventLog, held: Held
) -> AsyncIterator[None]:
    """Run the actor; send a long message and, while its turn's start is held, a
    cancel; let the start go on and wait for the turn's end. The actor runs on
    through the body."""
    cid = actor.conversation_id
    try:
        async with _running(actor) as inbox:
            inbox.put_nowait((_message(cid, "a long answer [[tokens=200]]"), Delivery()))
            async with asyncio.timeout(10):
                await held.holding.wait()
            cancel_settled = Delivery()
            cancel = CancelTurn(conversation_id=cid, command_id=new_id(), user_id="u", at=1)
            inbox.put_nowait((cancel, cancel_settled))
            await _settled(cancel_settled)
            held.gate.set()
            await until(
                event_log,
                cid,
                _has(Cancelled | Done),
                "the turn ended",
            )
            yield
    finally:
        held.gate.set()


class GatedAccounts(Accounts):
    """The accounts on the real log, whose reservation waits for `gate`."""

    def __init__(self, event_log: EventLog) -> None:
        super().__init__(event_log, time.time_ns, new_id)
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()

    async def reserve(
        self, account: str, turn_id: str, conversation_id: str, amount: int
    ) -> Refused | None:
        self.holding.set()
        await self.gate.wait()
        return await super().reserve(account, turn_id, conversation_id, amount)


async def test_a_cancel_during_a_billed_turns_pre_flight_stops_it_before_the_model_is_asked(
    stack: Servers, event_log: EventLog, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A project's turn is started, then its credits are reserved. A cancel that came
    while the reservation was on its way found no runner, and the whole answer ran
    (and was billed). The runner now exists from `started` on."""
    accounts = GatedAccounts(event_log)
    ctx = dataclasses.replace(
        _context(event_log, TurnRegistry(redis_client(stack.redis_url)), http, demo_model_url),
        accounts=accounts,
    )
    cid, account = await _funded_project_conversation(event_log)
    async with _cancelled_while_held(ConversationActor(cid, ctx), event_log, accounts):
        # and what was reserved for it is settled by its charge: nothing stays held
        async with asyncio.timeout(10):
            while (ledger := await accounts.state(account)).reserved:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    events = [s.event for s in await event_log.read(cid)]
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ConversationCreated", "UserMessage", "Started", "Title", "Cancelled"], kinds
    (started,) = [e for e in events if isinstance(e, Started)]
    (cancelled,) = [e for e in events if isinstance(e, Cancelled)]
    # nothing was consumed, so nothing is owed; the charge closes the reservation
    assert (cancelled.input_tokens, cancelled.output_tokens) == (0, 0)
    assert ledger.charged_turns == {started.turn_id} and ledger.charged == 0


async def _funded_project_conversation(event_log: EventLog) -> tuple[str, str]:
    """A new conversation of a new project whose account has credits: its id, the account."""
    cid, project = new_id(), new_id()
    account = project_account(project)
    grant = CreditsGranted(
        conversation_id="", at=1, event_id=new_id(), account=account, amount=10**9
    )
    await event_log.append_to(account_subject(account), [grant], 0)
    created = ConversationCreated(
        conversation_id=cid, at=1, event_id=new_id(), user_id="u", project_id=project
    )
    await event_log.append(cid, [created], 0)
    return cid, account


class StartGatedLog(EventLog):
    """The real log, whose append of a turn's `started` waits for `gate`."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js)
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()

    async def append(self, conversation_id: str, events: Sequence[Event], expected_seq: int) -> int:
        if any(isinstance(e, Started) for e in events):
            self.holding.set()
            await self.gate.wait()
        return await super().append(conversation_id, events, expected_seq)


async def test_a_cancel_while_a_queued_turns_start_is_on_its_way_stops_it(
    stack: Servers,
    nc: NatsClient,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
) -> None:
    """A turn started from the queue is announced (its id in the turn record) while its
    `started` is appended: a cancel naming it can come before the append's ack. It
    found no runner then, and the whole answer ran."""
    gated = StartGatedLog(nc.jetstream())
    ctx = _context(gated, TurnRegistry(redis_client(stack.redis_url)), http, demo_model_url)
    cid, _ = await _funded_project_conversation(event_log)
    async with _cancelled_while_held(ConversationActor(cid, ctx), event_log, gated):
        pass
    kinds = [type(s.event).__name__ for s in await event_log.read(cid)]
    assert kinds == ["ConversationCreated", "UserMessage", "Started", "Title", "Cancelled"], kinds


async def test_a_turn_cancelled_before_its_task_first_runs_still_ends(
    stack: Servers, event_log: EventLog, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """Found by the soak (150 users): an interrupting message, accepted in the loop
    iteration in which a queued turn's task was made, cancelled that task before its
    first step. A task cancelled then never runs its body, so the turn's `cancelled`
    was never written, the cancel escaped into the actor's queue and ended it, and
    the conversation stayed busy for good: every later message queued behind a turn
    that would never end."""
    ctx = _context(event_log, TurnRegistry(redis_client(stack.redis_url)), http, demo_model_url)
    cid, _ = await _conversation(event_log)
    writer = EventWriter(cid, event_log, max_event_bytes=ctx.max_event_bytes, new_id=new_id)
    await writer.catch_up()
    asked = _message(cid, "a long answer [[tokens=200]]")
    await writer.append_decided(lambda s: accepted(decide_request(s, asked, 1, new_id)))
    spec = ctx.catalog.get(None)
    assert spec is not None
    choice = choose_model(spec)
    queued = next_turn(writer.state)
    assert queued is not None
    await writer.append_decided(lambda s: decide_start(s, queued, choice, 2, new_id)[:1])
    runner = TurnRunner(ctx, writer, spec, choice)

    running = asyncio.create_task(runner.run())
    await asyncio.sleep(0)  # `run` made the turn's task, which has not had its first step
    assert runner.cancel("superseded")
    async with asyncio.timeout(10):
        await running  # the turn ended; the cancel did not escape

    events = [s.event for s in await event_log.read(cid)]
    assert isinstance(events[-1], Cancelled) and events[-1].turn_id == runner.turn_id, events
    assert events[-1].reason == "superseded" and writer.state.active is None


def accepted(outcome: list[Event] | Rejected) -> list[Event]:
    assert not isinstance(outcome, Rejected), outcome
    return outcome


class CancellingAccounts(Accounts):
    """The accounts on the real log, whose first look at an account is cancelled from
    elsewhere (what a cancel escaping from an awaited task looks like)."""

    def __init__(self, event_log: EventLog) -> None:
        super().__init__(event_log, time.time_ns, new_id)
        self.cancelled = False

    async def state(self, account: str) -> AccountState:
        if not self.cancelled:
            self.cancelled = True
            raise asyncio.CancelledError
        return await super().state(account)


async def test_a_cancel_escaping_into_the_queue_hands_its_commands_back(
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The queue ended silently on a CancelledError that was not the actor's stop,
    and its held command was never answered: the conversation waited for good."""
    accounts = CancellingAccounts(event_log)
    ctx = dataclasses.replace(
        _context(event_log, TurnRegistry(redis_client(stack.redis_url)), http, demo_model_url),
        accounts=accounts,
    )
    cid, _ = await _funded_project_conversation(event_log)
    actor = ConversationActor(cid, ctx)
    async with _running(actor) as inbox:
        settled = Delivery()
        inbox.put_nowait((_message(cid, "hello [[tokens=3]]"), settled))
        await _settled(settled)
        assert settled.settled == ["nak"]  # handed back: redelivered, it runs
        # the actor itself runs on: the redelivery finds it, and its turn runs
        inbox.put_nowait((_message(cid, "hello [[tokens=3]]"), Delivery()))
        await until(event_log, cid, _has(Done), "a turn")
    assert accounts.cancelled
    assert any(r.message == "turn queue failed" for r in caplog.records)


class EndWatchingLog(EventLog):
    """The real log, which reads the conversation's turn record as each turn's end goes in."""

    def __init__(self, js: JetStreamContext, turns: TurnRegistry) -> None:
        super().__init__(js)
        self.turns = turns
        self.at_ends: list[tuple[str, TurnRecord | None, int]] = []

    async def append_to(self, subject: str, events: Sequence[Event], expected_seq: int) -> int:
        for event in events:
            if isinstance(event, TurnEnd):
                record = await self.turns.get(event.conversation_id)
                self.at_ends.append((event.turn_id, record, expected_seq))
        return await super().append_to(subject, events, expected_seq)


async def test_a_turn_with_another_queued_behind_it_announces_that_one_before_its_end(
    stack: Servers,
    nc: NatsClient,
    event_log: EventLog,  # the streams made
    http: aiohttp.ClientSession,
    demo_model_url: str,
) -> None:
    # A viewer of the whole conversation ends its stream at a turn's end when the
    # record names no other turn. With a turn queued behind the ending one, the
    # record must already say that another is coming when the end goes in.
    registry = TurnRegistry(redis_client(stack.redis_url))
    watching = EndWatchingLog(nc.jetstream(), registry)
    cid, _ = await _conversation(watching)
    actor = ConversationActor(cid, _context(watching, registry, http, demo_model_url))
    async with _running(actor) as inbox:
        await _a_turn_then_a_queued_one(
            watching, cid, inbox, "first [[tokens=40]]", "then [[tokens=3]]"
        )
    (first_end, first_record, first_at), (last_end, last_record, _) = watching.at_ends
    assert first_record is not None and first_record.turn_id == "", first_record
    assert first_record.after == first_at, "a joining viewer reads from the end on"
    # nothing queued behind the last: its record still names it until it is released
    assert last_record is not None and last_record.turn_id == last_end, last_record
    assert first_end != last_end


class EndHeldLog(HeldLog):
    """The real log, whose appends with a turn's end wait at `end` while it is on (and
    any at `holds`); every append is remembered with the running turn an edge finds
    once it is in."""

    def __init__(self, js: JetStreamContext, turns: TurnRegistry, *holds: Hold) -> None:
        self.end = Hold(_has(TurnEnd))
        super().__init__(js, self.end, *holds)
        self.turns = turns
        self.appends: list[tuple[list[Event], TurnRecord | None]] = []

    async def append_to(self, subject: str, events: Sequence[Event], expected_seq: int) -> int:
        seq = await super().append_to(subject, events, expected_seq)
        _, running = await turn_state(self, self.turns, events[0].conversation_id, 5.0)
        self.appends.append((list(events), running))
        return seq


@pytest.mark.parametrize("moment", ["end_on_its_way", "record_being_released"])
async def test_a_message_sent_as_the_last_turn_ends_starts_its_turn_in_one_append(
    stack: Servers, nc: NatsClient, event_log: EventLog, demo_model_url: str, moment: str
) -> None:
    """Found with `parley bench capacity` at 1,000 turns: the next message of a chat
    comes the moment its viewer sees `done`, while the worker still waits for that
    `done`'s acknowledgement and then releases the turn record. It was queued
    (`user_message` alone), and its turn started only once the turn before was
    wrapped up: two round trips more, 1.0 s p50 under that load. It now starts in
    its own append whenever the conversation is idle on the state it is decided on,
    and a viewer joining then still finds a turn record."""
    registry = GatedRegistry(redis_client(stack.redis_url))
    watched = EndHeldLog(nc.jetstream(), registry)
    async with aiohttp.ClientSession() as http:
        actor = ConversationActor(
            cid := (await _conversation(event_log))[0],
            _context(watched, registry, http, demo_model_url),
        )
        async with _running(actor) as inbox:
            if moment == "end_on_its_way":
                watched.end.on = True
                held = watched.end.holding
            else:
                registry.hold = True
                held = registry.holding
            inbox.put_nowait((_message(cid, "one [[tokens=5]]"), Delivery()))
            async with asyncio.timeout(20):
                await held.wait()
            second = _message(cid, "two [[tokens=5]]")
            inbox.put_nowait((second, Delivery()))
            async with asyncio.timeout(10):
                while not inbox.empty():  # noqa: ASYNC110 (taken: the actor is deciding it)
                    await asyncio.sleep(0.005)
            if moment == "record_being_released":
                await until(
                    event_log,
                    cid,
                    lambda es: any(getattr(e, "message_id", None) == second.message_id for e in es),
                    "the second message accepted while the record is being released",
                )
            watched.end.on = registry.hold = False
            watched.end.gate.set()
            registry.gate.set()
            await until(event_log, cid, _counted(Done, 2), "both ended")
            async with asyncio.timeout(10):
                while await registry.get(cid) is not None:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
    positions = {
        s.event.message_id: s.seq
        for s in await event_log.read(cid)
        if isinstance(s.event, UserMessage)
    }
    (events, record), *_ = [
        (events, record)
        for events, record in watched.appends
        if any(getattr(e, "message_id", None) == second.message_id for e in events)
    ]
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["UserMessage", "Started"], watched.appends
    # a viewer joining as the turn went in starts where it begins, or earlier
    assert record is not None, "a viewer joining as the turn went in found no turn"
    assert record.after < positions[second.message_id], (record, positions)


def _requests_seen() -> tuple[aiohttp.TraceConfig, list[str]]:
    """A client trace, and the URLs of the requests it has seen start (a model's asked)."""
    asked: list[str] = []

    async def on_request_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        asked.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    return trace, asked


@pytest.mark.parametrize("start", ["idle", "queued", "next"])
async def test_the_model_is_asked_while_the_turns_start_is_on_its_way(
    nc: NatsClient, stack: Servers, event_log: EventLog, demo_model_url: str, start: str
) -> None:
    """The model was asked once the turn's `started` was in the log, so its first token
    came a round trip to NATS and the model's own first token after the request
    (bench burst: 1.8 ms p50 for the two appends, then 1.6 for the model; at 1,000
    turns 427 and 258 ms). The call is now sent as `started` is decided, on the state
    it makes, and the two overlap: the answer waits in the connection until the turn
    runs, once `started` is in. Here the start is held in the log until the model has
    been asked, on an idle conversation, on a queued turn, and on the next message of
    a chat, sent as the turn before ends; the answer then streams whole, after
    `started` and the title."""
    starts = Hold(_has(Started))
    trace, asked = _requests_seen()
    registry = TurnRegistry(redis_client(stack.redis_url))
    held = EndHeldLog(nc.jetstream(), registry, starts)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        cid, _ = await _conversation(event_log)
        actor = ConversationActor(cid, _context(held, registry, http, demo_model_url))
        async with _running(actor) as inbox:
            if start == "queued":
                inbox.put_nowait(
                    (_message(cid, "first question [[tokens=20]] [[rate=20]]"), Delivery())
                )
                await until(event_log, cid, _has(Started), "the first turn's start")
                queued = _message(cid, "second question [[tokens=5]]")
                inbox.put_nowait((msgspec.structs.replace(queued, on_busy="enqueue"), Delivery()))
                await until(
                    event_log,
                    cid,
                    _counted(UserMessage, 2),
                    "the second question accepted",
                )
            elif start == "next":
                held.end.on = True
                inbox.put_nowait((_message(cid, "first question [[tokens=5]]"), Delivery()))
                async with asyncio.timeout(20):
                    await held.end.holding.wait()  # the first turn's `done` on its way
            starts.on = True
            if start == "idle":
                inbox.put_nowait((_message(cid, "a question [[tokens=5]]"), Delivery()))
            elif start == "next":
                inbox.put_nowait((_message(cid, "second question [[tokens=5]]"), Delivery()))
                async with asyncio.timeout(10):
                    while not inbox.empty():  # noqa: ASYNC110 (taken: the actor is deciding it)
                        await asyncio.sleep(0.005)
                held.end.on = False
                held.end.gate.set()
            turns = 1 if start == "idle" else 2
            async with asyncio.timeout(20):
                await starts.holding.wait()
                while len(asked) < turns:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            # asked, while the turn's `started` is not in the log
            events = [s.event for s in await event_log.read(cid)]
            assert sum(isinstance(e, Started) for e in events) == turns - 1, events
            starts.gate.set()
            await until(
                event_log,
                cid,
                _counted(Done, turns),
                "the turn's end",
            )
    events = [s.event for s in await event_log.read(cid)]
    last = max(i for i, e in enumerate(events) if isinstance(e, Started))
    turn = events[last:]
    assert isinstance(turn[1], Title), turn[:3]
    assert isinstance(turn[-1], Done) and turn[-1].output_tokens == 5, turn[-1]
    answer = "".join(e.text for e in turn if isinstance(e, Chunk))
    assert answer.split() == ["0", "1", "2", "3", "4"], answer
    assert len(asked) == turns


async def test_a_turn_whose_start_the_log_refuses_closes_the_model_call_it_sent(
    nc: NatsClient,
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
) -> None:
    """The model is asked while `started` is on its way: if the log refuses it (another
    writer appended first), no turn runs here, and the call is closed at once, so the
    provider stops generating an answer nobody will read. The request is handed back
    for the log's owner."""
    starts = Hold(_has(Started))
    trace, asked = _requests_seen()
    before = await demo_streams(http, demo_model_url)
    actor = _actor_on_held_log(nc, stack, event_log, demo_model_url, trace, starts)
    async with actor as (cid, inbox):
        starts.on = True
        delivery = Delivery()
        inbox.put_nowait((_message(cid, "a long answer [[tokens=4000]]"), delivery))
        async with asyncio.timeout(20):
            await starts.holding.wait()
            while not asked:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            # and the model streams its answer: a call closed before the model took it
            # up leaves it nothing to stop, and nothing to count (a loaded CI machine
            # once refused `started` that soon)
            while (await demo_streams(http, demo_model_url))["open"] <= before["open"]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # the request's `user_message` is in; `started` is held behind it
        last = await event_log.last_seq(cid)
        await event_log.append(cid, [_title(cid, "another writer's")], last)
        starts.gate.set()
        await _settled(delivery)
        assert delivery.settled == ["nak"]
        async with asyncio.timeout(10):
            went_away = before["went_away"]
            while (await demo_streams(http, demo_model_url))["went_away"] == went_away:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    events = [s.event for s in await event_log.read(cid)]
    assert not any(isinstance(e, Started | Chunk) for e in events), events


class AnnouncementHeld(TurnRegistry):
    """The Redis turn registry, whose writes of a request's announcement (a record with
    no turn id yet) wait for `gate`."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()
        self.passed = False  # a held write went on (let go, or given up after 10 s)

    async def put(self, conversation_id: str, record: TurnRecord) -> None:
        if not record.turn_id:
            self.holding.set()
            try:
                async with asyncio.timeout(10):
                    await self.gate.wait()
            finally:
                self.passed = True
        await super().put(conversation_id, record)


async def test_a_turn_does_not_wait_for_its_record_in_redis(
    stack: Servers, event_log: EventLog, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A request's turn record is written while the request is accepted; its turn
    waited for that write after the append, and at 1,000 turns a record write took a
    loaded worker 500 ms p50 (the append 400). The turn now runs at once, and the
    record that names it is written after the announcement, never before it."""
    registry = AnnouncementHeld(redis_client(stack.redis_url))
    cid, _ = await _conversation(event_log)
    actor = ConversationActor(cid, _context(event_log, registry, http, demo_model_url))
    async with _running(actor) as inbox:
        inbox.put_nowait((_message(cid, "a question [[tokens=5]]"), Delivery()))
        async with asyncio.timeout(10):
            await registry.holding.wait()
        await until(event_log, cid, _has(Done), "the turn's end")
        assert not registry.passed, "the turn waited for its announcement in Redis"
        assert await registry.get(cid) is None  # neither written yet
        registry.gate.set()
        # then the announcement, the turn's record and the release, in that order: had
        # the turn's record gone first, the announcement would stay (the release
        # compares the record it deletes with the one written last) until its lease ends
        async with asyncio.timeout(10):
            while await registry.get(cid) is not None or actor.held:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
