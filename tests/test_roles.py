"""Roles that fail are restarted; stopping a worker loses no accepted message; a waiting
stream always ends. On a stack of their own, so that stopping roles disturbs no other test."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from actors.partitions import BUCKET as LEASES_BUCKET
from actors.partitions import PartitionLeases
from actors.snapshots import decode_snapshot
from actors.state import Conversation, fold
from actors.turn import ActorContext
from actors.worker import WorkerHost, durable_name
from actors.writer import EventWriter, LeaseLost
from api.app import create_app
from api.config import EdgeConfig, EdgeLimits
from events import broker
from events.ids import new_id
from events.log import EventLog, StoredEvent, ensure_streams
from events.subjects import CMD_STREAM, PARTITIONS, partition_of
from events.turns import TurnRegistry, redis_client
from events.vocabulary import (
    Cancelled,
    Chunk,
    CommandRejected,
    ConversationCreated,
    Done,
    Failed,
    Started,
)
from parley.services import Servers, ServiceOptions, Services
from parley.stack import EmbeddedStack, free_ports
from projections import feed
from projections.feed import LogFeed, log_end
from tests.conftest import SECRET, token_for
from tests.conftest import test_catalog as catalog_for_tests
from tests.sse import SseClient, SseEvent, read_sse
from tests.test_cli import server_env
from tests.test_snapshots import answered_turn

LEASE_TTL_S = 3.0


@pytest.fixture(scope="module")
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(Path(tmp_path_factory.mktemp("roles-stack"))) as running:
        yield running


@pytest.fixture(scope="module")
def own_stack(own_servers: EmbeddedStack) -> Servers:
    return own_servers.urls


@pytest.fixture(scope="module")
async def own_nc(own_stack: Servers) -> AsyncIterator[NatsClient]:
    client = await nats.connect(own_stack.nats_url)
    await ensure_streams(client.jetstream())
    # Partition leases that lapse in 3 s: a dead worker's partitions move quickly here.
    await client.jetstream().create_key_value(
        config=KeyValueConfig(bucket=LEASES_BUCKET, ttl=LEASE_TTL_S, history=1)
    )
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
        limits=EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0),
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


async def test_a_stopping_worker_leaves_a_snapshot_of_a_long_conversation_for_the_next(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A worker restarted (a deploy) folds a long conversation from its first event
    unless the one before left a snapshot: it writes one as its actors leave."""
    event_log = EventLog(own_nc.jetstream())
    redis = redis_client(own_stack.redis_url)
    snapshotting = msgspec.structs.replace(options(demo_model_url), snapshot_every=100)
    try:
        async with roles(own_stack, demo_model_url, "edge") as edge:
            api = SseClient(http, edge.edge_url, token_for("roles-snapshot"))
            cid = (await api.create_conversation())["id"]
            seq = await event_log.last_seq(cid)
            for n in range(3):  # a long history: 3 answers of 300 chunks each
                events = answered_turn(cid, n)
                for start in range(0, len(events), 100):
                    seq = await event_log.append(cid, events[start : start + 100], seq)
            async with Services(own_stack, snapshotting, ("worker",)):
                body = await api.send_json(cid, "and now? [[tokens=3]]")
                assert await wait_for_end(event_log, cid, body["message_id"]) is Done
            assert await redis.get(f"parley:snapshot:{cid}") is not None
        data = await redis.get(f"parley:snapshot:{cid}")
    finally:
        await redis.aclose()
    assert isinstance(data, bytes)
    folded = decode_snapshot(data)
    assert folded is not None
    entries = await event_log.read(cid)
    assert (folded.seq, folded.entries) == (entries[-1].seq, len(entries))
    assert folded.state == fold(Conversation(conversation_id=cid), [e.event for e in entries])


