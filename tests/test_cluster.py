"""A real cluster: three nats-server nodes with routes on loopback, the streams at R3 on
file storage with `sync_interval: always`, two edges, two workers and a projector
spread over the nodes. The event stream's leader is killed (SIGKILL) in the middle
of four billed turns watched by eight viewers; then:

- no acknowledged event is lost: everything in the log before the kill, and every
  event a viewer was sent, is still there, at the same position;
- the turns carry on: each ends, and its chunks in the log spell exactly the
  answer the model streamed (an acknowledged chunk lost, or one written twice by a
  retried append, would show as a hole or a repeat);
- the viewers carry on: each gets every event of its conversation exactly once,
  in order, resuming with Last-Event-ID where the failover cut its stream;
- a new message after the failover is answered, and `parley audit billing`
  finds every charge and balance in agreement with the log.

Postgres and Redis are the session's embedded servers (their own schema and Redis
database here); the demo model is the only stand-in.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from api.config import EdgeLimits
from api.sse import Envelope, envelopes
from events.broker import connect
from events.codec import Unreadable
from events.errors import EventLogUnavailable
from events.log import EventLog, StoredEvent, ensure_streams
from events.subjects import CMD_STREAM, EVT_STREAM, account_subject
from events.vocabulary import Chunk, Done, Failed, Started, TurnCharged
from parley.cluster import NatsCluster
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services
from tests.conftest import SECRET, caught_up, token_for
from tests.conftest import test_catalog as catalog_for_tests
from tests.sse import SseClient, SseEvent, sse_events

SCHEMA = "cluster_test"
REDIS_DB = 5  # the session's Redis, a database of its own
TOKENS_PER_S = 150.0
TURN_TOKENS = 1500  # 10 s at that speed: the failover (a Raft election, 4-9 s) falls inside
CONVERSATIONS = 4


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", size=3) as running:
        yield running


@pytest.fixture
async def slow_model() -> AsyncIterator[str]:
    runner, url = await start_demo_model("127.0.0.1", 0, DemoConfig(tokens_per_s=TOKENS_PER_S))
    yield url
    await runner.cleanup()


class Viewer:
    """Follows one conversation's events from a position until a `done`, resuming with
    Last-Event-ID whenever its stream ends early or the edge cannot answer."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, cid: str, after: int) -> None:
        self.api = SseClient(http, base_url, token_for("cluster-user"))
        self.cid = cid
        self.start = after
        self.last = str(after)
        self.seen: list[SseEvent] = []
        self.resumed = 0

    async def run(self) -> None:
        while True:
            try:
                async with self.api.events(self.cid, last_event_id=self.last) as response:
                    if response.status == 200:
                        async for event in sse_events(response):
                            self.seen.append(event)
                            self.last = event.id or self.last
                            if event.event == "done":
                                return
            except (aiohttp.ClientError, TimeoutError):
                pass  # the edge lost its feed or answered 503: resume from the last id
            self.resumed += 1
            await asyncio.sleep(0.1)


def expected_frames(
    log: list[StoredEvent], after: int, through: int
) -> list[tuple[str, dict[str, Any]]]:
    """(id, envelope) of every SSE event a viewer at `after` must get up to log
    position `through`, as the edge makes them from the log (api.sse)."""
    out = []
    for stored in log:
        if after < stored.seq <= through:
            pieces = envelopes(stored)
            last = len(pieces) - 1
            out += [
                (str(stored.seq) if i == last else f"{stored.seq}-{i}", _plain(envelope))
                for i, envelope in enumerate(pieces)
            ]
    return out


def _plain(envelope: Envelope) -> dict[str, Any]:
    plain: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(envelope))
    return plain


def first_difference(got: list[Any], want: list[Any]) -> str:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"at {i}: got {g}, expected {w}"
    return f"got {len(got)} events, expected {len(want)}"


