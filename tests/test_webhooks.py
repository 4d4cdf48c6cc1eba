"""Turn-end webhooks against a receiver that refuses the first attempts and checks every
signature: each end arrives, signed, under a stable id, and a restarted dispatcher
neither loses one nor invents one."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NatsClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from actors import webhooks
from actors.webhooks import (
    DURABLE,
    WebhookDispatcher,
    WebhookSettings,
    backoff,
    payload,
    secret_bytes,
    sign,
)
from events.codec import encode
from events.ids import new_id
from events.log import EventLog
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import (
    BillingRejected,
    Cancelled,
    ConversationDeleted,
    Done,
    Failed,
    UnsentEnd,
)
from parley.metrics import Metrics
from parley.services import Services
from tests.sse import SseClient
from tests.test_deletion import _until_erased

SECRET = "whsec_" + base64.b64encode(b"a receiver's shared secret, 32 bytes").decode()


@dataclass
class Receiver:
    """Refuses each webhook id's first `refuse` attempts with a 503, then takes it; checks
    every signature with the Standard Webhooks library, as a team's receiver does."""

    refuse: int = 2
    secret: str = SECRET
    # while set, a POST is held unanswered (a receiver that hangs) until it is cleared
    hang: bool = False
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    answer: asyncio.Event = field(default_factory=asyncio.Event)
    attempts: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_signatures: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # while set, every POST is answered with this redirect (status, Location)
    redirect: tuple[int, str] | None = None
    # requests that arrived at /elsewhere, a redirect's target: (method, body)
    elsewhere: list[tuple[str, bytes]] = field(default_factory=list)
    # how long each POST takes to be answered (a slow receiver)
    delay_s: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers["webhook-id"]
        try:
            Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=401)
        self.attempts[webhook_id] = self.attempts.get(webhook_id, 0) + 1
        if self.redirect is not None:
            status, location = self.redirect
            return web.Response(status=status, headers={"Location": location})
        if self.hang:
            self.hanging.set()
            await self.answer.wait()
            return web.Response(status=503)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.attempts[webhook_id] <= self.refuse:
            return web.Response(status=503)
        self.accepted.setdefault(webhook_id, json.loads(body))
        self.arrived.set()
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hook = Receiver()
    # bodies as big as the longest answers (aiohttp's default refuses over 1 MiB)
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/hook", hook.handle)

    async def elsewhere(request: web.Request) -> web.Response:
        hook.elsewhere.append((request.method, await request.read()))
        return web.Response(status=200)

    app.router.add_route("*", "/elsewhere", elsewhere)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield hook, str(server.make_url("/hook"))
    await server.close()


class Running:
    def __init__(
        self,
        nc: NatsClient,
        url: str,
        metrics: Metrics | None = None,
        secret: str = SECRET,
        first_retry_s: float = 0.05,
    ) -> None:
        self.stopping = asyncio.Event()
        self.http = aiohttp.ClientSession()
        # retries come quickly here (the schedule itself is tested below)
        self.dispatcher = WebhookDispatcher(
            nc.jetstream(),
            WebhookSettings(url=url, secret=secret),
            self.http,
            first_retry_s=first_retry_s,
            observer=metrics,
        )
        self.task = asyncio.create_task(self.dispatcher.run(self.stopping))

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 15)
        await self.http.close()