async def test_a_stopping_worker_keeps_its_leases_through_a_grace_longer_than_they_live(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A grace of 12 s, leases of 3 s, a 6 s turn: the stopping worker renews its
    leases, so the other worker does not take the partition and end the turn."""
    event_log = EventLog(own_nc.jetstream())
    patient = msgspec.structs.replace(options(demo_model_url), shutdown_grace_s=4 * LEASE_TTL_S)
    async with roles(own_stack, demo_model_url, "edge") as edge:
        api = SseClient(http, edge.edge_url, token_for("roles-grace"))
        cid = (await api.create_conversation())["id"]
        async with Services(own_stack, patient, ("worker",)) as stopping:
            await api.send_json(cid, "slow [[tokens=120]] [[rate=20]]")  # 6 s of answer
            await _until(event_log, cid, lambda log: any(isinstance(e, Chunk) for e in log))
            async with roles(own_stack, demo_model_url, "worker"):
                stopping.stop()  # its turn has 4 lease lifetimes to finish
                ends = await _ends(event_log, cid, 1)
    assert ends == [Done], ends


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
                while running.restarts.get("projector-read_models", 0) == 0:  # noqa: ASYNC110
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
    crashes = CrashCounter()

    def clock_that_crashes_five_deliveries() -> int:
        # every delivery reads the clock before it decides: until the actor has
        # logged five crashed deliveries, reading it is a bug
        if crashes.count < 5:
            raise RuntimeError("a bug in the actor")
        import time

        return time.time_ns()

    redis = redis_client(own_stack.redis_url)
    actor_log = logging.getLogger("actors.actor")
    actor_log.addHandler(crashes)
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
            clock=clock_that_crashes_five_deliveries,
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
            actor_log.removeHandler(crashes)
            stopping.set()
            await asyncio.wait_for(task, 15)
            await redis.aclose()
    assert code == "internal_error"
    assert crashes.count == 5


class CrashCounter(logging.Handler):
    """Counts the deliveries an actor logged as crashed."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "command failed":
            self.count += 1


# ---------------------------------------------------------------- many workers


async def owned(services: Services) -> set[int]:
    assert services.worker is not None
    return set(services.worker.leases.owned)


async def test_two_workers_share_the_partitions_and_serve_every_conversation_in_order(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    event_log = EventLog(own_nc.jetstream())
    async with (
        roles(own_stack, demo_model_url, "edge") as edge,
        roles(own_stack, demo_model_url, "worker") as one,
        roles(own_stack, demo_model_url, "worker") as two,
    ):
        async with asyncio.timeout(20):  # the first gives back what the second takes
            while not (await owned(one) and await owned(two)):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        mine, theirs = await owned(one), await owned(two)
        assert not mine & theirs, (mine, theirs)
        api = SseClient(http, edge.edge_url, token_for("roles-many"))
        conversations: list[str] = []
        while not (
            any(partition_of(c) in mine for c in conversations)
            and any(partition_of(c) in theirs for c in conversations)
        ):
            conversations.append((await api.create_conversation())["id"])
        sent: dict[str, list[str]] = {cid: [] for cid in conversations}

        async def send(cid: str, i: int) -> None:
            body = await api.send_json(cid, f"m{i} [[tokens=20]]", on_busy="enqueue")
            sent[cid].append(body["message_id"])

        for i in range(3):  # each conversation's messages in order, all conversations at once
            await asyncio.gather(*(send(cid, i) for cid in conversations))
        for cid in conversations:
            ends = await _ends(event_log, cid, 3)
            log = [s.event for s in await event_log.read(cid)]
            order = [e.user_message_id for e in log if isinstance(e, Started)]
            assert order == sent[cid], (order, sent[cid])
            assert all(end is Done for end in ends), ends


async def test_a_second_worker_that_thinks_it_owns_a_conversation_cannot_interleave(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """Worker one runs a long turn; its lease on the partition is taken from it (as if it
    had been away too long) and worker two touches the conversation. Two ends it as
    orphaned; one's next append is refused. Nothing of the two interleaves."""
    js = own_nc.jetstream()
    event_log = EventLog(js)
    async with (
        roles(own_stack, demo_model_url, "edge") as edge,
        roles(own_stack, demo_model_url, "worker"),
    ):
        api = SseClient(http, edge.edge_url, token_for("roles-race"))
        cid = (await api.create_conversation())["id"]
        await api.send_json(cid, "long [[tokens=4000]]")
        await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 5)
        kv = await js.key_value(LEASES_BUCKET)
        # the lease, taken from under it (by a holder that then goes away)
        await kv.put(f"partition.{partition_of(cid)}", b"elsewhere")
        async with roles(own_stack, demo_model_url, "worker") as two:
            async with asyncio.timeout(10):
                while partition_of(cid) not in await owned(two):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            body = await api.send_json(cid, "me too [[tokens=3]]", on_busy="enqueue")
            await _ends(event_log, cid, 2)
            log = [s.event for s in await event_log.read(cid)]
    ends = [e for e in log if isinstance(e, Done | Cancelled | Failed)]
    # ended by the second worker (orphaned), or by the first once it saw its lease gone
    assert isinstance(ends[0], Failed) and ends[0].code in ("worker_lost", "interrupted"), ends
    first_end = log.index(ends[0])
    first_turn = ends[0].turn_id
    late = [e for e in log[first_end + 1 :] if getattr(e, "turn_id", None) == first_turn]
    assert late == [], f"the first worker wrote after its turn was ended: {late}"
    assert [e.user_message_id for e in log if isinstance(e, Started)][-1] == body["message_id"]
    assert isinstance(ends[-1], Done)


class StuckLog(EventLog):
    """The real log, whose reads hang until `unstick` is set."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js)
        self.entered = asyncio.Event()
        self.unstick = asyncio.Event()

    async def read(self, conversation_id: str, after: int = 0) -> list[StoredEvent]:
        self.entered.set()
        await self.unstick.wait()
        return await super().read(conversation_id, after)


async def test_a_command_in_an_actors_hands_when_its_partition_is_lost_goes_to_the_next_owner(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """Worker one's actor is in the middle of a command (its read of the conversation
    hangs) when the partition is taken from it. The actor is stopped; the command it
    held must go back to JetStream, or worker one's heartbeat keeps it in progress
    for ever and the partition's new owner never sees it."""
    js = own_nc.jetstream()
    event_log = EventLog(js)
    redis = redis_client(own_stack.redis_url)
    stuck = StuckLog(js)
    async with (
        aiohttp.ClientSession() as model_http,
        roles(own_stack, demo_model_url, "edge") as edge,
    ):
        ctx = ActorContext(
            log=stuck,
            turns=TurnRegistry(redis),
            http=model_http,
            catalog=catalog_for_tests(),
            default_base_url=demo_model_url,
            default_api_key=None,
            worker_id="stuck-worker",
        )
        one = WorkerHost(js, ctx)
        stopping = asyncio.Event()
        task = asyncio.create_task(one.run(stopping))
        try:
            async with asyncio.timeout(10):
                await one.ready.wait()
            api = SseClient(http, edge.edge_url, token_for("roles-stuck"))
            cid = (await api.create_conversation())["id"]
            await api.send_json(cid, "hello [[tokens=3]]")
            async with asyncio.timeout(10):
                await stuck.entered.wait()  # the command is in the actor's hands
            kv = await js.key_value(LEASES_BUCKET)
            await kv.put(f"partition.{partition_of(cid)}", b"elsewhere")
            async with roles(own_stack, demo_model_url, "worker"):
                ends = await _ends(event_log, cid, 1)
            assert ends == [Done]
        finally:
            stuck.unstick.set()
            stopping.set()
            await asyncio.wait_for(task, 15)
            await redis.aclose()


class ScanHeld(TurnRegistry):
    """The real turn records, whose recovery scan waits for `gate`."""

    def __init__(self, redis: Any) -> None:
        super().__init__(redis)
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()

    async def conversations(self) -> list[str]:
        self.holding.set()
        async with asyncio.timeout(30):
            await self.gate.wait()
        return await super().conversations()


async def test_a_slow_recovery_scan_does_not_hold_the_leases_up(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str
) -> None:
    """A worker that gains partitions looks in Redis for turns left running in them:
    a SCAN of the whole keyspace (0.25-0.7 s at 300,000 keys, and it grows with
    them). It ran in the loop that renews the leases: while it did, no lease was
    renewed, and once they were older than an actor may trust, every append of the
    worker waited. Here the scan is held and the leases must go on being renewed."""
    js = own_nc.jetstream()
    redis = redis_client(own_stack.redis_url)
    turns = ScanHeld(redis)
    async with aiohttp.ClientSession() as model_http:
        ctx = ActorContext(
            log=EventLog(js),
            turns=turns,
            http=model_http,
            catalog=catalog_for_tests(),
            default_base_url=demo_model_url,
            default_api_key=None,
            worker_id="scanning-worker",
        )
        worker = WorkerHost(js, ctx, lease_ttl_s=LEASE_TTL_S)
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        try:
            async with asyncio.timeout(10):
                await turns.holding.wait()
                await worker.ready.wait()
            kv = await js.key_value(LEASES_BUCKET)
            first = await kv.get("partition.0")
            assert first.value == b"scanning-worker"
            async with asyncio.timeout(3 * LEASE_TTL_S):
                while (await kv.get("partition.0")).revision == first.revision:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert worker.leases.current() and not turns.gate.is_set()
        finally:
            turns.gate.set()
            stopping.set()
            await asyncio.wait_for(task, 15)
            await redis.aclose()


async def test_a_worker_killed_mid_turn_leaves_no_turn_open_and_its_tokens_counted(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge") as edge:
        worker = worker_process(own_stack, demo_model_url)
        api = SseClient(http, edge.edge_url, token_for("roles-kill"))
        cid = (await api.create_conversation())["id"]
        viewing: asyncio.Task[list[SseEvent]] | None = None
        try:
            await api.send_json(cid, "long [[tokens=4000]]")
            await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 10)
            await api.send_json(cid, "queued behind it [[tokens=3]]", on_busy="enqueue")
            viewing = asyncio.create_task(_view(api, cid))
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        # a worker that takes the partition over ends the orphan on its own: no new
        # message is needed, and no 30 s wait for the command's redelivery
        async with roles(own_stack, demo_model_url, "worker"):
            ends = await _ends(event_log, cid, 2)
            log = [s.event for s in await event_log.read(cid)]
            assert viewing is not None
            seen = await viewing
    assert ends == [Failed, Done], ends
    # the viewer of the conversation was not let go at the orphan's end: a turn waited
    assert [e.data for e in seen if e.event == "done"] == ["error", "ok"], seen[-3:]
    (failed,) = [e for e in log if isinstance(e, Failed)]
    streamed = "".join(
        e.text
        for e in log
        if isinstance(e, Chunk) and e.kind == "answer" and e.turn_id == failed.turn_id
    )
    answer = "".join(b.content for b in failed.content if b.role == "assistant")
    assert failed.code == "worker_lost" and answer == streamed and answer.startswith("0 1 2")
    assert failed.tokens_estimated and failed.output_tokens > 0 and failed.input_tokens > 0


async def test_a_viewer_keeps_its_stream_through_the_end_a_stopping_worker_writes(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A worker stopping (SIGTERM) ends a turn longer than its grace as `failed:
    interrupted`; a message queued behind it runs on the next worker. The viewer of
    the conversation was let go at that end, as if nothing waited."""
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge") as edge:
        api = SseClient(http, edge.edge_url, token_for("roles-stop"))
        cid = (await api.create_conversation())["id"]
        watching = asyncio.Event()
        async with roles(own_stack, demo_model_url, "worker"):
            await api.send_json(cid, "long [[tokens=4000]] [[rate=100]]")
            await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 3)
            await api.send_json(cid, "queued behind it [[tokens=3]]", on_busy="enqueue")
            viewing = asyncio.create_task(_view(api, cid, watching))
            async with asyncio.timeout(10):
                await watching.wait()
        # stopped (its grace here is 2 s): the long turn ended, the queued one waits
        async with roles(own_stack, demo_model_url, "worker"):
            ends = await _ends(event_log, cid, 2)
            seen = await viewing
    assert ends == [Failed, Done], ends
    assert [e.data for e in seen if e.event == "done"] == ["error", "ok"], seen[-3:]


async def test_a_worker_serves_its_metrics_while_it_lets_its_turns_finish(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A process without the edge keeps /metrics up through its grace: the drain of
    its running turns is what an operator watches there during a deploy. (The edge's
    own listener stops first, at once: api.hub.Hubs.drain.)"""
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge") as edge:
        api = SseClient(http, edge.edge_url, token_for("roles-metrics"))
        cid = (await api.create_conversation())["id"]
        settings = msgspec.structs.replace(options(demo_model_url), metrics_port=0)
        worker = Services(own_stack, settings, ("worker",))
        await worker.__aenter__()
        stopping: asyncio.Task[None] | None = None
        try:
            await api.send_json(cid, "long [[tokens=4000]] [[rate=100]]")
            await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 3)
            stopping = asyncio.create_task(worker.__aexit__(None, None, None))
            assert worker.worker is not None
            async with asyncio.timeout(10):
                while not worker.worker.winding_down:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            async with http.get(worker.metrics_url) as response:
                assert response.status == 200
                assert "parley_turns" in await response.text()
        finally:
            await (stopping or worker.__aexit__(None, None, None))


async def test_a_worker_cut_from_outside_in_its_grace_still_ends(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A stop cut short by a cancel from outside while running turns had their grace:
    the actors it cut waited for feeds to close that no one would close any more, and
    the worker's task never ended."""
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge") as edge:
        api = SseClient(http, edge.edge_url, token_for("roles-cut"))
        cid = (await api.create_conversation())["id"]
        async with roles(own_stack, demo_model_url, "worker") as worker:
            await api.send_json(cid, "long [[tokens=4000]] [[rate=100]]")
            await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 3)
            host = worker.worker
            assert host is not None
            (task,) = [t for t in worker._tasks if t.get_name() == "worker"]
            worker.stop()
            async with asyncio.timeout(10):
                while not host.winding_down:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            task.cancel()  # in the grace (2 s here): the turn still runs
            done, _ = await asyncio.wait({task}, timeout=10)
            assert task in done, "the worker's task did not end after its cancel"


async def test_a_cancel_still_stops_a_turn_while_its_worker_winds_down(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """In a stopping worker's grace period its feeds were closed: a cancel waited in the
    consumer while the turn streamed on, billed, to end as `failed: interrupted`."""
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_stack, demo_model_url, "edge") as edge:
        api = SseClient(http, edge.edge_url, token_for("roles-wind-down"))
        cid = (await api.create_conversation())["id"]
        serving: list[Services] = []
        up, leave = asyncio.Event(), asyncio.Event()

        async def worker_until_told() -> None:
            async with roles(own_stack, demo_model_url, "worker") as worker:
                serving.append(worker)
                up.set()
                await leave.wait()

        worker = asyncio.create_task(worker_until_told())
        async with asyncio.timeout(30):
            await up.wait()
        host = serving[0].worker
        assert host is not None
        await api.send_json(cid, "long [[tokens=4000]] [[rate=100]]")
        await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 3)
        leave.set()  # the worker stops: its grace here is 2 s
        async with asyncio.timeout(10):
            while not host.winding_down:  # noqa: ASYNC110 (a flag, no event to wait on)
                await asyncio.sleep(0.01)
        status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202 and body["cancelled"] is True, body
        ends = await _ends(event_log, cid, 1)
        await worker
    assert ends == [Cancelled], ends