async def turn_end(event_log: EventLog, cid: str) -> StoredEvent:
    async with asyncio.timeout(60):
        while True:
            try:
                log = await event_log.read(cid)
            except EventLogUnavailable:
                log = []  # reads time out too while the replicas elect a leader
            for stored in log:
                if isinstance(stored.event, Done | Failed):
                    return stored
            await asyncio.sleep(0.1)


async def test_killing_the_stream_leader_mid_turn_loses_nothing_and_everything_carries_on(
    cluster: NatsCluster, stack: Servers, slow_model: str
) -> None:
    began = time.monotonic()
    redis_url = f"{stack.redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    conn = await asyncpg.connect(stack.database_url)
    await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    await conn.close()

    def servers(prefer: int) -> Servers:
        # every node listed, starting with the one this process prefers
        return Servers(
            nats_url=cluster.url(prefer), database_url=stack.database_url, redis_url=redis_url
        )

    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=catalog_for_tests(),
        model_base_url=slow_model,
        db_schema=SCHEMA,
        port=0,
        ping_interval_s=0.5,
        shutdown_grace_s=2.0,
        stream_replicas=3,
        limits=EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0),
    )
    nc: NatsClient = await connect(cluster.url(2), name="cluster-test")
    js = nc.jetstream()
    event_log = EventLog(js)
    assert len(await ensure_streams(js, replicas=3)) == 2
    async with AsyncExitStack() as roles, aiohttp.ClientSession() as http:
        edges = [
            await roles.enter_async_context(Services(servers(0), options, ("edge",))),
            await roles.enter_async_context(Services(servers(1), options, ("edge",))),
        ]
        for prefer in (2, 0):
            await roles.enter_async_context(Services(servers(prefer), options, ("worker",)))
        projecting = await roles.enter_async_context(Services(servers(1), options, ("projector",)))
        for projector in projecting.projectors.values():
            async with asyncio.timeout(30):
                await projector.ready.wait()
        for stream in (EVT_STREAM, CMD_STREAM):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3 and info.cluster is not None

        # a funded project, its conversations, and two viewers each (one per edge)
        alice = SseClient(http, edges[0].edge_url, token_for("cluster-user"))
        admin = SseClient(http, edges[1].edge_url, token_for("cluster-admin", admin=True))
        status, project = await alice.request("POST", "/v1/projects", json={"name": "Failover"})
        assert status == 201, project
        status, body = await admin.request(
            "POST",
            f"/v1/billing/accounts/project/{project['id']}/credits",
            json={"micro_credits": 50_000_000},
        )
        assert status == 201, body
        cids = [
            (await alice.create_conversation(project_id=project["id"]))["id"]
            for _ in range(CONVERSATIONS)
        ]
        viewers: list[Viewer] = []
        for cid in cids:
            after = await event_log.last_seq(cid)
            viewers += [Viewer(http, edge.edge_url, cid, after) for edge in edges]
        watching = [asyncio.create_task(v.run()) for v in viewers]
        roles.push_async_callback(_stop, watching)
        for i, cid in enumerate(cids):
            sender = SseClient(http, edges[i % 2].edge_url, token_for("cluster-user"))
            await sender.send_json(cid, f"count [[tokens={TURN_TOKENS}]]")

        # mid-turn: every turn has streamed a while
        async with asyncio.timeout(30):
            while True:
                logs = {cid: await event_log.read(cid) for cid in cids}
                chunks = [sum(isinstance(s.event, Chunk) for s in log) for log in logs.values()]
                if min(chunks) >= 20:
                    break
                await asyncio.sleep(0.1)
        before_kill = {s.seq: s.event for log in logs.values() for s in log}
        info = await js.stream_info(EVT_STREAM)
        assert info.cluster is not None and info.cluster.leader
        leader = info.cluster.leader
        cluster.kill(leader)
        killed_at = time.monotonic()

        # the turns carry on and end; the viewers get their `done`
        ends = {cid: await turn_end(event_log, cid) for cid in cids}
        async with asyncio.timeout(60):
            await asyncio.gather(*watching)
        new_leader = (await js.stream_info(EVT_STREAM)).cluster
        assert new_leader is not None and new_leader.leader not in (None, leader)

        # a new message after the failover is answered, through either edge
        for edge in edges:
            again = await SseClient(http, edge.edge_url, token_for("cluster-user")).send_stream(
                cids[0], "[[tokens=5]]", on_busy="enqueue"
            )
            assert again[-1].event == "done" and again[-1].data == "ok", again

        logs = {cid: await event_log.read(cid) for cid in cids}
        # nothing acknowledged before the kill is gone, nor moved
        after_kill = {s.seq: s.event for log in logs.values() for s in log}
        lost = {seq for seq, event in before_kill.items() if after_kill.get(seq) != event}
        assert not lost, f"events at {sorted(lost)} were in the log before the kill, not after"
        outcomes = []
        for cid in cids:
            events = [s.event for s in logs[cid]]
            ids = [e.event_id for e in events if not isinstance(e, Unreadable)]
            assert len(ids) == len(set(ids)), f"{cid}: an event was written twice"
            started = next(e for e in events if isinstance(e, Started))
            end = ends[cid].event
            assert isinstance(end, Done | Failed) and end.turn_id == started.turn_id
            streamed = "".join(
                e.text
                for e in events
                if isinstance(e, Chunk) and e.turn_id == started.turn_id and e.kind == "answer"
            )
            answer = "".join(b.content for b in end.content if b.role == "assistant")
            assert answer == streamed, f"{cid}: the end's answer is not what the chunks say"
            tokens = streamed.split()
            assert tokens == [str(i) for i in range(len(tokens))], f"{cid}: a hole or a repeat"
            # carried on through the failover, not cut short by it
            assert isinstance(end, Done), f"{cid}: ended {end}"
            assert len(tokens) == TURN_TOKENS
            outcomes.append(type(end).__name__)

        # every viewer: each event of its conversation once, in order, as the log has it
        for viewer in viewers:
            done_at = int(viewer.last.split("-")[0])
            want = expected_frames(logs[viewer.cid], viewer.start, done_at)
            got = [(e.id, e.raw) for e in viewer.seen]
            assert got == want, f"viewer of {viewer.cid}: {first_difference(got, want)}"

        # every turn charged: a charge the log refused in the failover is made when
        # the turn's command, handed back for it, comes again (a second or more later)
        account = account_subject(f"project:{project['id']}")
        async with asyncio.timeout(60):
            while True:
                charged = await event_log.read_subject(account)
                if sum(isinstance(s.event, TurnCharged) for s in charged) >= CONVERSATIONS + 2:
                    break
                await asyncio.sleep(0.2)
        # the billing audit: the projection caught up with the log, then the CLI checks it
        head = (await js.stream_info(EVT_STREAM)).state.last_seq
        for projector in projecting.projectors.values():
            await caught_up(projector, head)
    await nc.close()
    audit = _audit(cluster.url(0), stack.database_url, redis_url, project["id"])
    assert audit.returncode == 0, audit.stdout + audit.stderr
    summary = msgspec.json.decode(audit.stdout)
    assert summary["mismatches"] == [] and summary["charges"] == CONVERSATIONS + 2, summary
    print(
        f"\nfailover of {leader}: turns {outcomes}, "
        f"viewers resumed {sum(v.resumed for v in viewers)} times, "
        f"{time.monotonic() - killed_at:.1f}s from the kill to the audit, "
        f"{time.monotonic() - began:.1f}s in all"
    )


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _audit(
    nats_url: str, database_url: str, redis_url: str, project: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(
        PARLEY_NATS_URL=nats_url,
        PARLEY_DATABASE_URL=database_url,
        PARLEY_REDIS_URL=redis_url,
        PARLEY_DB_SCHEMA=SCHEMA,
    )
    return subprocess.run(
        [sys.executable, "-m", "parley.cli", "audit", "billing", "--project", project, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
