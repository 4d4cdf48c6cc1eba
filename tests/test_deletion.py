"""Deleting a conversation: `DELETE /v1/conversations/{id}` erases it, it does not hide it.

The running turn is stopped and billed as a Stop is, the queue refused, a
`conversation_deleted` tombstone appended and every earlier entry of the
conversation's subject purged; the read models drop its rows, every edge answers
404 for it, and the billing audit and a rebuild still agree with the log.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient

from events.codec import encode
from events.ids import new_id
from events.log import EventLog, StoredEvent
from events.subjects import CMD_STREAM, account_subject, command_subject
from events.vocabulary import (
    Cancelled,
    Chunk,
    CommandRejected,
    ConversationDeleted,
    DeleteConversation,
    Event,
    Started,
    TurnCharged,
)
from parley.services import Servers, Services
from projections.db import drop_schema
from tests.conftest import SECRET, Projected, extra_edge, token_for
from tests.sse import SseClient, SseEvent, read_sse
from tests.test_audit import audit, funded_project
from tests.test_cli import run, server_env
from tests.test_projection_rebuild import _billing_snapshot, _differences, _snapshot


async def _until_erased(event_log: EventLog, cid: str) -> ConversationDeleted:
    """The conversation's log once it holds only its tombstone."""
    async with asyncio.timeout(15):
        while True:
            entries = await event_log.read(cid)
            if len(entries) == 1 and isinstance(entries[0].event, ConversationDeleted):
                return entries[0].event
            await asyncio.sleep(0.05)


async def _rows(stack: Servers, cid: str) -> dict[str, int]:
    db = await asyncpg.connect(stack.database_url)
    try:
        return {
            "conversations": await db.fetchval(
                "SELECT count(*) FROM parley_test.conversations WHERE id = $1", cid
            ),
            "messages": await db.fetchval(
                "SELECT count(*) FROM parley_test.messages WHERE conversation_id = $1", cid
            ),
        }
    finally:
        await db.close()


async def test_deleting_an_idle_conversation_erases_its_log_and_rows_and_answers_404_after(
    api: SseClient, user: str, event_log: EventLog, stack: Servers, projected: Projected
) -> None:
    cid = (await api.create_conversation())["id"]
    assert (await api.send_stream(cid, "remember the launch code [[tokens=5]]"))[-1].data == "ok"
    await projected(cid)
    assert await _rows(stack, cid) == {"conversations": 1, "messages": 2}
    turns = [s.event.turn_id for s in await event_log.read(cid) if isinstance(s.event, Started)]

    status, body = await api.request("DELETE", f"/v1/conversations/{cid}")
    assert (status, body) == (202, {"id": cid, "deleted": True}), body
    # the answer waited for the read models to drop it
    assert await _rows(stack, cid) == {"conversations": 0, "messages": 0}
    tombstone = await _until_erased(event_log, cid)
    assert tombstone.turn_ids == turns and tombstone.user_id == user

    for method, path in (
        ("GET", f"/v1/conversations/{cid}"),
        ("GET", f"/v1/conversations/{cid}/messages"),
        ("GET", f"/v1/conversations/{cid}/log"),
        ("GET", f"/v1/conversations/{cid}/events"),
        ("PATCH", f"/v1/conversations/{cid}"),
        ("DELETE", f"/v1/conversations/{cid}"),
    ):
        kwargs: dict[str, Any] = {"json": {"title": "back"}} if method == "PATCH" else {}
        status, body = await api.request(method, path, **kwargs)
        assert status == 404, (method, path, status, body)
    status, listed = await api.request("GET", "/v1/conversations")
    assert status == 200 and cid not in {c["id"] for c in listed["conversations"]}, listed


async def test_deleting_a_conversation_leaves_no_redis_key_of_it_behind(
    api: SseClient, event_log: EventLog, stack: Servers
) -> None:
    """An idempotency key's record holds the request's message id and the digest of
    its text, for a day: a deleted conversation's go with its snapshot and record."""
    cid = (await api.create_conversation())["id"]
    sent = await api.send_stream(cid, "my secret [[tokens=3]]", idempotency_key="once")
    assert sent[-1].data == "ok"
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        assert [k async for k in redis.scan_iter(match=f"parley:idem:{cid}:*")]
        status, _ = await api.request("DELETE", f"/v1/conversations/{cid}")
        assert status == 202
        await _until_erased(event_log, cid)
        async with asyncio.timeout(10):
            while left := [k async for k in redis.scan_iter(match=f"*{cid}*")]:  # noqa: ASYNC110 (in Redis)
                await asyncio.sleep(0.05)
        assert not left
    finally:
        await redis.aclose()


