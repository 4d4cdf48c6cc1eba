"""At-least-once delivery, exactly-once effect: redelivered commands, repeated keys, dead workers."""

from __future__ import annotations

import asyncio
import time

import msgspec
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient

from api.turn_routes import IdempotencyRecord, idem_key, request_digest
from events.codec import encode
from events.ids import new_id
from events.log import EventLog
from events.subjects import CMD_STREAM, command_subject
from events.vocabulary import Failed, Prices, SendMessage, Started, UserMessage
from parley.services import Servers
from tests.conftest import Projected
from tests.sse import SseClient


async def _wait_for_turns(event_log: EventLog, cid: str, count: int) -> None:
    async with asyncio.timeout(20):
        while True:
            ends = [s for s in await event_log.read(cid) if s.event.__class__.__name__ == "Done"]
            if len(ends) >= count:
                return
            await asyncio.sleep(0.05)


async def test_a_command_delivered_twice_is_applied_once(
    api: SseClient, nc: NatsClient, event_log: EventLog, user: str
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    command = SendMessage(
        conversation_id=cid,
        command_id=new_id(),
        user_id=user,
        at=time.time_ns(),
        message_id=new_id(),
        content="only once [[tokens=3]]",
    )
    js = nc.jetstream()
    # Two copies with different Nats-Msg-Ids get past the broker's duplicate
    # window, as a redelivery after it would: the actor must still apply one.
    for _ in range(2):
        await js.publish(
            command_subject(cid),
            encode(command),
            stream=CMD_STREAM,
            headers={"Nats-Msg-Id": new_id()},
        )
    await _wait_for_turns(event_log, cid, 1)
    await asyncio.sleep(0.5)  # time for a second (wrong) turn to show up
    log = await event_log.read(cid)
    assert len([s for s in log if isinstance(s.event, UserMessage)]) == 1
    assert len([s for s in log if isinstance(s.event, Started)]) == 1


async def test_a_repeated_idempotency_key_returns_the_same_message_and_one_turn(
    api: SseClient, event_log: EventLog
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    first = await api.send_json(cid, "hello [[tokens=5]]", idempotency_key="key-1")
    again = await api.send_json(cid, "hello [[tokens=5]]", idempotency_key="key-1")
    assert again["message_id"] == first["message_id"]
    # the retried POST can also stream: it gets the same turn through its done
    streamed = await api.send_stream(cid, "hello [[tokens=5]]", idempotency_key="key-1")
    assert streamed[-1].data == "ok"
    assert "".join(e.data for e in streamed if e.event == "token").split() == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    status, body = await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages",
        json={"content": "something else", "idempotency_key": "key-1"},
    )
    assert status == 422 and body["error"]["code"] == "idempotency_mismatch"
    log = await event_log.read(cid)
    assert len([s for s in log if isinstance(s.event, UserMessage)]) == 1


async def test_a_turn_abandoned_by_a_dead_worker_is_failed_before_the_next_turn(
    api: SseClient, event_log: EventLog, user: str, projected: Projected
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    # What a worker that died mid-turn leaves behind: a started turn, no end.
    head = await event_log.last_seq(cid)
    now = time.time_ns()
    user_message = UserMessage(
        conversation_id=cid,
        at=now,
        event_id=new_id(),
        message_id=new_id(),
        content="lost",
        user_id=user,
    )
    turn_id = new_id()
    started = Started(
        conversation_id=cid,
        at=now,
        event_id=new_id(),
        turn_id=turn_id,
        user_message_id=user_message.message_id,
        model="demo",
        prices=Prices(input_price=3.0, output_price=15.0),
    )
    await event_log.append(cid, [user_message, started], expected_seq=head)

    events = await api.send_stream(cid, "are you there? [[tokens=2]]")
    assert events[-1].data == "ok"
    log = await event_log.read(cid)
    failed = [s.event for s in log if isinstance(s.event, Failed)]
    assert len(failed) == 1 and failed[0].turn_id == turn_id and failed[0].code == "worker_lost"
    # what it consumed is counted from the log (its history was sent), flagged as estimated
    assert failed[0].tokens_estimated and failed[0].input_tokens > 0, failed[0]
    await projected(cid)  # the projection follows the log asynchronously
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages")
    assert status == 200
    statuses = [m["status"] for m in body["messages"] if m["role"] == "assistant"]
    assert statuses == ["failed", "complete"]


async def test_a_key_reserved_by_a_request_that_died_before_publishing_still_sends_once(
    api: SseClient, event_log: EventLog, stack: Servers, user: str
) -> None:
    """The edge reserves a key, then publishes. A crash in between left a reservation and
    no command: the retry with the same key must send the message, not wait a day."""
    cid = (await api.create_conversation())["id"]
    content = "hello again [[tokens=4]]"
    orphan = IdempotencyRecord(
        message_id=new_id(),
        command_id=new_id(),
        after=await event_log.last_seq(cid),
        digest=request_digest(("send", content, None)),
    )
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        key = idem_key(user, cid, "crashed-key")
        await redis.set(key, msgspec.json.encode(orphan), ex=60)
        streamed = await api.send_stream(cid, content, idempotency_key="crashed-key")
        assert streamed[-1].data == "ok", streamed
        assert streamed[0].data["user_message_id"] == orphan.message_id
        ttl = await redis.ttl(key)
        assert ttl > 3600, f"after publishing, the key is kept for the full TTL, saw {ttl}s"
    finally:
        await redis.aclose()
    again = await api.send_json(cid, content, idempotency_key="crashed-key")
    assert again["message_id"] == orphan.message_id
    users = [s for s in await event_log.read(cid) if isinstance(s.event, UserMessage)]
    assert len(users) == 1, users
