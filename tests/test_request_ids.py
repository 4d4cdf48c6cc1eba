"""Every answer names its request (`X-Request-Id`), and so do the worker's log lines for
the turn it asked for; tests/test_dead_servers.py checks the edge's lines."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from actors.actor import ConversationActor
from actors.tools import ToolRunner, define_tool
from api.request_ids import HEADER
from events.ids import new_id
from events.log import EventLog
from events.turns import TurnRegistry, redis_client
from events.vocabulary import (
    Chunk,
    Done,
    Failed,
    RenameConversation,
    SendMessage,
    Started,
    ToolResult,
)
from parley.logs import with_request_id
from parley.services import Servers
from tests.sse import SseClient
from tests.test_actor_queue import (
    Delivery,
    _context,
    _conversation,
    _funded_project_conversation,
    _has,
    _message,
    _running,
    until,
)
from tests.test_actor_turns import wait_for_ends
from tests.test_poison import publish_raw


async def test_every_answer_names_its_request_errors_and_streams_too(
    api: SseClient, http: aiohttp.ClientSession
) -> None:
    cid = (await api.create_conversation())["id"]
    seen: list[str] = []
    for method, path, headers, status in [
        ("GET", f"/v1/conversations/{cid}", api.headers(), 200),
        ("GET", "/v1/conversations/nope", api.headers(), 404),
        ("GET", f"/v1/conversations/{cid}", {}, 401),
        ("GET", "/no/such/route", {}, 404),
        ("GET", "/healthz", {}, 200),
    ]:
        async with http.request(method, api.url(path), headers=headers) as response:
            assert response.status == status, (path, response.status)
            seen.append(response.headers[HEADER])
            if status >= 400:  # in the body too: a client may show only the body
                body = await response.json()
                assert body["error"]["request_id"] == seen[-1], body
    async with http.get(
        api.url(f"/v1/conversations/{cid}/events"), headers=api.headers(), params={"after": "0"}
    ) as stream:
        assert stream.content_type == "text/event-stream"
        seen.append(stream.headers[HEADER])
    assert len(set(seen)) == len(seen) and all(seen), seen


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("lb-7f3a9c.0:1", True),  # what a proxy gives: kept, so both logs name one id
        ("9b2f6e0e-1c4d-4e8a-a0a5-3d6f0e8c2b71", True),
        ("x" * 128, True),
        ("x" * 129, False),  # longer than any proxy's: a log line is no place for a payload
        ("has space", False),
        ("", False),
    ],
)
async def test_a_proxys_request_id_is_kept_when_it_is_an_id(
    api: SseClient, http: aiohttp.ClientSession, sent: str, kept: bool
) -> None:
    async with http.get(api.url("/healthz"), headers={HEADER: sent}) as response:
        answered = response.headers[HEADER]
    assert (answered == sent) is kept, answered
    assert answered


async def test_the_workers_lines_for_a_turn_name_the_request_that_asked_for_it(
    api: SseClient,
    http: aiohttp.ClientSession,
    event_log: EventLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The command carries the request's id to the worker: the lines of the turn it
    asked for name it, a turn that waited in the queue behind another too (not the
    id of the request whose handling started it)."""
    caplog.set_level(logging.INFO, logger="actors.turn")
    caplog.handler.addFilter(with_request_id)
    cid = (await api.create_conversation())["id"]
    ids = []
    for content, request_id in [
        ("first [[tokens=20]] [[rate=100]]", "lb-first"),
        ("second [[fail=bad_json]]", "lb-second"),
    ]:
        async with http.post(
            api.url(f"/v1/conversations/{cid}/messages"),
            json={"content": content, "on_busy": "enqueue"},
            headers=api.headers(**{"Accept": "application/json", HEADER: request_id}),
        ) as response:
            assert response.status == 202
            ids.append(response.headers[HEADER])
    assert ids == ["lb-first", "lb-second"]
    log = await wait_for_ends(event_log, cid, 2)
    ends = [type(e) for e in log if isinstance(e, Done | Failed)]
    assert ends == [Done, Failed], log
    (failed,) = [r for r in caplog.records if r.getMessage() == "turn failed"]
    assert failed.__dict__["request_id"] == "lb-second", failed.__dict__


class HeldAck(Delivery):
    """A command's delivery whose acknowledgement waits for `gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.acking = asyncio.Event()
        self.gate = asyncio.Event()

    async def ack(self) -> None:
        self.acking.set()
        await self.gate.wait()
        await super().ack()


async def test_a_turn_started_while_the_one_before_was_ending_names_its_own_request(
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The next message of a chat, come while the turn before is still being wrapped
    up (its command's acknowledgement on its way, held open here), starts its turn
    with its request, and the queue's task, still running for the turn before, runs
    it: that turn's lines name its own request, not the one that started the task."""
    caplog.set_level(logging.INFO, logger="actors.turn")
    caplog.handler.addFilter(with_request_id)
    cid, _ = await _conversation(event_log)
    registry = TurnRegistry(redis_client(stack.redis_url))
    actor = ConversationActor(cid, _context(event_log, registry, http, demo_model_url))

    async def started(second: SendMessage) -> None:
        await until(
            event_log,
            cid,
            lambda events: any(
                isinstance(e, Started) and e.user_message_id == second.message_id for e in events
            ),
            "the second message's turn started with it",
        )

    await _second_while_the_first_ends(actor, event_log, cid, started)
    (failed,) = [r for r in caplog.records if r.getMessage() == "turn failed"]
    assert failed.__dict__.get("request_id") == "req-second", failed.__dict__


