"""Nothing in the log stops parley: poison events published straight to `chat.evt.<conversation>`.

Each test writes what a newer version, a damaged disk or a buggy writer could
leave in the log, then checks that every reader steps past it: the projector
records it and goes on, `/log` and replay show it and finish, the actor skips
it or refuses only that conversation, and SSE viewers are never left waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from nats.aio.client import Client as NatsClient

from events.broker import DirectClient, connect_client
from events.codec import Unreadable, encode
from events.ids import new_id
from events.log import EventLog
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import Started, Title
from parley.services import Servers, Services
from projections.projector import Projector
from tests.sse import SseClient, SseEvent, read_sse, until_done


async def publish_raw(
    nc: NatsClient, conversation_id: str, payload: bytes, headers: dict[str, str] | None = None
) -> int:
    ack = await nc.jetstream().publish(
        event_subject(conversation_id), payload, stream=EVT_STREAM, headers=headers
    )
    return int(ack.seq)


def raw_event(conversation_id: str, type_name: str, **fields: Any) -> bytes:
    body = {
        "type": type_name,
        "conversation_id": conversation_id,
        "at": time.time_ns(),
        "event_id": new_id(),
        **fields,
    }
    return json.dumps(body).encode()


async def forged_start(nc: NatsClient, conversation_id: str) -> str:
    """A `started` written straight to the log, as no actor would (no user message
    before it): the turn's id, for the entries the test writes after it."""
    turn = new_id()
    started = Started(
        conversation_id=conversation_id,
        at=time.time_ns(),
        event_id=new_id(),
        turn_id=turn,
        user_message_id=new_id(),
        model="demo",
    )
    await publish_raw(nc, conversation_id, encode(started))
    return turn


async def projected(services: Services, seq: int) -> Projector:
    projector = services.projector
    assert projector is not None
    async with asyncio.timeout(15), projector.applied:
        await projector.applied.wait_for(lambda: projector.position >= seq)
    return projector


async def projection_error(services: Services, seq: int) -> dict[str, Any] | None:
    projector = await projected(services, seq)
    row = await projector._pool.fetchrow(
        "SELECT seq, conversation_id, event_type, rule, reason FROM projection_errors"
        " WHERE projection = $1 AND seq = $2",
        projector.name,
        seq,
    )
    return None if row is None else dict(row)