async def test_no_projection_keeps_what_it_recorded_of_a_deleted_conversation(
    api: SseClient, event_log: EventLog, nc: NatsClient, stack: Servers, projected: Projected
) -> None:
    """Every projection records an entry of the conversation's log it cannot read (a
    newer version's event, damage) in `projection_errors`, with its bytes: the billing
    projection's records of them go with the conversation too, not only the read
    models' (and a rebuild of the purged log records none of them)."""
    cid = (await api.create_conversation())["id"]
    assert (await api.send_stream(cid, "hello [[tokens=3]]"))[-1].data == "ok"
    newer = {"type": "a_newer_note", "conversation_id": cid, "at": 1, "event_id": new_id()}
    await nc.jetstream().publish(
        f"chat.evt.{cid}", json.dumps({**newer, "text": "my secret note"}).encode()
    )
    await projected(cid)
    db = await asyncpg.connect(stack.database_url)
    recorded = "SELECT projection FROM parley_test.projection_errors WHERE conversation_id = $1"
    try:
        rows = await db.fetch(recorded, cid)
        assert sorted(r["projection"] for r in rows) == ["billing", "read_models"]
        status, _ = await api.request("DELETE", f"/v1/conversations/{cid}")
        assert status == 202
        await _until_erased(event_log, cid)
        await projected(cid)
        assert [r["projection"] for r in await db.fetch(recorded, cid)] == []
    finally:
        await db.close()


async def _watch(api: SseClient, cid: str, seen: list[SseEvent], watching: asyncio.Event) -> str:
    """Follow the conversation's events until the stream ends: how it ended."""
    async with api.http.get(
        api.url(f"/v1/conversations/{cid}/events"), headers=api.headers(), params={"after": "0"}
    ) as response:
        assert response.status == 200
        watching.set()
        async for item in read_sse(response):
            if isinstance(item, SseEvent):
                seen.append(item)
    return "ended"


