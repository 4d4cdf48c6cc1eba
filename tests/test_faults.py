"""A server of `parley dev` dies mid-turn: it is restarted, and nothing is lost.

Each test kills a real server of an embedded stack of its own (SIGKILL, what
an OOM kill or a crash does) while a turn streams, through
`EmbeddedStack.outage`, which keeps the server down for a moment before its
watch restarts it on the same port and data folder, so the test sees what
clients see meanwhile. The only double is the model server (the demo model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from api.config import EdgeLimits
from events.codec import Unreadable
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import (
    AnyEvent,
    Cancelled,
    Chunk,
    Done,
    Event,
    Failed,
    Title,
    UserMessage,
)
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import ServiceOptions, Services
from parley.stack import EmbeddedStack
from projections.db import create_pool, drop_schema
from projections.projector import Projector
from tests.conftest import SECRET, token_for
from tests.conftest import test_catalog as catalog_for_tests
from tests.sse import SseClient, SseEvent, read_sse
from tests.test_billing import grant, new_project
from tests.test_projection import running as projector_running
from tests.test_projection_rebuild import _differences, _snapshot

# How long a killed server stays down before its watch may restart it: long
# enough for clients to notice and for requests to be answered meanwhile.
OUTAGE_S = 2.0
# The demo model's pace here: a turn of N tokens takes N / 200 s.
TOKENS_PER_S = 200.0


NO_LIMITS = EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(Path(tmp_path_factory.mktemp("faults-stack"))) as running:
        yield running


@pytest.fixture(scope="module")
async def model_url() -> AsyncIterator[str]:
    runner, url = await start_demo_model("127.0.0.1", 0, DemoConfig(tokens_per_s=TOKENS_PER_S))
    yield url
    await runner.cleanup()


@contextlib.asynccontextmanager
async def roles(
    stack: EmbeddedStack, model_url: str, schema: str, limits: EdgeLimits = NO_LIMITS
) -> AsyncIterator[Services]:
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=catalog_for_tests(),
        model_base_url=model_url,
        db_schema=schema,
        port=0,
        ping_interval_s=0.5,
        shutdown_grace_s=2.0,
        limits=limits,
    )
    # an earlier test's outage may still be ending: start on servers that answer
    await until(lambda: asyncio.to_thread(stack.ready), "the stack's servers answer")
    async with Services(stack.urls, options) as services:
        assert services.projector is not None
        async with asyncio.timeout(30):
            await services.projector.ready.wait()
        yield services


def answer_of(tokens: int) -> str:
    """What the demo model answers to `[[tokens=N]]`."""
    return "".join(f"{i} " for i in range(tokens))


class Viewer:
    """A browser's EventSource: follows a conversation from a position and, when its
    stream ends without a `done` or the edge is unavailable, reconnects with the
    last id it saw, until a `done`."""

    def __init__(self, api: SseClient, conversation_id: str, after: int) -> None:
        self.api = api
        self.conversation_id = conversation_id
        self.last_id = str(after)
        self.events: list[SseEvent] = []
        self.connections = 0
        self.refusals: list[tuple[int, str | None]] = []  # (status, Retry-After) while away
        self.drop = asyncio.Event()  # set: close the connection now (a network drop)

    async def run(self) -> None:
        while not any(e.event == "done" for e in self.events):
            try:
                async with self.api.events(
                    self.conversation_id, last_event_id=self.last_id
                ) as response:
                    if response.status != 200:
                        self.refusals.append((response.status, response.headers.get("Retry-After")))
                        await asyncio.sleep(0.1)  # a browser waits Retry-After; quicker here
                        continue
                    self.connections += 1
                    async for item in read_sse(response):
                        if isinstance(item, SseEvent):
                            self.events.append(item)
                            assert item.id is not None
                            self.last_id = item.id
                        if self.drop.is_set():
                            self.drop.clear()
                            break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)

    def tokens(self) -> str:
        return "".join(e.data for e in self.events if e.event == "token")


async def until(check: Any, what: str, within_s: float = 30.0) -> None:
    """Wait for a condition (a sync or async callable), polling; fail saying what."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                result = check()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {within_s:g} s: {what}") from None