async def until(check: Any, seconds: float = 60) -> None:
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 (a receiver's state, no event to await)
            await asyncio.sleep(0.05)


def a_done(
    conversation_id: str,
    *,
    at: int | None = None,
    event_id: str | None = None,
    turn_id: str | None = None,
    output_tokens: int = 1,
) -> Done:
    """A turn's end as the log holds it: now, with fresh ids, unless told otherwise."""
    return Done(
        conversation_id=conversation_id,
        at=time.time_ns() if at is None else at,
        event_id=event_id or new_id(),
        turn_id=turn_id or new_id(),
        content=[],
        stop_reason="stop",
        input_tokens=1,
        output_tokens=output_tokens,
    )


async def test_every_turn_end_is_delivered_signed_once_per_id_through_refusals_and_a_restart(
    api: SseClient,
    services: Services,
    nc: NatsClient,
    event_log: EventLog,
    receiver: tuple[Receiver, str],
) -> None:
    hook, url = receiver
    running = Running(nc, url)
    await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
    cid = (await api.create_conversation())["id"]
    first = await api.send_stream(cid, "one [[tokens=3]]")
    failed = await api.send_stream(cid, "two [[fail=cut]]")
    await until(lambda: len(hook.accepted) >= 2)
    # stopped with nothing pending; the next ends arrive after a restart
    await running.stop()
    third = await api.send_stream(cid, "three [[tokens=3]]")
    running = Running(nc, url)
    try:
        await until(lambda: len(hook.accepted) >= 3)
    finally:
        await running.stop()
    assert first[-1].data == "ok" and failed[-1].data == "error" and third[-1].data == "ok"

    ends = [s for s in await event_log.read(cid) if isinstance(s.event, Done | Failed)]
    ids = [s.event.event_id for s in ends if isinstance(s.event, Done | Failed)]
    assert sorted(hook.accepted) == sorted(ids), (hook.accepted.keys(), ids)
    assert all(hook.attempts[i] == hook.refuse + 1 for i in ids), hook.attempts
    assert hook.bad_signatures == 0
    kinds = [hook.accepted[i]["type"] for i in ids]
    assert kinds == ["turn.done", "turn.failed", "turn.done"], kinds
    done = hook.accepted[ids[0]]["data"]
    assert done["conversation_id"] == cid and done["turn_id"] == first[0].data["turn_id"]
    assert done["seq"] == ends[0].seq and done["stop_reason"] in ("stop", "length")
    assert hook.accepted[ids[1]]["data"]["code"] == "stream_cut"


# base64 of 35 bytes: with and without the prefix, with and without the padding
_KEY = "Zm9yIGEgcmVjZWl2ZXIgb2YgdHVybiBlbmRzLCAzMiBieXQ="


@pytest.mark.parametrize("secret", [_KEY, _KEY.rstrip("="), "whsec_" + _KEY.rstrip("=")])
async def test_a_receiver_given_the_same_secret_verifies_every_form_of_it(
    api: SseClient, nc: NatsClient, receiver: tuple[Receiver, str], secret: str
) -> None:
    """A secret without `whsec_` was signed with as its own bytes, while the standard's
    libraries decode every secret as base64: each delivery failed their check."""
    hook, url = receiver
    hook.refuse, hook.secret = 0, secret
    running = Running(nc, url, secret=secret)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = (await api.create_conversation())["id"]
        await api.send_stream(cid, "one [[tokens=3]]")
        await until(lambda: len(hook.accepted) == 1 or hook.bad_signatures > 0)
    finally:
        await running.stop()
    assert (hook.bad_signatures, len(hook.accepted)) == (0, 1)


async def test_a_stopping_dispatcher_hands_back_what_a_hanging_receiver_holds(
    api: SseClient, nc: NatsClient, receiver: tuple[Receiver, str]
) -> None:
    """It does not wait out the receiver's 10 s timeout, and the end it was sending is
    sent again at once by the next dispatcher, not after its 30 s ack wait."""
    hook, url = receiver
    hook.refuse, hook.hang = 0, True
    running = Running(nc, url)
    await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "one [[tokens=3]]")
    await asyncio.wait_for(hook.hanging.wait(), 30)
    running.stopping.set()
    await asyncio.wait_for(running.task, 5)  # not the receiver's 10 s
    await running.http.close()
    hook.hang = False
    hook.answer.set()
    running = Running(nc, url)
    try:
        await until(lambda: len(hook.accepted) == 1, seconds=15)  # not the 30 s ack wait
    finally:
        await running.stop()


@pytest.mark.parametrize("status", [302, 308])
async def test_a_redirect_is_an_attempt_that_failed_never_followed(
    api: SseClient, nc: NatsClient, receiver: tuple[Receiver, str], status: int
) -> None:
    """A 302 followed turned the POST into a bodyless GET whose 200 acknowledged the
    end (lost); a 308 followed sent the signed body wherever Location said."""
    hook, url = receiver
    hook.refuse = 0
    hook.redirect = (status, url.replace("/hook", "/elsewhere"))
    running = Running(nc, url)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = (await api.create_conversation())["id"]
        await api.send_stream(cid, "one [[tokens=3]]")
        # the first attempt either went elsewhere or failed and was retried
        await until(lambda: hook.elsewhere or sum(hook.attempts.values()) >= 2)
        assert hook.elsewhere == [], hook.elsewhere
        hook.redirect = None
        await until(lambda: len(hook.accepted) == 1)
    finally:
        await running.stop()
    assert hook.elsewhere == [] and hook.bad_signatures == 0


