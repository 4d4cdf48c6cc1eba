"""Roles that fail are restarted; stopping a worker loses no accepted message; a waiting
stream always ends. On a stack of their own, so that stopping roles disturbs no other test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import nats
import pytest
from nats.aio.client import Client as NatsClient

from actors.turn import ActorContext
from actors.worker import WorkerHost, durable_name
from events.log import EventLog, ensure_streams
from events.subjects import CMD_STREAM, partition_of
from events.turns import TurnRegistry, redis_client
from events.vocabulary import Cancelled, CommandRejected, Done, Failed
from parley.services import Servers, ServiceOptions, Services
from parley.stack import EmbeddedStack
from tests.conftest import SECRET, token_for
from tests.conftest import test_catalog as catalog_for_tests
from tests.sse import SseClient, SseEvent, read_sse


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with EmbeddedStack(Path(tmp_path_factory.mktemp("roles-stack"))) as running:
        yield running.urls


@pytest.fixture(scope="module")
async def own_nc(own_stack: Servers) -> AsyncIterator[NatsClient]:
    client = await nats.connect(own_stack.nats_url)
    await ensure_streams(client.jetstream())
    yield client
    await client.drain()


def options(model_url: str, schema: str = "roles_test") -> ServiceOptions:
    return ServiceOptions(
        jwt_secret=SECRET,
        catalog=catalog_for_tests(),
        model_base_url=model_url,
        db_schema=schema,
        port=0,
        ping_interval_s=0.5,
        model_idle_timeout_s=3.0,
        decision_wait_s=0.5,  # workers come and go here: do not wait long for one
        shutdown_grace_s=2.0,
    )


@contextlib.asynccontextmanager
async def roles(
    servers: Servers, model_url: str, *names: str, schema: str = "roles_test"
) -> AsyncIterator[Services]:
    async with Services(servers, options(model_url, schema), names) as running:
        if running.projector is not None:
            async with asyncio.timeout(30):
                await running.projector.ready.wait()
        yield running


async def wait_for_end(event_log: EventLog, cid: str, message_id: str) -> type:
    """The kind of end (Done, Failed, CommandRejected, ...) the message's turn got."""
    async with asyncio.timeout(30):
        while True:
            turn = None
            for stored in await event_log.read(cid):
                event = stored.event
                if isinstance(event, CommandRejected) and event.message_id == message_id:
                    return CommandRejected
                if getattr(event, "user_message_id", None) == message_id:
                    turn = getattr(event, "turn_id", None)
                elif isinstance(event, Done | Failed | Cancelled) and event.turn_id == turn:
                    return type(event)
            await asyncio.sleep(0.05)