def record_appends(services: Services) -> list[tuple[str, int]]:
    """(event_id, seq) of every event the worker saw acknowledged by the log (each event
    is published on its own; the wrapper only writes down what the publish returned)."""
    assert services.worker is not None
    event_log: EventLog = services.worker._ctx.log
    acked: list[tuple[str, int]] = []
    publish_one = event_log._publish_one

    async def recording(subject: str, conversation_id: str, event: Event, expected: int) -> int:
        seq = await publish_one(subject, conversation_id, event, expected)
        acked.append((event.event_id, seq))
        return seq

    event_log._publish_one = recording  # type: ignore[method-assign]
    return acked


async def ready_says(api: SseClient, server: str, check: str) -> bool:
    _, ready = await api.request("GET", "/readyz")
    return bool(ready["checks"][server] == check)


async def readable(event_log: EventLog, cid: str) -> list[tuple[int, AnyEvent]]:
    entries = await event_log.read(cid)
    events = [(s.seq, s.event) for s in entries if not isinstance(s.event, Unreadable)]
    assert len(events) == len(entries), "an entry of the log cannot be read"
    return events


async def log_of(event_log: EventLog, cid: str) -> list[Any]:
    return [s.event for s in await event_log.read(cid)]


def ends(log: list[Any]) -> list[Any]:
    return [e for e in log if isinstance(e, Done | Cancelled | Failed)]


# ---------------------------------------------------------------- NATS