async def log_lines(api: SseClient, conversation_id: str) -> list[dict[str, Any]]:
    async with asyncio.timeout(10):
        status, body = await api.request("GET", f"/v1/conversations/{conversation_id}/log")
    assert status == 200, body
    text = body if isinstance(body, str) else json.dumps(body)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_an_event_from_a_newer_version_is_shown_recorded_and_stepped_over(
    api: SseClient, nc: NatsClient, event_log: EventLog, services: Services
) -> None:
    cid = (await api.create_conversation())["id"]
    seq = await publish_raw(nc, cid, raw_event(cid, "reaction", emoji="👍", by="u-2"))

    lines = await log_lines(api, cid)
    assert [line["type"] for line in lines] == ["conversation_created", "reaction"], lines
    assert lines[1]["unreadable"] is True and lines[1]["seq"] == seq
    assert lines[1]["raw"]["emoji"] == "👍", lines[1]

    stored = await event_log.read(cid)
    assert isinstance(stored[-1].event, Unreadable) and not stored[-1].event.known_type

    # the actor skips it (forward compatibility): the conversation goes on
    events = await api.send_stream(cid, "still here? [[tokens=3]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events

    error = await projection_error(services, seq)
    assert error is not None and error["rule"] == "skipped" and error["event_type"] == "reaction"
    assert error["conversation_id"] == cid, error  # from its subject: unread, it names none

    # a viewer reading from the start gets every event it can decode, through to done
    async with asyncio.timeout(10), api.events(cid, after="0") as response:
        seen = await until_done(response)
    assert seen[-1].event == "done" and seen[-1].data == "ok"


async def test_text_postgres_cannot_hold_is_sanitised_and_the_projection_goes_on(
    api: SseClient, nc: NatsClient, services: Services
) -> None:
    cid = (await api.create_conversation())["id"]
    title = Title(
        conversation_id=cid, at=time.time_ns(), event_id=new_id(), title="a\x00b", source="user"
    )
    seq = await publish_raw(nc, cid, encode(title))

    error = await projection_error(services, seq)
    assert error is not None and error["rule"] == "sanitised", error
    assert "UntranslatableCharacter" in error["reason"] or "0x00" in error["reason"], error
    status, row = await api.request("GET", f"/v1/conversations/{cid}")
    assert status == 200 and row["title"] == "a\ufffdb", row

    # events after it are projected as usual
    events = await api.send_stream(cid, "after the poison [[tokens=3]]")
    assert events[-1].data == "ok"
    last = (await api.request("GET", f"/v1/conversations/{cid}"))[1]
    async with asyncio.timeout(10):
        while last["message_count"] != 2:
            await asyncio.sleep(0.05)
            last = (await api.request("GET", f"/v1/conversations/{cid}"))[1]


async def test_an_event_naming_another_conversation_is_not_projected_into_it(
    api: SseClient, nc: NatsClient, services: Services
) -> None:
    """A `title` on A's log that named B renamed B in the read model, though B's log
    holds no such event: one conversation's log could change another's rows (and a
    rebuild from B's own log would disagree). It is recorded against A, skipped."""
    victim = (await api.create_conversation(title="Ops runbook"))["id"]
    carrier = (await api.create_conversation())["id"]
    forged = Title(
        conversation_id=victim, at=time.time_ns(), event_id=new_id(), title="pwned", source="user"
    )
    seq = await publish_raw(nc, carrier, encode(forged))

    error = await projection_error(services, seq)
    assert error is not None and error["rule"] == "skipped", error
    assert (error["conversation_id"], error["event_type"]) == (carrier, "title"), error
    assert repr(victim) in error["reason"], error
    status, row = await api.request("GET", f"/v1/conversations/{victim}")
    assert status == 200 and row["title"] == "Ops runbook", row


async def test_a_damaged_event_makes_only_its_own_conversation_refuse_new_messages(
    api: SseClient, nc: NatsClient, event_log: EventLog, services: Services
) -> None:
    broken = (await api.create_conversation())["id"]
    healthy = (await api.create_conversation())["id"]
    # a known type whose fields do not decode: what it meant is lost
    seq = await publish_raw(nc, broken, raw_event(broken, "done", turn_id=5, content="?"))

    async def refused() -> tuple[int, Any]:
        return await api.request(
            "POST", f"/v1/conversations/{broken}/messages", json={"content": "hello?"}
        )

    async with asyncio.timeout(20):
        (status, body), answered = await asyncio.gather(
            refused(), api.send_stream(healthy, "meanwhile [[tokens=5]]")
        )
    # the actor refuses it (the edge answers with the actor's decision)
    assert status == 409 and body["error"]["code"] == "conversation_unreadable", body
    assert "new conversation" in body["error"]["message"]
    assert answered[-1].data == "ok", answered

    # asked for JSON, the same; the refusals are in the log for everyone to see
    status, body = await api.request(
        "POST",
        f"/v1/conversations/{broken}/messages",
        json={"content": "and now?"},
        headers={"Accept": "application/json"},
    )
    assert status == 409 and body["error"]["code"] == "conversation_unreadable", body
    rejected = [line for line in await log_lines(api, broken) if line["type"] == "command_rejected"]
    assert len(rejected) == 2, rejected
    stored = [s.event for s in await event_log.read(broken)]
    assert not any(isinstance(e, Started) for e in stored), stored

    error = await projection_error(services, seq)
    assert error is not None and error["rule"] == "skipped" and error["event_type"] == "done"
    assert error["conversation_id"] == broken, error


async def test_an_event_that_breaks_an_invariant_makes_the_conversation_refuse(
    api: SseClient, nc: NatsClient
) -> None:
    cid = (await api.create_conversation())["id"]
    # a second conversation_created: which owner, which project? not knowable
    await publish_raw(nc, cid, raw_event(cid, "conversation_created", user_id="someone-else"))
    async with asyncio.timeout(20):
        status, body = await api.request(
            "POST", f"/v1/conversations/{cid}/messages", json={"content": "hello?"}
        )
    assert status == 409 and body["error"]["code"] == "conversation_unreadable", body
    assert "conversation_created appears twice" in body["error"]["message"]


async def test_a_viewer_is_not_left_waiting_when_a_turns_end_cannot_be_read(
    api: SseClient, nc: NatsClient
) -> None:
    cid = (await api.create_conversation())["id"]
    turn = await forged_start(nc, cid)
    await publish_raw(nc, cid, raw_event(cid, "done", turn_id=turn, content=7))

    async with asyncio.timeout(15), api.events(cid, after="1") as response:
        seen = [e async for e in read_sse(response) if isinstance(e, SseEvent)]
    assert [e.event for e in seen] == ["started", "error", "done"], seen
    assert seen[1].raw["code"] == "turn_end_unreadable" and seen[2].data == "error"


async def test_readyz_counts_what_the_projection_could_not_apply(
    api: SseClient, nc: NatsClient, services: Services, http: aiohttp.ClientSession
) -> None:
    cid = (await api.create_conversation())["id"]
    seq = await publish_raw(nc, cid, b"\xff\xfe not even json")
    assert await projection_error(services, seq) is not None
    async with http.get(services.edge_url + "/readyz") as response:
        body = await response.json()
    assert response.status == 200 and body["projection_errors"] >= 1, body
    lines = await log_lines(api, cid)
    assert lines[-1]["unreadable"] is True and lines[-1]["type"] is None
    assert lines[-1]["raw"].endswith("not even json"), lines[-1]


async def test_headers_a_writer_put_on_its_entry_do_not_move_any_readers_position(
    api: SseClient, nc: NatsClient, stack: Servers
) -> None:
    """A direct get answers with the entry's own headers and the server's after them: a
    writer's `Nats-Sequence` must not be taken for the entry's position."""
    cid = (await api.create_conversation())["id"]
    lying = {"Nats-Sequence": "999999", "Nats-Last-Sequence": "999998", "Nats-Subject": "x.y"}
    first = await publish_raw(nc, cid, raw_event(cid, "title", title="one", source="user"), lying)
    second = await publish_raw(
        nc, cid, raw_event(cid, "title", title="two", source="user"), {"Nats-Sequence": "abc"}
    )

    # every role reads through a DirectClient, which hands the raw headers over
    direct = await connect_client(DirectClient(), stack.nats_url, name="test-lying-headers")
    try:
        stored = await EventLog(direct.jetstream()).read(cid)
    finally:
        await direct.close()
    assert [s.seq for s in stored][1:] == [first, second], stored

    # the worker reads its conversation the same way: it still serves it
    async with asyncio.timeout(20):
        events = await api.send_stream(cid, "still here? [[tokens=3]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events

    # and a viewer from the start gets every event through to that turn's end
    async with asyncio.timeout(10), api.events(cid, after="0") as response:
        seen = await until_done(response)
    assert [e.event for e in seen][:2] == ["title", "title"], seen
    assert seen[-1].event == "done" and seen[-1].data == "ok", seen


async def test_tool_json_python_cannot_use_neither_ends_the_feed_nor_stops_its_viewers(
    api: SseClient, nc: NatsClient
) -> None:
    """What a model may write as a tool's arguments (or a tool return), valid JSON that
    Python's parser turns into an error or into a string no encoder takes."""
    cid = (await api.create_conversation())["id"]
    turn = await forged_start(nc, cid)
    huge = '{"n": ' + "1" * 5000 + "}"
    for call, text in (("c1", huge), ("c2", '{"s": "\\ud800"}')):
        fields = {"turn_id": turn, "call_id": call, "name": "calculator"}
        await publish_raw(nc, cid, raw_event(cid, "tool_call", arguments=text, **fields))
        await publish_raw(nc, cid, raw_event(cid, "tool_result", result=text, **fields))
    end = {"content": [], "stop_reason": "stop", "input_tokens": 1, "output_tokens": 1}
    await publish_raw(nc, cid, raw_event(cid, "done", turn_id=turn, idle=True, **end))

    async with asyncio.timeout(10), api.events(cid, after="0") as response:
        seen = await until_done(response)
    kinds = [e.event for e in seen]
    assert kinds == ["started", "tool_call", "tool_result", "tool_call", "tool_result", "done"]
    assert seen[1].data["arguments"] == {} and seen[1].raw["raw_arguments"] == huge, seen[1]
    assert seen[3].data["arguments"] == {"s": "\ufffd"}, seen[3]
    assert seen[-1].data == "ok"

    # the conversation goes on, and its stream with it
    async with asyncio.timeout(20):
        events = await api.send_stream(cid, "still here? [[tokens=3]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events