async def test_a_worker_paused_longer_than_its_leases_goes_on_where_nobody_took_them(
    own_stack: Servers, own_nc: NatsClient, demo_model_url: str, http: aiohttp.ClientSession
) -> None:
    """A worker process stopped (SIGSTOP, as a frozen VM or a long pause would) until its
    leases lapse, with a turn running and another queued behind it, then continued:
    no other worker took its partitions, so it takes them again and both turns end
    as they would have, rather than being cut."""
    event_log = EventLog(own_nc.jetstream())
    kv = await own_nc.jetstream().key_value(LEASES_BUCKET)
    async with roles(own_stack, demo_model_url, "edge") as edge:
        worker = worker_process(own_stack, demo_model_url)
        try:
            api = SseClient(http, edge.edge_url, token_for("roles-pause"))
            cid = (await api.create_conversation())["id"]
            await api.send_json(cid, "long [[tokens=100]] [[rate=20]]")
            await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 3)
            await api.send_json(cid, "next [[tokens=3]]", on_busy="enqueue")
            worker.send_signal(signal.SIGSTOP)
            try:
                await _until_lapsed(kv, partition_of(cid))
            finally:
                worker.send_signal(signal.SIGCONT)
            ends = await _ends(event_log, cid, 2)
        finally:
            worker.terminate()
            worker.wait(10)
    assert ends == [Done, Done], ends


