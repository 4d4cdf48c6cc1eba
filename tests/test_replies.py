"""Requests answered on one inbox (events.replies) on real NATS and JetStream, through a
plain client's callback and straight from a DirectClient's read loop."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from events.ids import new_id
from events.log import EventLog
from events.replies import Replies, no_responders
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import Title

DIRECT_GET = f"$JS.API.DIRECT.GET.{EVT_STREAM}"


async def test_concurrent_requests_each_get_their_own_answer(plain_or_direct: NatsClient) -> None:
    subject = f"echo.{new_id()}"

    async def echo(msg: Msg) -> None:
        await msg.respond(b"re:" + msg.data)

    sub = await plain_or_direct.subscribe(subject, cb=echo)
    replies = Replies(plain_or_direct)
    try:
        answers = await asyncio.gather(
            *(replies.request(subject, str(i).encode(), 5.0) for i in range(20))
        )
    finally:
        await sub.unsubscribe()
    assert [a.data for a in answers] == [f"re:{i}".encode() for i in range(20)]
    assert all(a.status is None for a in answers)
    assert replies.waiting == 0


async def test_a_subject_nobody_listens_on_answers_no_responders(
    plain_or_direct: NatsClient,
) -> None:
    answer = await Replies(plain_or_direct).request(f"nowhere.{new_id()}", b"", 5.0)
    assert no_responders(answer)


async def test_silence_is_a_timeout_and_leaves_nothing_waiting(plain_or_direct: NatsClient) -> None:
    subject = f"silent.{new_id()}"
    sub = await plain_or_direct.subscribe(subject)  # receives, never answers
    replies = Replies(plain_or_direct)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await replies.request(subject, b"", 0.2)
    finally:
        await sub.unsubscribe()
    assert replies.waiting == 0


async def test_a_batched_direct_get_is_collected_up_to_its_end(
    plain_or_direct: NatsClient, event_log: EventLog
) -> None:
    cid = new_id()
    head = 0
    for i in range(3):
        title = Title(conversation_id=cid, at=1, event_id=new_id(), title=f"t{i}", source="user")
        head = await event_log.append(cid, [title], head)
    replies = Replies(plain_or_direct)
    request = {"seq": 1, "batch": 10, "next_by_subj": event_subject(cid)}
    *entries, end = await replies.request_many(DIRECT_GET, msgspec.json.encode(request), 5.0)
    assert end.status == "204" and end.header(b"Nats-Num-Pending") == "0"
    assert [e.status for e in entries] == [None] * 3
    assert [e.header(b"Nats-Subject") for e in entries] == [event_subject(cid)] * 3
    assert int(entries[-1].header(b"Nats-Sequence") or 0) == head
    assert [msgspec.json.decode(e.data)["title"] for e in entries] == ["t0", "t1", "t2"]

    request = {"seq": 1, "batch": 10, "next_by_subj": event_subject(new_id())}
    [nothing] = await replies.request_many(DIRECT_GET, msgspec.json.encode(request), 5.0)
    assert nothing.status == "404"
    assert replies.waiting == 0


async def test_a_silent_request_times_out_on_its_own_limit_while_others_are_answered(
    plain_or_direct: NatsClient,
) -> None:
    silent, echo = f"silent.{new_id()}", f"echo.{new_id()}"

    async def respond(msg: Msg) -> None:
        await msg.respond(msg.data)

    subs = [
        await plain_or_direct.subscribe(silent),
        await plain_or_direct.subscribe(echo, cb=respond),
    ]
    replies = Replies(plain_or_direct)
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        slow = asyncio.create_task(replies.request(silent, b"", 0.3))
        answered = [await replies.request(echo, str(i).encode(), 5.0) for i in range(20)]
        assert [a.data for a in answered] == [str(i).encode() for i in range(20)]
        with pytest.raises(nats.errors.TimeoutError):
            await slow
        # uvloop's clock counts whole milliseconds, as of the loop's pass: the timer
        # may read 0.299 s as 0.3 (one full run of the suite saw it)
        assert loop.time() - began >= 0.3 - 0.002, "timed out before its limit"
        # and the limit is still kept once nothing else is in flight
        with pytest.raises(nats.errors.TimeoutError):
            await replies.request(silent, b"", 0.1)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    assert replies.waiting == 0