async def test_attempts_are_counted_by_outcome_for_the_operator(
    api: SseClient, nc: NatsClient, receiver: tuple[Receiver, str]
) -> None:
    """A receiver that is away or refusing shows on /metrics, not only in the logs."""
    hook, url = receiver
    hook.refuse = 1
    metrics = Metrics()

    def count(outcome: str) -> float:
        found = metrics.registry.get_sample_value(
            "parley_webhook_attempts_total", {"outcome": outcome}
        )
        return found or 0.0

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{free.getsockname()[1]}/hook"
    running = Running(nc, dead, metrics)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = (await api.create_conversation())["id"]
        await api.send_stream(cid, "one [[tokens=3]]")
        await until(lambda: count("unanswered") >= 1)
    finally:
        await running.stop()
    running = Running(nc, url, metrics)
    try:
        await until(lambda: len(hook.accepted) >= 1)
    finally:
        await running.stop()
    assert count("delivered") == len(hook.accepted), hook.accepted.keys()
    assert count("refused") == sum(min(n, hook.refuse) for n in hook.attempts.values())
    assert count("refused") >= 1
    ages = metrics.registry.get_sample_value(
        "parley_webhook_attempt_end_age_seconds_count", {"outcome": "delivered"}
    )
    assert ages == count("delivered")