async def test_nats_killed_mid_turn_keeps_every_acked_event_and_the_turn_and_viewers_go_on(
    fault_stack: EmbeddedStack,
    model_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with roles(fault_stack, model_url, "faults_nats") as services:
        assert services.worker is not None
        event_log = EventLog(services.worker._ctx.log._js)
        acked = record_appends(services)
        api = SseClient(http, services.edge_url, token_for(f"faults-{new_id()}"))
        cid = (await api.create_conversation())["id"]
        tokens = 800
        start = await event_log.last_seq(cid)
        # one viewer keeps its connection through the outage, one loses it as NATS dies
        viewer, dropped = Viewer(api, cid, start), Viewer(api, cid, start)
        watching = asyncio.gather(viewer.run(), dropped.run())
        await api.send_json(cid, f"long [[tokens={tokens}]]")
        await until(lambda: len(dropped.tokens()) > 40, "the viewers saw the turn stream")

        with fault_stack.outage("nats"):
            dropped.drop.set()
            # a request in flight when the broker died waits out its timeout (5 s);
            # once the edge's client has seen the connection go, the answer is at once
            await until(lambda: ready_says(api, "nats", "down"), "/readyz: nats down")
            began = time.monotonic()
            status, body = await api.request(
                "POST",
                f"/v1/conversations/{cid}/messages",
                json={"content": "while away"},
                headers={"Accept": "application/json"},
            )
            refused_in = time.monotonic() - began
            assert status == 503 and body["error"]["code"] == "unavailable", (status, body)
            assert refused_in < 2.0, f"the 503 took {refused_in:.2f} s"
            async with api.events(cid, last_event_id=viewer.last_id) as response:
                assert response.status == 503 and response.headers.get("Retry-After"), response
            status, ready = await api.request("GET", "/readyz")
            assert status == 503 and ready["checks"]["nats"] == "down", ready
            assert any(r.startswith("nats: ") for r in ready["reasons"]), ready
            await asyncio.sleep(OUTAGE_S)  # the outage itself: the broker stays down this long

        async with asyncio.timeout(60):
            await watching
        log = await log_of(event_log, cid)
        # every append the actor saw acknowledged is in the log, where the ack said
        stored = {e.event_id: seq for seq, e in await readable(event_log, cid)}
        lost = [(eid, seq) for eid, seq in acked if stored.get(eid) != seq]
        assert acked and not lost, f"acknowledged but not in the log: {lost}"
        # the turn went on through the outage and finished with the whole answer
        (end,) = ends(log)
        assert isinstance(end, Done), end
        streamed = "".join(e.text for e in log if isinstance(e, Chunk) and e.kind == "answer")
        assert streamed == answer_of(tokens)
        # both viewers got every token once, in order, and the `done`; the one that lost
        # its connection was refused (503, Retry-After) until NATS was back, then resumed
        for each in (viewer, dropped):
            assert each.tokens() == answer_of(tokens)
            ids = [e.id for e in each.events]
            assert len(ids) == len(set(ids)), "an event reached a viewer twice"
            assert each.events[-1].event == "done" and each.events[-1].data == "ok"
        assert dropped.connections >= 2, dropped.connections
        assert dropped.refusals and all(
            status == 503 and retry for status, retry in dropped.refusals
        ), dropped.refusals
        print(
            viewer.connections,
            dropped.connections,
            dropped.refusals[:3],
            len(dropped.refusals),
            len(acked),
        )
        # the next message works
        events = await api.send_stream(cid, "and now? [[tokens=5]]")
        assert events[-1].data == "ok", events[-3:]
    messages = [r.getMessage() for r in caplog.records if r.name == "parley.watchdog"]
    assert "nats-server exited (signal 9); restarting" in messages, messages
    assert any(m.startswith("nats-server restarted in") for m in messages), messages


# ---------------------------------------------------------------- Postgres


async def metric(api: SseClient, name: str) -> float | None:
    async with api.http.get(api.url("/metrics")) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_postgres_killed_pauses_the_projectors_and_they_catch_up_to_a_clean_rebuild(
    fault_stack: EmbeddedStack, model_url: str, http: aiohttp.ClientSession
) -> None:
    schema = "faults_pg"
    async with roles(fault_stack, model_url, schema) as services:
        assert services.worker is not None
        js = services.worker._ctx.log._js
        event_log = EventLog(js)
        api = SseClient(http, services.edge_url, token_for(f"faults-{new_id()}"))
        cid = (await api.create_conversation())["id"]
        await api.send_stream(cid, "before [[tokens=20]]")
        await api.send_json(cid, "long [[tokens=600]]")
        await until(
            lambda: chunks_in(event_log, cid, at_least=3), "the long turn streams into the log"
        )

        with fault_stack.outage("postgres"):
            await until(lambda: ready_says(api, "postgres", "down"), "/readyz: postgres down")
            status, ready = await api.request("GET", "/readyz")
            assert status == 503 and any(r.startswith("postgres: ") for r in ready["reasons"])
            lag_before = ready["projection_lag"]
            assert lag_before is not None, ready
            # turns go on without Postgres: the long one ends, a new one runs, and the
            # projection lag (readyz and the metric) grows with the log
            await until(lambda: ended(event_log, cid), "the long turn ended without Postgres")
            other = (await api.create_conversation())["id"]
            events = await api.send_stream(other, "meanwhile [[tokens=10]]")
            assert events[-1].data == "ok", events[-3:]
            _, ready = await api.request("GET", "/readyz")
            assert ready["projection_lag"] > lag_before, (lag_before, ready)
            lag_metric = await metric(api, 'parley_projection_lag_events{projection="read_models"}')
            assert lag_metric is not None and lag_metric >= ready["projection_lag"], lag_metric
            assert services.restarts.get("projector-read_models", 0) >= 1, services.restarts

        # back: the projectors catch up, and their rows are what a clean rebuild makes
        head = int((await js.stream_info("CHAT_EVT")).state.last_seq)
        for projector in services.projectors.values():
            async with asyncio.timeout(30), projector.applied:
                await projector.applied.wait_for(partial(caught_up, projector, head))
        await until(lambda: ready_says(api, "postgres", "ok"), "/readyz: postgres back")
        ids = [cid, other]
        scratch = f"fresh_{new_id().lower()}"
        pool = await create_pool(fault_stack.urls.database_url, scratch, max_size=4)
        db = await asyncpg.connect(fault_stack.urls.database_url)
        try:
            fresh = Projector(js, pool)
            async with projector_running(fresh), asyncio.timeout(30), fresh.applied:
                await fresh.applied.wait_for(lambda: caught_up(fresh, head))
            expected = await _snapshot(db, scratch, ids, head)
            seen = await _snapshot(db, schema, ids, head)
            assert len(seen["messages"]) == 6, seen["messages"]
            assert seen == expected, "\n".join(_differences(expected, seen))
        finally:
            await db.close()
            await pool.close()
            await drop_schema(fault_stack.urls.database_url, scratch)


def caught_up(projector: Projector, head: int) -> bool:
    return projector.position >= head


async def chunks_in(event_log: EventLog, cid: str, at_least: int) -> bool:
    return sum(isinstance(e, Chunk) for e in await log_of(event_log, cid)) >= at_least


async def ended(event_log: EventLog, cid: str, turns: int = 2) -> bool:
    return len(ends(await log_of(event_log, cid))) >= turns


# ---------------------------------------------------------------- Redis


def _process_tree(root: int) -> list[int]:
    """`root` and every process below it (Postgres: the postmaster and its backends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@contextlib.asynccontextmanager
async def nats_stopped(pid: int) -> AsyncIterator[None]:
    """NATS stopped (SIGSTOP) until the block ends; entered once the kernel shows every
    thread of it stopped, so nothing sent inside the block can be answered."""
    os.kill(pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(10):
            while not _all_stopped(pid):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _all_stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped (`T` in /proc/.../stat)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state == "T" for state in states)


@contextlib.contextmanager
def hung(root: int) -> Iterator[None]:
    """A server that hangs (stopped, swapping, a full disk): no answer, no broken
    connection."""
    stopped = _process_tree(root)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_a_postgres_that_hangs_makes_requests_answer_in_time_not_hang(
    fault_stack: EmbeddedStack, model_url: str, http: aiohttp.ClientSession
) -> None:
    """With Postgres stopped, /readyz, /metrics, the list, the models and even
    creating a conversation (which needs no Postgres) waited for ever: a cancelled
    query hands its connection back to asyncpg's pool, which waits, unbounded and
    shielded, for the hung server to confirm the cancel."""
    async with roles(fault_stack, model_url, "faults_pg_hang") as services:
        api = SseClient(http, services.edge_url, token_for(f"faults-{new_id()}"))
        await api.create_conversation()  # the pool's connections exist and are idle

        async def timed(method: str, path: str, **kwargs: Any) -> tuple[int, float]:
            """Its status, and how long it took (in the message when it fails)."""
            began = time.monotonic()
            async with asyncio.timeout(20):  # the probes 1 s, a create 2 s, reads 5 s
                status, _ = await api.request(method, path, **kwargs)
            return status, time.monotonic() - began

        with hung(fault_stack.pids["postgres"]):
            answers = dict(
                zip(
                    ("ready", "metrics", "list", "models", "create"),
                    await asyncio.gather(
                        timed("GET", "/readyz"),
                        timed("GET", "/metrics"),
                        timed("GET", "/v1/conversations"),
                        timed("GET", "/v1/models"),
                        timed("POST", "/v1/conversations", json={}),
                    ),
                    strict=True,
                )
            )
    statuses = {name: status for name, (status, _) in answers.items()}
    assert statuses == {
        "ready": 503,
        "metrics": 200,
        "list": 503,
        "models": 503,
        "create": 201,
    }, answers


async def test_a_redis_that_hangs_holds_a_projects_turn_for_seconds_not_ten(
    fault_stack: EmbeddedStack, model_url: str, http: aiohttp.ClientSession
) -> None:
    """A project's turn waits for its turn record before it starts; redis-py's
    defaults (5 s a command, tried twice) made that 10 s against a stopped Redis."""
    async with roles(fault_stack, model_url, "faults_redis_hang") as services:
        assert services.worker is not None
        event_log = EventLog(services.worker._ctx.log._js)
        user = f"faults-{new_id()}"
        api = SseClient(http, services.edge_url, token_for(user))
        admin = SseClient(http, services.edge_url, token_for("admin", admin=True))
        project = await new_project(api, "hung redis")
        await grant(admin, "project", project, 10**9)
        cid = (await api.create_conversation(project_id=project))["id"]
        with hung(fault_stack.pids["redis"]):
            began = time.monotonic()
            await api.send_json(cid, "while redis hangs [[tokens=3]]")
            # Redis's commands fail after 2 s now: well within this, never within 10 s
            async with asyncio.timeout(8):
                while True:
                    if ended := ends(await log_of(event_log, cid)):
                        break
                    await asyncio.sleep(0.05)
            took = time.monotonic() - began
    assert [type(e) for e in ended] == [Done], (ended, took)


async def test_redis_killed_mid_turn_turns_run_cancel_works_and_nothing_is_lost(
    fault_stack: EmbeddedStack, model_url: str, http: aiohttp.ClientSession
) -> None:
    # limits on (Redis keeps them): while Redis is away they let requests through
    limits = EdgeLimits(
        rate_per_s=1000, rate_burst=1000, max_streams_per_user=100, max_turns_per_user=100
    )
    async with roles(fault_stack, model_url, "faults_redis", limits) as services:
        assert services.worker is not None
        event_log = EventLog(services.worker._ctx.log._js)
        user = f"faults-{new_id()}"
        api = SseClient(http, services.edge_url, token_for(user))
        admin = SseClient(http, services.edge_url, token_for("ops", admin=True))
        status, body = await api.request("POST", "/v1/projects", json={"name": "Faults"})
        assert status == 201, body
        project = body["id"]
        status, body = await admin.request(
            "POST",
            f"/v1/billing/accounts/project/{project}/credits",
            json={"micro_credits": 50_000_000},
        )
        assert status == 201, body
        cid = (await api.create_conversation(project_id=project))["id"]
        viewer = Viewer(api, cid, await event_log.last_seq(cid))
        watching = asyncio.create_task(viewer.run())
        await api.send_json(cid, "long [[tokens=4000]]")
        await until(lambda: len(viewer.tokens()) > 40, "the viewer saw the turn stream")

        with fault_stack.outage("redis"):
            await until(lambda: ready_says(api, "redis", "down"), "/readyz: redis down")
            # the turn runs on; cancel reaches it through the command stream, not Redis
            streamed = len(viewer.tokens())
            await until(lambda: len(viewer.tokens()) > streamed, "the turn streams on")
            status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
            assert status == 202 and body["cancelled"], (status, body)
            async with asyncio.timeout(30):
                await watching
            assert viewer.events[-1].event == "done" and viewer.events[-1].data == "stopped"
            # a new turn runs (the limits let it through), and a viewer resumes by its id
            events = await api.send_stream(cid, "and again [[tokens=10]]")
            assert events[-1].data == "ok", events[-3:]
            async with api.events(cid, last_event_id=viewer.last_id) as response:
                assert response.status == 200
                resumed = [e async for e in read_sse(response) if isinstance(e, SseEvent)]
            assert [e.id for e in resumed] == [e.id for e in events], (resumed, events)
            # an idempotency key cannot be kept without Redis: refused, to be sent again
            status, body = await api.request(
                "POST",
                f"/v1/conversations/{cid}/messages",
                json={"content": "once only", "idempotency_key": "k1"},
                headers={"Accept": "application/json"},
            )
            assert status == 503 and body["error"]["code"] == "unavailable", (status, body)

        await until(lambda: ready_says(api, "redis", "ok"), "/readyz: redis back")
        # nothing lost: both turns ended in the log and each was charged once
        log = await log_of(event_log, cid)
        assert [type(e) for e in ends(log)] == [Cancelled, Done], ends(log)
        head = int((await services.worker._ctx.log._js.stream_info("CHAT_EVT")).state.last_seq)
        for projector in services.projectors.values():
            async with asyncio.timeout(30), projector.applied:
                await projector.applied.wait_for(partial(caught_up, projector, head))
        status, ledger = await api.request("GET", f"/v1/billing/ledger?conversation={cid}")
        assert status == 200, ledger
        charged = {row["turn_id"]: row for row in ledger["entries"]}
        for end in ends(log):
            row = charged.pop(end.turn_id)
            assert (row["input_tokens"], row["output_tokens"]) == (
                end.input_tokens,
                end.output_tokens,
            ), row
        assert not charged, f"charged for turns that did not end: {charged}"
        # and the idempotent request goes through now
        status, body = await api.request(
            "POST",
            f"/v1/conversations/{cid}/messages",
            json={"content": "once only [[tokens=3]]", "idempotency_key": "k1"},
            headers={"Accept": "application/json"},
        )
        assert status == 202, (status, body)


async def test_a_message_sent_while_nats_hangs_is_of_unknown_outcome_and_its_key_applies_it_once(
    fault_stack: EmbeddedStack, model_url: str, http: aiohttp.ClientSession
) -> None:
    """NATS alive but not answering (stopped, swapping, a full disk): the command's
    bytes are sent and may be stored later, so "try again" would run it twice."""
    async with roles(fault_stack, model_url, "faults_hang") as services:
        assert services.worker is not None
        event_log = EventLog(services.worker._ctx.log._js)
        api = SseClient(http, services.edge_url, token_for(f"faults-{new_id()}"))
        cid = (await api.create_conversation())["id"]
        message = {"content": "while hung [[tokens=3]]", "idempotency_key": "hung"}
        async with nats_stopped(fault_stack.pids["nats"]):
            status, body = await api.request(
                "POST",
                f"/v1/conversations/{cid}/messages",
                json=message,
                headers={"Accept": "application/json"},
            )
        assert status == 504 and body["error"]["code"] == "outcome_unknown", (status, body)
        assert "idempotency_key" in body["error"]["message"]
        # sent again with its key (as the answer says): the same message, applied once
        again = await api.send_json(cid, message["content"], idempotency_key="hung")

        async def answered() -> bool:
            return bool(ends(await log_of(event_log, cid)))

        await until(answered, "the message's turn ended")
        users = [e for e in await log_of(event_log, cid) if isinstance(e, UserMessage)]
        assert [u.message_id for u in users] == [again["message_id"]], users


async def test_a_rename_while_nats_hangs_is_of_unknown_outcome_and_says_to_send_it_again(
    fault_stack: EmbeddedStack, model_url: str, http: aiohttp.ClientSession
) -> None:
    """A rename has no idempotency_key: its 504 must not tell the client to send one
    (the body would be taken, the key ignored). Sent again, as the answer says, the
    name is set once."""
    async with roles(fault_stack, model_url, "faults_hang_rename") as services:
        assert services.worker is not None
        event_log = EventLog(services.worker._ctx.log._js)
        api = SseClient(http, services.edge_url, token_for(f"faults-{new_id()}"))
        cid = (await api.create_conversation())["id"]
        async with nats_stopped(fault_stack.pids["nats"]):
            status, body = await api.request(
                "PATCH", f"/v1/conversations/{cid}", json={"title": "while hung"}
            )
        assert status == 504 and body["error"]["code"] == "outcome_unknown", (status, body)
        message = body["error"]["message"]
        assert "idempotency_key" not in message and "again is safe" in message, message
        status, body = await api.request(
            "PATCH", f"/v1/conversations/{cid}", json={"title": "while hung"}
        )
        assert status == 202 and body["title"] == "while hung", (status, body)
        titles = [e for e in await log_of(event_log, cid) if isinstance(e, Title)]
        assert [(t.title, t.source) for t in titles] == [("while hung", "user")], titles