async def test_deleting_a_project_conversation_mid_turn_bills_the_stopped_turn_then_erases_it(
    api: SseClient,
    services: Services,
    http: aiohttp.ClientSession,
    event_log: EventLog,
    stack: Servers,
    projected: Projected,
) -> None:
    admin = SseClient(http, services.edge_url, token_for("admin", admin=True))
    project = await funded_project(api, admin, "Erased", 500_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    assert (await api.send_stream(cid, "calculate 6*7"))[-1].data == "ok"
    await api.send_json(cid, "a long one [[tokens=4000]] [[rate=200]]")
    await api.send_json(cid, "and then this", on_busy="enqueue")
    async with asyncio.timeout(20):
        while sum(isinstance(s.event, Chunk) for s in await event_log.read(cid)) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    seen: list[SseEvent] = []
    watching = asyncio.Event()
    viewer = asyncio.create_task(_watch(api, cid, seen, watching))
    await watching.wait()
    before = [s.event for s in await event_log.read(cid)]
    (running,) = [e for e in before if isinstance(e, Started)][1:]

    status, body = await api.request("DELETE", f"/v1/conversations/{cid}")
    assert (status, body) == (202, {"id": cid, "deleted": True}), body
    async with asyncio.timeout(15):
        assert await viewer == "ended"
    # the viewer saw the stopped turn end as a Stop ends it, then its stream closed
    ends = [e.data for e in seen if e.event == "done"]
    assert ends[-1] == "stopped", [e.event for e in seen][-5:]

    tombstone = await _until_erased(event_log, cid)
    assert running.turn_id in tombstone.turn_ids and tombstone.project_id == project
    charges = [
        (s.seq, s.event)
        for s in await event_log.read_subject(account_subject(f"project:{project}"))
        if isinstance(s.event, TurnCharged)
    ]
    charged = {charge.turn_id: charge for _, charge in charges}
    assert set(charged) == set(tombstone.turn_ids), charges
    stopped = charged[running.turn_id]
    assert stopped.end == "cancelled" and stopped.output_tokens > 0, stopped
    # charged before the tombstone: once the log is purged nothing could compute it
    tomb_seq = (await event_log.read(cid))[0].seq
    assert all(seq < tomb_seq for seq, _ in charges)

    await projected(cid)  # the charges are before the tombstone, the ledger has them
    status, ledger = await api.request("GET", "/v1/billing/ledger", params={"project": project})
    assert status == 200
    assert {e["turn_id"]: e["turn_end"] for e in ledger["entries"]} == {
        t: charged[t].end for t in charged
    }
    assert await _rows(stack, cid) == {"conversations": 0, "messages": 0}

    done = await asyncio.to_thread(audit, stack, "--project", project, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["mismatches"] == [] and summary["erased_charges"] == 2, summary
    whole = await asyncio.to_thread(audit, stack)
    assert whole.returncode == 0, whole.stdout + whole.stderr

    # rebuilt from the purged log, both projections hold what the live ones hold
    schema = f"del_{new_id().lower()}"
    env = {**server_env(stack), "PARLEY_DB_SCHEMA": schema, "PARLEY_JWT_SECRET": SECRET}
    try:
        for projection in ("read_models", "billing"):
            rebuilt = await asyncio.to_thread(
                run, "projections", "rebuild", "--projection", projection, env=env
            )
            assert rebuilt.returncode == 0, rebuilt.stderr
        db = await asyncpg.connect(stack.database_url)
        try:
            live = await _snapshot(db, "parley_test", [cid], tomb_seq)
            again = await _snapshot(db, schema, [cid], tomb_seq)
            assert live["conversations"] == again["conversations"] == []
            assert live["messages"] == again["messages"] == []
            live_billing = await _billing_snapshot(db, "parley_test", project)
            again_billing = await _billing_snapshot(db, schema, project)
            assert _differences(live_billing, again_billing) == []
        finally:
            await db.close()
    finally:
        await drop_schema(stack.database_url, schema)


async def test_a_delete_delivered_again_after_its_tombstone_erases_what_is_left(
    api: SseClient, user: str, event_log: EventLog, nc: NatsClient, projected: Projected
) -> None:
    """A worker that died between the tombstone and the purge left the content in the
    log; its command, not acknowledged, comes again and the purge is done then."""
    # the tombstone as the dying worker appended it (single-writer check included)
    cid, entries, tombstone, _ = await _answered_then_tombstoned(
        api, event_log, user, "a secret [[tokens=3]]"
    )
    assert len(await event_log.read(cid)) == len(entries) + 1  # nothing erased yet
    redelivered = DeleteConversation(
        conversation_id=cid, command_id=tombstone.command_id, user_id=user, at=1
    )
    await nc.jetstream().publish(
        command_subject(cid),
        encode(redelivered),
        headers={"Nats-Expected-Stream": CMD_STREAM},
    )
    assert (await _until_erased(event_log, cid)) == tombstone
    # the edge's cached header goes with the worker's announcement
    async with asyncio.timeout(10):
        while (await api.request("GET", f"/v1/conversations/{cid}/log"))[0] != 404:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    # and nothing is ever appended after it: a command for it is dropped, not refused
    late = DeleteConversation(conversation_id=cid, command_id=new_id(), user_id=user, at=2)
    await nc.jetstream().publish(
        command_subject(cid), encode(late), headers={"Nats-Expected-Stream": CMD_STREAM}
    )
    message = {"content": "anyone there?"}
    status, _ = await api.request("POST", f"/v1/conversations/{cid}/messages", json=message)
    assert status == 404
    await projected(cid)
    assert [type(s.event) for s in await event_log.read(cid)] == [ConversationDeleted]


async def test_a_message_sent_as_the_delete_lands_is_answered_404_not_left_unanswered(
    api: SseClient, user: str, event_log: EventLog, stack: Servers
) -> None:
    """An edge that has not heard of the deletion yet (its header cached, the worker's
    announcement on its way) publishes a message after the tombstone: the actor drops
    it, so no answer will ever come. The sender gets the 404 everyone gets from then
    on, not a 202 for a message that went nowhere (or a stream that ends empty), and
    the edge's idempotency record of it goes too."""
    # the tombstone as a worker appends it, before its announcement reaches this edge
    cid, _, _, _ = await _answered_then_tombstoned(api, event_log, user, "hello [[tokens=3]]")
    status, body = await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages",
        json={"content": "still there? [[tokens=3]]", "idempotency_key": "late"},
        headers={"Accept": "application/json"},
    )
    assert status == 404 and body["error"]["code"] == "not_found", (status, body)
    await _until_erased(event_log, cid)
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        assert [k async for k in redis.scan_iter(match=f"parley:idem:{cid}:*")] == []
    finally:
        await redis.aclose()


async def test_an_erasure_done_again_keeps_the_tombstone_whatever_follows_it(
    api: SseClient, user: str, event_log: EventLog, nc: NatsClient
) -> None:
    """A worker of the version before deletion refuses a message for a purged or
    deleted conversation with a `command_rejected` appended after the tombstone
    (README, rolling upgrade). The purge done again when a worker of this version
    loads the conversation must take what is before the tombstone, not keep only
    the subject's last entry: the tombstone (the record of the deletion, and the
    turns the billing audit knows the charges of by it) would go instead."""
    # the tombstone of a worker that died before its purge
    cid, _, tombstone, seq = await _answered_then_tombstoned(
        api, event_log, user, "a secret [[tokens=3]]"
    )
    # an older worker's refusal of a message, after it
    older = CommandRejected(
        conversation_id=cid,
        at=tombstone.at + 1,
        event_id=new_id(),
        command_id=new_id(),
        code="not_found",
        message="conversation not found",
    )
    await event_log.append(cid, [older], seq)
    redelivered = DeleteConversation(
        conversation_id=cid, command_id=tombstone.command_id, user_id=user, at=1
    )
    await nc.jetstream().publish(
        command_subject(cid), encode(redelivered), headers={"Nats-Expected-Stream": CMD_STREAM}
    )
    async with asyncio.timeout(15):
        while len(kept := [s.event for s in await event_log.read(cid)]) > 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert kept == [tombstone, older]


async def test_a_rename_published_as_the_delete_lands_is_answered_404(
    api: SseClient, user: str, event_log: EventLog
) -> None:
    """The actor drops a rename that comes after the tombstone: its edge, which had the
    header cached when the request came, answers 404 once the worker's announcement
    reaches it, not 202 with a title the conversation never got."""
    cid, _, _, _ = await _answered_then_tombstoned(api, event_log, user, "hello [[tokens=3]]")
    status, body = await api.request("PATCH", f"/v1/conversations/{cid}", json={"title": "late"})
    assert status == 404 and body["error"]["code"] == "not_found", (status, body)


async def test_a_second_edge_stops_serving_a_conversation_deleted_through_the_first(
    api: SseClient, stack: Servers, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    assert (await api.send_stream(cid, "hello [[tokens=3]]"))[-1].data == "ok"
    async with extra_edge(stack) as other_url:
        other = SseClient(api.http, other_url, api.token)
        status, _ = await other.request("GET", f"/v1/conversations/{cid}/log")
        assert status == 200  # its header is cached there now
        status, _ = await api.request("DELETE", f"/v1/conversations/{cid}")
        assert status == 202
        await _until_erased(event_log, cid)
        async with asyncio.timeout(10):
            while (await other.request("GET", f"/v1/conversations/{cid}/log"))[0] != 404:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        status, _ = await other.request(
            "POST", f"/v1/conversations/{cid}/messages", json={"content": "still here?"}
        )
        assert status == 404


async def test_a_queued_request_is_refused_when_its_conversation_is_deleted(
    api: SseClient, event_log: EventLog, nc: NatsClient
) -> None:
    """Seen before the purge: the actor refuses what waits, then appends the tombstone."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "a long one [[tokens=4000]] [[rate=200]]")
    waiting = await api.send_json(cid, "next", on_busy="enqueue")
    refused: list[CommandRejected] = []
    tomb: list[ConversationDeleted] = []

    subscribed = asyncio.Event()

    async def follow() -> None:
        sub = await nc.subscribe(f"chat.live.{cid}")
        await nc.flush()
        subscribed.set()
        try:
            async with asyncio.timeout(20):
                async for msg in sub.messages:
                    body = json.loads(msg.data)
                    if body["type"] == "command_rejected":
                        refused.append(
                            CommandRejected(**{k: v for k, v in body.items() if k != "type"})
                        )
                    elif body["type"] == "conversation_deleted":
                        tomb.append(
                            ConversationDeleted(**{k: v for k, v in body.items() if k != "type"})
                        )
                        return
        finally:
            await sub.unsubscribe()

    following = asyncio.create_task(follow())
    await subscribed.wait()
    async with asyncio.timeout(20):
        while not any(isinstance(s.event, Chunk) for s in await event_log.read(cid)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    status, _ = await api.request("DELETE", f"/v1/conversations/{cid}")
    assert status == 202
    await following
    assert [(r.message_id, r.code) for r in refused] == [
        (waiting["message_id"], "conversation_deleted")
    ]
    assert tomb and not any(isinstance(s.event, Cancelled) for s in await event_log.read(cid))


async def _answered_then_tombstoned(
    api: SseClient, event_log: EventLog, user: str, text: str
) -> tuple[str, list[StoredEvent], ConversationDeleted, int]:
    """A conversation with one answered message, and its tombstone appended as a worker
    appends it (with the single-writer check), nothing purged: its id, its entries
    before the tombstone, the tombstone and the tombstone's position."""
    cid = (await api.create_conversation())["id"]
    assert (await api.send_stream(cid, text))[-1].data == "ok"
    entries = await event_log.read(cid)
    last = entries[-1].event
    assert isinstance(last, Event)
    tombstone = ConversationDeleted(
        conversation_id=cid,
        at=last.at + 1,
        event_id=new_id(),
        user_id=user,
        command_id=new_id(),
        turn_ids=[s.event.turn_id for s in entries if isinstance(s.event, Started)],
    )
    seq = await event_log.append(cid, [tombstone], entries[-1].seq)
    return cid, entries, tombstone, seq