async def _second_while_the_first_ends(
    actor: ConversationActor,
    event_log: EventLog,
    cid: str,
    before_release: Callable[[SendMessage], Awaitable[None]] | None = None,
) -> None:
    """Turn one ("req-first") ends and its command's acknowledgement is held open;
    the second message ("req-second", a turn that fails) comes meanwhile; then
    (after `before_release`) the acknowledgement goes, and the second turn fails."""
    first = msgspec.structs.replace(_message(cid, "one [[tokens=3]]"), request_id="req-first")
    second = msgspec.structs.replace(
        _message(cid, "two [[fail=bad_json]]"), request_id="req-second"
    )
    held = HeldAck()
    async with _running(actor) as inbox:
        inbox.put_nowait((first, held))
        async with asyncio.timeout(20):
            await held.acking.wait()  # turn one is over; its queue's task acks it
        inbox.put_nowait((second, Delivery()))
        if before_release is not None:
            await before_release(second)
        held.gate.set()
        await until(event_log, cid, _has(Failed), "the second turn failed")


_tool_log = logging.getLogger("tests.request_ids.tool")


def noted(text: str) -> str:
    """A deployment's sync tool that logs what it does (it runs in a thread of its own)."""
    _tool_log.info("tool noted", extra={"text": text})
    return "noted"


async def test_a_sync_tools_own_lines_name_the_request_of_its_turn(
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync tool runs in a thread, which starts with a context of its own: the lines
    the tool logs name the request whose turn called it, as an async tool's do."""
    caplog.set_level(logging.INFO, logger=_tool_log.name)
    caplog.handler.addFilter(with_request_id)
    cid, _ = await _conversation(event_log)
    registry = TurnRegistry(redis_client(stack.redis_url))
    ctx = dataclasses.replace(
        _context(event_log, registry, http, demo_model_url),
        tools=ToolRunner([define_tool(noted)]),
    )
    actor = ConversationActor(cid, ctx)
    cmd = msgspec.structs.replace(
        _message(cid, '[[tools=noted{"text":"a"}]]'), request_id="req-tool"
    )
    async with _running(actor) as inbox:
        inbox.put_nowait((cmd, Delivery()))
        await until(event_log, cid, _has(ToolResult), "the tool answered")
    (line,) = [r for r in caplog.records if r.getMessage() == "tool noted"]
    assert line.__dict__.get("request_id") == "req-tool", line.__dict__


async def test_a_turn_stopped_by_the_log_is_ended_naming_its_own_request(
    stack: Servers,
    event_log: EventLog,
    nc: NatsClient,
    demo_model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A damaged entry lands in a running turn: the turn stops, and the actor reads the
    log again with the next command, here a rename of another request, ending the turn
    left open. Those lines are about the turn, not the rename: they name the turn's
    request."""
    caplog.set_level(logging.INFO, logger="actors.actor")
    caplog.handler.addFilter(with_request_id)
    cid, _ = await _conversation(event_log)
    registry = TurnRegistry(redis_client(stack.redis_url))
    actor = ConversationActor(cid, _context(event_log, registry, http, demo_model_url))
    first = msgspec.structs.replace(
        _message(cid, "long [[tokens=2000]] [[rate=100]]"), request_id="req-turn"
    )
    rename = RenameConversation(
        conversation_id=cid,
        command_id=new_id(),
        user_id="u",
        at=1,
        title="renamed",
        request_id="req-rename",
    )
    async with _running(actor) as inbox:
        inbox.put_nowait((first, Delivery()))
        await until(event_log, cid, _has(Chunk), "the turn is streaming")
        await publish_raw(nc, cid, b"\xff\xfe not an event")

        def stopped() -> bool:
            return any(r.getMessage().startswith("turn stopped") for r in caplog.records)

        async with asyncio.timeout(20):
            while not stopped():  # noqa: ASYNC110  # a log line is all there is to wait on
                await asyncio.sleep(0.02)
        inbox.put_nowait((rename, Delivery()))
        await until(event_log, cid, _has(Failed), "the turn left open was ended")
    (ended,) = [r for r in caplog.records if r.getMessage() == "ending a turn left open"]
    assert ended.__dict__.get("request_id") == "req-turn", ended.__dict__
    (stop,) = [r for r in caplog.records if r.getMessage().startswith("turn stopped")]
    assert stop.__dict__.get("request_id") == "req-turn", stop.__dict__


async def test_a_project_turn_asked_for_while_the_one_before_was_ending_names_its_request(
    stack: Servers,
    event_log: EventLog,
    demo_model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A project's request is queued (whom it bills is looked up first), never started
    with its decision. Come while the turn before is being wrapped up (its command's
    acknowledgement held open here), the queue's task, still running, starts it as
    soon as its decision is in, while the request's handling has not finished: the
    turn names its own request all the same."""
    caplog.set_level(logging.INFO, logger="actors.turn")
    caplog.handler.addFilter(with_request_id)
    cid, _ = await _funded_project_conversation(event_log)
    registry = TurnRegistry(redis_client(stack.redis_url))
    actor = ConversationActor(cid, _context(event_log, registry, http, demo_model_url))
    await _second_while_the_first_ends(actor, event_log, cid)
    (failed,) = [r for r in caplog.records if r.getMessage() == "turn failed"]
    assert failed.__dict__.get("request_id") == "req-second", failed.__dict__