async def test_an_end_that_cannot_be_read_is_reported_and_the_next_one_delivered(
    nc: NatsClient,
    event_log: EventLog,
    receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Damage in the log under an end's tag: nothing to send, but said, not skipped silently."""
    hook, url = receiver
    hook.refuse = 0
    js = nc.jetstream()
    running = Running(nc, url)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = new_id()
        damaged = await js.publish(
            event_subject(cid), b'{"type":"done","conversation_id":7}', stream=EVT_STREAM
        )
        end = a_done(cid)
        await js.publish(event_subject(cid), encode(end), stream=EVT_STREAM)
        await until(lambda: end.event_id in hook.accepted)
    finally:
        await running.stop()
    reports = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert [
        (r.levelname, r.__dict__.get("conversation_id"), r.__dict__.get("seq")) for r in reports
    ] == [("ERROR", cid, damaged.seq)], caplog.text


def test_the_signature_is_the_standard_webhooks_one_and_retries_back_off() -> None:
    secret = secret_bytes(SECRET)
    assert secret == b"a receiver's shared secret, 32 bytes"
    body = b'{"a":1}'
    expected = (
        "v1,"
        + base64.b64encode(
            hmac.new(secret, b"msg_1.1700000000." + body, hashlib.sha256).digest()
        ).decode()
    )
    assert sign(secret, "msg_1", 1_700_000_000, body) == expected
    assert secret_bytes(SECRET.removeprefix("whsec_").rstrip("=")) == secret
    with pytest.raises(ValueError, match="not base64"):
        secret_bytes("plain-secret")
    random.seed(7)
    delays = [backoff(n) for n in range(1, 16)]
    assert 0.5 <= delays[0] <= 1.0 and delays[-1] <= 3600
    assert all(b >= a / 2 for a, b in itertools.pairwise(delays))
    # a receiver away for a month: JetStream has counted over a thousand deliveries
    assert all(1800 <= backoff(n) <= 3600 for n in (1024, 1025, 5000, 10**9))
    done = a_done("c", at=0, event_id="e", turn_id="t", output_tokens=2)
    decoded = json.loads(payload(9, done))
    assert decoded["type"] == "turn.done" and decoded["data"]["seq"] == 9


async def test_an_end_whose_id_cannot_be_a_header_is_passed_over_and_the_rest_delivered(
    api: SseClient, nc: NatsClient, receiver: tuple[Receiver, str]
) -> None:
    """A turn's end in the log whose event id holds a line break (or anything else no
    `webhook-id` header may carry) can never be sent: it is logged and passed over,
    not retried for ever, and the dispatcher goes on with every other end."""
    hook, url = receiver
    hook.refuse = 0
    running = Running(nc, url)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = (await api.create_conversation())["id"]
        bad = {
            "type": "done",
            "conversation_id": cid,
            "at": 1,
            "event_id": "an id\r\nX-Injected: 1",
            "turn_id": "t-1",
            "content": [],
            "stop_reason": "stop",
            "input_tokens": 1,
            "output_tokens": 1,
        }
        await nc.jetstream().publish(
            f"chat.evt.{cid}", json.dumps(bad, separators=(",", ":")).encode()
        )
        await api.send_stream(cid, "one [[tokens=3]]")
        await until(lambda: len(hook.accepted) == 1 or running.task.done(), seconds=15)
        assert not running.task.done(), running.task
        [accepted] = hook.accepted.values()
        assert accepted["data"]["conversation_id"] == cid, accepted
    finally:
        await running.stop()


async def test_an_answer_too_big_for_one_event_arrives_with_all_its_content(
    api: SseClient, nc: NatsClient, receiver: tuple[Receiver, str]
) -> None:
    """An end whose content would not fit in one event carries `content: []` in the
    log (its text is in the `content_part` events before it): the receiver was sent
    an empty answer, as if the model had said nothing."""
    hook, url = receiver
    hook.refuse = 0
    size = 2_000_000
    running = Running(nc, url)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = (await api.create_conversation())["id"]
        events = await api.send_stream(cid, f"a long one please [[bulk={size}]]")
        assert events[-1].data == "ok"
        await until(lambda: len(hook.accepted) == 1)
    finally:
        await running.stop()
    [accepted] = hook.accepted.values()
    answer = "".join(b["content"] for b in accepted["data"]["content"] if b["role"] == "assistant")
    streamed = "".join(e.data for e in events if e.event == "token")
    assert len(answer) == size and answer == streamed, (len(answer), len(streamed))


async def test_the_ends_of_a_deleted_conversation_arrive_without_its_text(
    api: SseClient, nc: NatsClient, event_log: EventLog, receiver: tuple[Receiver, str]
) -> None:
    """A conversation deleted while its ends waited to be sent again (a receiver that
    refused them, or was down), or while its turn ran: the purge took the ends, and
    their redeliveries with them, and the receiver never heard of those turns (nor of
    their tokens). They come from the tombstone now, under the same ids, content-free."""
    hook, url = receiver
    hook.refuse = 10**9  # until the conversation is erased
    running = Running(nc, url)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = (await api.create_conversation())["id"]
        assert (await api.send_stream(cid, "the launch code [[tokens=3]]"))[-1].data == "ok"
        await until(lambda: len(hook.attempts) == 1)  # refused: it waits to be sent again
        await api.send_json(cid, "a long one [[tokens=2000]]")  # stopped by the delete
        status, body = await api.request("DELETE", f"/v1/conversations/{cid}")
        assert status == 202, body
        tombstone = await _until_erased(event_log, cid)
        hook.refuse = 0
        await until(lambda: len(hook.accepted) == 2)
    finally:
        await running.stop()
    ends = {u.end.event_id: u for u in tombstone.unsent_ends}
    assert sorted(hook.accepted) == sorted(ends), (hook.accepted.keys(), ends.keys())
    by_type = {a["type"]: a["data"] for a in hook.accepted.values()}
    assert sorted(by_type) == ["turn.cancelled", "turn.done"], by_type
    assert by_type["turn.done"]["output_tokens"] == 3
    assert by_type["turn.cancelled"]["reason"] == "user"
    for data in by_type.values():
        assert data["conversation_id"] == cid and data["erased"] is True, data
        assert data["content"] == [] and data["seq"] == ends[data["event_id"]].seq, data
    assert hook.bad_signatures == 0


async def test_a_tombstone_of_many_ends_to_a_slow_receiver_is_sent_once(
    nc: NatsClient,
    event_log: EventLog,
    receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tombstone's ends are sent one after another; with hundreds of them and a
    receiver taking 100 ms each, sending them outlasted the entry's `ack_wait`, and the
    server handed the tombstone out again: a second task sent them all again beside the
    first, then a third, every `ack_wait`. Here at a smaller scale: an ack_wait of 6 s
    against 16 ends of 0.5 s each."""
    monkeypatch.setattr(webhooks, "_TIMEOUT_S", 2.0)  # ack_wait: three of it
    hook, url = receiver
    hook.refuse = 0
    hook.delay_s = 0.5
    js = nc.jetstream()
    running = Running(nc, url)
    cid = new_id()
    ends = [
        UnsentEnd(
            seq=seq,
            end=a_done(cid),
        )
        for seq in range(1, 17)
    ]
    tombstone = ConversationDeleted(
        conversation_id=cid,
        at=time.time_ns(),
        event_id=new_id(),
        user_id="someone",
        command_id=new_id(),
        turn_ids=[u.end.turn_id for u in ends],
        unsent_ends=ends,
    )
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        await js.publish(event_subject(cid), encode(tombstone), stream=EVT_STREAM)
        # a second copy would have begun 6 s in, 2 s before the first one's end
        await until(lambda: len(hook.accepted) == len(ends), seconds=30)
    finally:
        await running.stop()
        await js.delete_consumer(EVT_STREAM, DURABLE)
    assert sorted(hook.accepted) == sorted(u.end.event_id for u in ends)
    assert hook.attempts == dict.fromkeys(hook.accepted, 1), hook.attempts


async def test_a_new_end_is_sent_at_once_while_a_thousand_wait_for_their_retry(
    nc: NatsClient, event_log: EventLog, receiver: tuple[Receiver, str]
) -> None:
    """After a receiver's outage, a thousand ends wait for their next attempt (up to an
    hour apart). They filled the consumer's window of ends handed out and not yet
    acknowledged, so no new end was read until one of their retries came: a receiver
    back up heard of new turns only as the old ends' timers ran out, an hour later."""
    hook, url = receiver
    hook.refuse = 10**9
    js = nc.jetstream()
    # the retries of what the receiver refuses come 30-60 s later
    running = Running(nc, url, first_retry_s=60.0)
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        cid = new_id()
        for _ in range(1_000):
            end = a_done(cid)
            await js.publish(event_subject(cid), encode(end), stream=EVT_STREAM)
        await until(lambda: len(hook.attempts) == 1_000)
        hook.refuse = 0  # the receiver is back
        late = msgspec.structs.replace(end, event_id=new_id(), turn_id=new_id())
        await js.publish(event_subject(cid), encode(late), stream=EVT_STREAM)
        await until(lambda: late.event_id in hook.accepted, seconds=20)
    finally:
        await running.stop()
        # what waits for its retry is not sent into the next test
        await js.delete_consumer(EVT_STREAM, DURABLE)


async def test_a_refusing_receiver_is_logged_without_a_line_for_every_attempt(
    nc: NatsClient,
    event_log: EventLog,
    receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A receiver down for an hour with a thousand ends waiting made a warning for each
    of their attempts, thousands of lines saying one thing. Now: the first failure with
    its reason, a line a minute at most while they go on, and one when ends are taken."""
    hook, url = receiver
    hook.refuse = 3
    caplog.set_level(logging.INFO, logger="actors.webhooks")
    running = Running(nc, url)
    cid = new_id()
    try:
        await asyncio.wait_for(running.dispatcher.ready.wait(), 10)
        for _ in range(20):
            end = a_done(cid)
            await nc.jetstream().publish(event_subject(cid), encode(end), stream=EVT_STREAM)
        await until(lambda: len(hook.accepted) == 20)
    finally:
        await running.stop()
    assert sum(hook.attempts.values()) == 20 * 4  # 60 refused
    lines = [r for r in caplog.records if r.name == "actors.webhooks"]
    warnings = [r for r in lines if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    [failed] = warnings
    assert failed.__dict__["reason"] == "HTTP 503" and failed.__dict__["conversation_id"] == cid
    taken = [r for r in lines if r.getMessage() == "webhooks are taken again"]
    assert len(taken) == 1, [r.getMessage() for r in lines]


def test_every_kind_of_end_carries_the_fields_the_readme_lists() -> None:
    """`billing_rejected` had no `content` nor tokens: a receiver that reads the listed
    fields of every end (billing reconciliation adds up the tokens) failed on it."""
    done = a_done("c", at=0, event_id="e", turn_id="t", output_tokens=2)
    ends: list[Done | Cancelled | Failed | BillingRejected] = [
        done,
        Cancelled(conversation_id="c", at=0, event_id="e", turn_id="t", content=[]),
        Failed(conversation_id="c", at=0, event_id="e", turn_id="t", code="x", message="m"),
        BillingRejected(
            conversation_id="c",
            at=0,
            event_id="e",
            turn_id="t",
            user_message_id="m",
            account="user:a",
            needed=5,
            available=0,
        ),
    ]
    listed = {"conversation_id", "turn_id", "event_id", "seq", "content", "input_tokens"}
    listed |= {"output_tokens", "tokens_estimated"}
    for end in ends:
        data = json.loads(payload(3, end))["data"]
        assert listed <= data.keys(), (type(end).__name__, listed - data.keys())