async def test_a_nats_outage_longer_than_the_leases_lets_running_turns_finish(
    own_servers: EmbeddedStack,
    own_nc: NatsClient,
    demo_model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker gave every lease up once NATS had been away for most of their
    lifetime, cancelling its turns; when NATS came back it found them open and
    ended them as a dead worker's (`worker_lost`, tokens estimated from the log)
    though it had been streaming them all along. Nobody can take a lease while
    nobody reaches NATS: it keeps them, and its appends wait for a renewal."""
    caplog.set_level(logging.WARNING, logger="actors.partitions")
    event_log = EventLog(own_nc.jetstream())
    async with roles(own_servers.urls, demo_model_url, "edge", "worker") as services:
        api = SseClient(http, services.edge_url, token_for("roles-outage"))
        cid = (await api.create_conversation())["id"]
        await api.send_json(cid, "long [[tokens=60]] [[rate=20]]")
        await _until(event_log, cid, lambda log: sum(isinstance(e, Chunk) for e in log) >= 3)
        with frozen(own_servers.pids["nats"]):
            async with asyncio.timeout(30):  # until the leases may have lapsed
                while True:
                    if any("not renewed in time" in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.1)
        ends = await _ends(event_log, cid, 1)
        log = [s.event for s in await event_log.read(cid)]
    assert ends == [Done], [e for e in log if isinstance(e, Failed)]
    answer = "".join(e.text for e in log if isinstance(e, Chunk))
    assert answer.split() == [str(i) for i in range(60)], answer


@pytest.mark.parametrize(
    ("server", "said_at_stop"),
    [
        ("nats", "NATS connection closed without draining"),
        ("postgres", "advisory unlock skipped"),
        # killed and kept down: connections refused, not left hanging
        ("nats-down", "NATS connection closed without draining"),
    ],
)
async def test_a_process_told_to_stop_while_a_server_does_not_answer_stops_in_time(
    own_servers: EmbeddedStack,
    own_nc: NatsClient,
    demo_model_url: str,
    server: str,
    said_at_stop: str,
) -> None:
    """Every role in one process, a turn running, then a server stops answering (a
    host frozen, a network cut) and the process is told to stop, as a deploy does.
    With NATS it took 40-70 s and exited 1 ("cannot reach NATS": nats.py's drain
    waits 30 s for its subscriptions and 10 s for a flush, then raises, and a lease
    renewal in flight and the leases' release waited out a timeout per request, one
    after the other); with Postgres it never stopped (the projector's unlock, the
    return of its connection and asyncpg's pool close wait for ever). A deployment
    kills a process 30 s after it asked it to stop. Now it gives up on what cannot
    be said within seconds and exits 0. With NATS down rather than hung (refused),
    nats.py's close wrote what was buffered for after a reconnect to the dead
    socket, and the process exited 1 with that traceback."""
    event_log = EventLog(own_nc.jetstream())
    (port,) = free_ports(1)
    env = {
        **role_env(own_servers.urls, demo_model_url),
        "PARLEY_SHUTDOWN_GRACE_S": "1",
        "PARLEY_MAX_TURNS_PER_USER": "0",
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "parley.cli", "serve", "--port", str(port)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    said: list[str] = []
    ready = asyncio.Event()

    async def listen(stderr: asyncio.StreamReader) -> None:
        while line := (await stderr.readline()).decode():
            said.append(line)
            if line.startswith("roles ready"):
                ready.set()
            if "NATS connection lost" in line:
                lost.set()

    assert process.stderr is not None
    lost = asyncio.Event()
    listening = asyncio.create_task(listen(process.stderr))
    frozen: list[int] = []
    down = contextlib.ExitStack()
    try:
        async with asyncio.timeout(30):
            await ready.wait()
        async with aiohttp.ClientSession() as http:
            api = SseClient(http, f"http://127.0.0.1:{port}", token_for("roles-stop-outage"))
            cid = (await api.create_conversation())["id"]
            await api.send_json(cid, "long [[tokens=4000]] [[rate=50]]")
        await _until(event_log, cid, lambda log: any(isinstance(e, Chunk) for e in log))
        if server == "nats-down":
            down.enter_context(own_servers.outage("nats"))
            # until the process knows: what it sends now waits for a reconnect
            async with asyncio.timeout(15):
                await lost.wait()
        else:
            # the server and, for Postgres, its backends (each connection's own process)
            frozen = _with_children(own_servers.pids[server])
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
        if server == "postgres":
            # events the projectors have to store now: each is in the middle of a
            # batch Postgres does not answer when the stop comes
            count = len(await event_log.read(cid))
            await _until(event_log, cid, lambda log: len(log) >= count + 3)
        process.send_signal(signal.SIGTERM)
        told = len(said)
        async with asyncio.timeout(25):
            code = await process.wait()
            await listening
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        down.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
        async with asyncio.timeout(30):
            # the server back for the tests after this one (nats.py has no event for it)
            while not own_nc.is_connected:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    rest = "".join(said[told:])
    assert code == 0, rest
    assert said_at_stop in rest, rest
    # Roles stop on their own, not cancelled at the deadline: a worker's feeds waiting
    # for their requests to expire, then its turns cut only after for their ends'
    # appends, took it past that; so did a projector's batch whose statement Postgres
    # never answered (and what a cancelled role releases came after). (A projector's
    # log reader that waited for an answer NATS owed it held the stop 10 s more:
    # `test_a_projectors_log_reader_told_to_stop_while_nats_hangs_stops_at_once`.)
    cut = "role did not stop in time" if server == "postgres" else "cancelled role=worker"
    assert cut not in rest, rest
    assert "Traceback" not in rest, rest


async def test_a_projectors_log_reader_told_to_stop_while_nats_hangs_stops_at_once(
    own_servers: EmbeddedStack, own_nc: NatsClient
) -> None:
    """A projector's feed that is behind asks for its next batch as it hands one out
    (`no_wait`, answered at once); NATS frozen before the answer came, the feed waited
    for it 10 s whatever its stop said, then another 5 s for the deletion of its
    consumer: a projector told to stop took 17 s, the worker and the edge two. Now it
    takes what came and leaves the consumer to the server (inactive_threshold)."""
    event_log = EventLog(own_nc.jetstream())
    after = await log_end(own_nc.jetstream())
    for _ in range(4):
        cid = new_id()
        await event_log.append(cid, [_created(cid)], expected_seq=0)
    reader = await feed.connect(own_servers.urls.nats_url, name="test-stopping-feed")
    reading = LogFeed(reader.jetstream(), after, gather_s=0.001)
    stop = asyncio.Event()
    try:
        assert len(await reading.next_batch(1, wait_s=5.0, stop=stop)) == 1  # and asks ahead
        with frozen(own_servers.pids["nats"]):
            stop.set()
            async with asyncio.timeout(3):
                # the answer asked ahead came before the freeze or did not: either
                # way a request is left unanswered within two batches
                for _ in range(3):
                    if not await reading.next_batch(1, wait_s=5.0, stop=stop):
                        break
                left = await reading.close()
    finally:
        await broker.finish(reader)
    assert left is not None and "did not answer" in left, left


async def test_an_edge_stopped_while_nats_hangs_finishes_its_connections_side_by_side(
    own_servers: EmbeddedStack, own_nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The edge has two NATS connections, its own and its followers'. Each is given
    2 s to answer a ping before it is closed rather than drained (broker.finish),
    and the edge finished them one after the other: 4 s of a stop with NATS frozen,
    twice what it needs. A healthy stop still drains both."""
    caplog.set_level(logging.WARNING, logger="api.app")
    urls = own_servers.urls
    config = EdgeConfig(
        nats_url=urls.nats_url,
        database_url=urls.database_url,
        redis_url=urls.redis_url,
        jwt_secret=SECRET,
        db_schema="roles_test",
        models=["demo"],
    )

    def closed() -> list[str]:
        return sorted(
            r.__dict__["client"]
            for r in caplog.records
            if r.getMessage() == "NATS connection closed without draining"
        )

    healthy = TestServer(create_app(config), host="127.0.0.1")
    await healthy.start_server()
    await healthy.close()
    assert closed() == [], caplog.text
    edge = TestServer(create_app(config), host="127.0.0.1")
    await edge.start_server()
    loop = asyncio.get_running_loop()
    with frozen(own_servers.pids["nats"]):
        began = loop.time()
        await edge.close()
        took = loop.time() - began
    assert closed() == ["parley-edge", "parley-edge-followers"], caplog.text
    assert took < 3.5, took  # 2 s each, side by side; one after the other it was 4


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Process `pid` stopped (SIGSTOP) inside the block, continued after it. The
    signal only asks: the kernel stops each thread as it next leaves the kernel
    (one writing to disk finishes its write first), so the block begins once
    every thread says it is stopped, not while the server may still answer."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while not all(_thread_state(pid, tid) in ("T", "t") for tid in _threads(pid)):
            assert time.monotonic() < deadline, f"process {pid} did not stop within 5 s"
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _threads(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


def _thread_state(pid: int, tid: str) -> str:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except FileNotFoundError:
        return "T"  # the thread ended since it was listed: it runs nothing either
    return stat.rsplit(")", 1)[1].split()[0]  # after the command, which may hold spaces


def _with_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


async def test_an_append_after_the_leases_lapsed_waits_for_a_renewal_that_says_whose_it_is(
    own_nc: NatsClient,
) -> None:
    """A worker away until its leases lapse appends nothing before its next renewal: a
    conversation another worker took meanwhile gets nothing more from it, one nobody
    took is taken again and goes on."""
    js = own_nc.jetstream()
    event_log = EventLog(js)
    kv = await js.key_value(LEASES_BUCKET)
    away = PartitionLeases(js, "away-worker", PARTITIONS)
    await away.open()
    await away.tick(lambda partition: False)
    assert len(away.owned) >= 2, away.owned
    taken, kept = sorted(away.owned)[:2]
    try:
        cids = {partition: _conversation_in(partition) for partition in (taken, kept)}
        writers = {
            partition: EventWriter(
                cid, event_log, max_event_bytes=1 << 20, new_id=new_id, gate=away
            )
            for partition, cid in cids.items()
        }
        assert away.holds(cids[taken]) and away.holds(cids[kept])
        await _until_lapsed(kv, taken, kept)  # away: no renewal
        await kv.create(f"partition.{taken}", b"another-worker")
        assert not away.holds(cids[kept])
        appends = {
            partition: asyncio.create_task(writers[partition].append([_created(cid)]))
            for partition, cid in cids.items()
        }
        _, lost = await away.tick(lambda partition: False)
        assert lost == {taken}
        with pytest.raises(LeaseLost):
            await appends[taken]
        await appends[kept]
        assert await event_log.read(cids[taken]) == []
        assert [type(s.event) for s in await event_log.read(cids[kept])] == [ConversationCreated]
    finally:
        await away.release_all()
        with contextlib.suppress(nats.errors.Error):
            await kv.delete(f"partition.{taken}")


async def test_a_worker_stopped_in_the_middle_of_a_lease_tick_gives_back_every_lease(
    own_nc: NatsClient,
) -> None:
    """A worker told to stop cuts its lease tick short (`_unless_stopped`; the grace
    period's renewals are cancelled too). A request of that tick already sent still
    lands: a lease taken or renewed on the server that the worker never recorded.
    Its release then skipped the one taken and failed on the one renewed (a stale
    revision), and each stayed held by a worker that was gone until it lapsed: its
    partition served by nobody meanwhile (15 s in production)."""
    js = own_nc.jetstream()
    kv = await js.key_value(LEASES_BUCKET)
    await _until_bucket_empty(js)  # every partition free: the tick takes them all
    leases = PartitionLeases(js, "cut-short-worker", PARTITIONS)
    await leases.open()
    ticking = asyncio.create_task(leases.tick(lambda partition: False))
    try:
        # it takes them one after another: cut it once it took one, the next underway
        while not leases.owned:  # noqa: ASYNC110  # no event to wait for inside a tick
            await asyncio.sleep(0)
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        await leases.release_all()
        held = []
        for partition in range(PARTITIONS):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                if (await kv.get(f"partition.{partition}")).value == b"cut-short-worker":
                    held.append(partition)
        assert held == []
    finally:
        for partition in range(PARTITIONS):
            with contextlib.suppress(nats.errors.Error):
                await kv.delete(f"partition.{partition}")


async def test_lease_ticks_leave_no_consumers_behind_and_count_only_live_workers(
    own_nc: NatsClient,
) -> None:
    """Each tick counts the live workers to know its fair share. Counting with
    `kv.keys()` made a consumer on the bucket's stream every tick that the server kept
    for 5 minutes (some 100 per idle worker); the count must still leave out a worker
    that stopped (its presence deleted), one whose presence was purged and one that
    died (its presence expired)."""
    js = own_nc.jetstream()
    kv = await js.key_value(LEASES_BUCKET)
    await _until_bucket_empty(js)  # leases and presences of the tests before, lapsed
    one, two, purged, dead = (
        PartitionLeases(js, f"{name}-worker", PARTITIONS)
        for name in ("one", "two", "purged", "dead")
    )
    for leases in (one, two, purged, dead):
        await leases.open()

    def idle(partition: int) -> bool:
        return False

    try:
        before = (await js.stream_info(f"KV_{LEASES_BUCKET}")).state.consumer_count
        for _ in range(10):
            await one.tick(idle)
            await two.tick(idle)
        after = (await js.stream_info(f"KV_{LEASES_BUCKET}")).state.consumer_count
        assert after == before, f"20 ticks left {after - before} consumers on the bucket"
        assert len(one.owned) == len(two.owned) == PARTITIONS // 2, (one.owned, two.owned)

        await two.release_all()  # stopped: its presence deleted (a marker stays behind)
        await one.tick(idle)
        assert len(one.owned) == PARTITIONS, sorted(one.owned)

        await purged.tick(idle)  # announces itself; an operator purges its presence
        await one.tick(idle)
        assert len(one.owned) == PARTITIONS // 2, sorted(one.owned)
        await kv.purge(f"worker.{purged.worker_id}")
        await one.tick(idle)
        assert len(one.owned) == PARTITIONS, sorted(one.owned)

        await dead.tick(idle)  # announces itself, then dies: its presence expires
        await one.tick(idle)
        assert len(one.owned) == PARTITIONS // 2, sorted(one.owned)
        async with asyncio.timeout(4 * LEASE_TTL_S):
            while len(one.owned) < PARTITIONS:
                await asyncio.sleep(one.renew_every_s)
                await one.tick(idle)
    finally:
        for leases in (one, two, purged, dead):
            await leases.release_all()


def role_env(servers: Servers, model_url: str) -> dict[str, str]:
    """The environment of `parley serve` on these servers."""
    return {**server_env(servers), "PARLEY_MODEL_BASE_URL": model_url, "PARLEY_JWT_SECRET": SECRET}


def worker_process(servers: Servers, model_url: str) -> subprocess.Popen[bytes]:
    """`parley serve --role worker` as a process of its own, on these servers."""
    return subprocess.Popen(
        [sys.executable, "-m", "parley.cli", "serve", "--role", "worker"],
        env=role_env(servers, model_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _until_lapsed(kv: KeyValue, *partitions: int) -> None:
    """Until nobody holds these partitions' leases (the bucket's age limit removed them)."""
    async with asyncio.timeout(15):
        for partition in partitions:
            while True:
                try:
                    await kv.get(f"partition.{partition}")
                except nats.js.errors.NotFoundError:
                    break
                await asyncio.sleep(0.1)


async def _until_bucket_empty(js: JetStreamContext) -> None:
    """Until the lease bucket holds nothing: no lease, presence or delete marker."""
    async with asyncio.timeout(4 * LEASE_TTL_S):
        while True:
            info = await js.stream_info(
                f"KV_{LEASES_BUCKET}", subjects_filter=f"$KV.{LEASES_BUCKET}.>"
            )
            if not info.state.subjects:
                return
            await asyncio.sleep(0.1)


def _conversation_in(partition: int) -> str:
    while partition_of(cid := new_id()) != partition:
        pass
    return cid


def _created(cid: str) -> ConversationCreated:
    return ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")


async def _until(event_log: EventLog, cid: str, check: Callable[[list[Any]], bool]) -> None:
    async with asyncio.timeout(30):
        while not check([s.event for s in await event_log.read(cid)]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _view(api: SseClient, cid: str, watching: asyncio.Event | None = None) -> list[SseEvent]:
    """A viewer of the whole conversation, from the running turn, until its stream
    ends; `watching` is set once it has its first event."""
    seen: list[SseEvent] = []
    async with asyncio.timeout(60), api.events(cid) as response:
        assert response.status == 200
        async for item in read_sse(response):
            if isinstance(item, SseEvent):
                seen.append(item)
                if watching is not None:
                    watching.set()
    return seen


async def _ends(event_log: EventLog, cid: str, count: int) -> list[type]:
    async with asyncio.timeout(60):
        while True:
            log = [s.event for s in await event_log.read(cid)]
            ends = [type(e) for e in log if isinstance(e, Done | Cancelled | Failed)]
            if len(ends) >= count:
                return ends
            await asyncio.sleep(0.05)


async def test_a_started_process_leaves_its_start_up_objects_out_of_collections(
    services: Services,
) -> None:
    # parley.services freezes what start-up made: a full collection no longer scans
    # the modules and classes each time (45-70 ms pauses mid-burst before)
    assert gc.get_freeze_count() > 10_000


async def test_an_edge_process_stopped_while_nats_hangs_stops_in_one_connection_bound(
    own_servers: EmbeddedStack, own_nc: NatsClient, demo_model_url: str
) -> None:
    """An edge-only process has three NATS connections: the process's own (it made the
    streams at start) and the edge's two. Each waits up to 2 s for NATS before it is
    closed rather than drained; the process's own was finished after the edge's, so a
    stop with NATS frozen took 4 s, twice what it needs."""
    running = Services(own_servers.urls, options(demo_model_url), ("edge",))
    await running.__aenter__()
    loop = asyncio.get_running_loop()
    with frozen(own_servers.pids["nats"]):
        began = loop.time()
        await running.__aexit__(None, None, None)
        took = loop.time() - began
    assert took < 3.5, took  # 2 s for all, side by side; one after the other it was 4