async def test_stopping_a_worker_right_after_a_message_was_accepted_loses_nothing(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge") as edge:
        api = SseClient(http, edge.edge_url, token_for("roles-user"))
        accepted: list[tuple[str, str]] = []
        # The worker stops as the message arrives (its fetch in flight gets it, the
        # actor is cancelled before it begins), mid catch-up, and mid-turn.
        for stop_first, delay in ((True, 0.0), (True, 0.0), (False, 0.0), (False, 0.2)):
            cid = (await api.create_conversation())["id"]
            async with roles(own_stack, demo_model_url, "worker") as worker:
                if stop_first:
                    worker.stop()
                body = await api.send_json(cid, "hello [[tokens=200]]")
                await asyncio.sleep(delay)
            accepted.append((cid, body["message_id"]))
        async with roles(own_stack, demo_model_url, "worker"):
            ends = [await wait_for_end(event_log, cid, mid) for cid, mid in accepted]
    # every accepted message got its turn; one cut short by the stop ends as failed:
    # interrupted, and is not run twice
    assert all(end.__name__ in ("Done", "Failed") for end in ends), ends
    for cid, _ in accepted:
        starts = [s for s in await event_log.read(cid) if type(s.event).__name__ == "Started"]
        assert len(starts) == 1, f"{cid}: expected one turn, saw {len(starts)}"


async def test_a_projector_whose_lock_connection_dies_is_restarted_and_catches_up(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    schema = "roles_projector"
    async with roles(own_stack, demo_model_url, "edge", "projector", schema=schema) as running:
        projector = running.projector
        assert projector is not None
        conn = await asyncpg.connect(own_stack.database_url)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
            assert killed >= 1
            async with asyncio.timeout(30):
                while running.restarts.get("projector", 0) == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            api = SseClient(http, running.edge_url, token_for("roles-user-2"))
            created = await api.create_conversation()
            last = await EventLog(own_nc.jetstream()).last(created["id"])
            assert last is not None
            async with asyncio.timeout(30), projector.applied:
                await projector.applied.wait_for(lambda: projector.position >= last.seq)
            title = await conn.fetchval(
                f'SELECT user_id FROM "{schema}".conversations WHERE id = $1', created["id"]
            )
            assert title == "roles-user-2"
        finally:
            await conn.close()


async def test_a_worker_whose_consumer_vanished_is_restarted_and_serves_again(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge", "worker") as running:
        api = SseClient(http, running.edge_url, token_for("roles-user-3"))
        cid = (await api.create_conversation())["id"]
        await own_nc.jetstream().delete_consumer(CMD_STREAM, durable_name(partition_of(cid)))
        body = await api.send_json(cid, "are you there? [[tokens=3]]")
        assert await wait_for_end(event_log, cid, body["message_id"]) is Done
        assert running.restarts.get("worker", 0) >= 1


async def test_a_post_stream_ends_when_its_command_is_lost(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    js = own_nc.jetstream()
    async with roles(own_stack, demo_model_url, "edge") as edge:  # no worker: nobody takes it
        api = SseClient(http, edge.edge_url, token_for("roles-user-4"))
        cid = (await api.create_conversation())["id"]
        before = (await js.stream_info(CMD_STREAM)).state.last_seq

        async def lose_it() -> None:
            while (await js.stream_info(CMD_STREAM)).state.last_seq == before:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await js.delete_msg(CMD_STREAM, (await js.stream_info(CMD_STREAM)).state.last_seq)

        async with asyncio.timeout(20):
            async with http.post(
                api.url(f"/v1/conversations/{cid}/messages"),
                json={"content": "into the void"},
                headers=api.headers(),
            ) as response:
                await lose_it()
                seen = [e async for e in read_sse(response) if isinstance(e, SseEvent)]
    assert [e.event for e in seen] == ["error", "done"], seen
    assert seen[0].raw["code"] == "command_lost" and seen[1].data == "error"


async def test_a_command_that_crashes_its_actor_again_and_again_is_given_up_visibly(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    js = own_nc.jetstream()
    calls = itertools.count()

    def clock_that_fails_five_times() -> int:
        # every delivery's first step reads the clock: the first five crash the actor
        if next(calls) < 5:
            raise RuntimeError("a bug in the actor")
        import time

        return time.time_ns()

    redis = redis_client(own_stack.redis_url)
    async with (
        aiohttp.ClientSession() as model_http,
        roles(own_stack, demo_model_url, "edge") as edge,
    ):
        ctx = ActorContext(
            log=EventLog(js),
            turns=TurnRegistry(redis),
            http=model_http,
            catalog=catalog_for_tests(),
            default_base_url=demo_model_url,
            default_api_key=None,
            worker_id="crashing-worker",
            clock=clock_that_fails_five_times,
        )
        worker = WorkerHost(js, ctx)
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        try:
            api = SseClient(http, edge.edge_url, token_for("roles-user-5"))
            cid = (await api.create_conversation())["id"]
            async with (
                asyncio.timeout(40),
                http.post(
                    api.url(f"/v1/conversations/{cid}/messages"),
                    json={"content": "this will crash"},
                    headers=api.headers(),
                ) as response,
            ):
                # refused after the edge stopped waiting for a decision: the stream ends it;
                # refused sooner: the edge answers with the refusal itself
                if response.status == 200:
                    events = [e async for e in read_sse(response) if isinstance(e, SseEvent)]
                    assert [e.event for e in events] == ["error", "done"], events
                    code = events[0].raw["code"]
                    assert events[1].data == "error"
                else:
                    body = await response.json()
                    assert response.status == 409, body
                    code = body["error"]["code"]
        finally:
            stopping.set()
            await asyncio.wait_for(task, 15)
            await redis.aclose()
    assert code == "internal_error"
