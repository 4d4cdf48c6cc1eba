"""`parley bench soak --minutes N`: sustained mixed load, then the invariants.

Users act on their own conversations one action at a time, for N minutes:
plain messages, tool turns, two messages queued at once, a long turn stopped
with POST /cancel, a long turn interrupted by a newer message, regenerations,
edits, a model stream that breaks, and turns in projects (one funded, one whose
credits run out, so turns are billed and refused). Viewers meanwhile follow
random conversations, drop their connection at random points and resume by
`Last-Event-ID`; every turn a viewer followed is compared with the same turn
read again afterwards (every event once, in order). Two workers share the
conversations' partitions; an edge and the projectors run beside them.

At the end, once every conversation is idle, it checks:
- `parley audit billing` (projections.audit) finds no mismatch;
- a rebuild of every projection from the log equals the live tables, row for row;
- no turn is left active or queued in the log, no message row is `streaming`;
- every message a POST got accepted has its turn (an answer) or its refusal;
- this process's memory, open files, Postgres and Redis connections and
  asyncio tasks at the end are near their level a quarter into the load (the
  pools have grown to the load by then; what keeps growing after is a leak).

The report gives the load held (turns/s, tokens/s, viewers) and every problem
found; the exit status is 1 when there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis

from actors.state import Conversation, fold
from api.auth import mint
from events.broker import connect
from events.log import EventLog
from events.vocabulary import Cancelled, CommandRejected, Done, Failed, Started
from parley.audit_command import audit_billing
from parley.bench_common import NO_LIMITS, SECRET
from parley.config import load_catalog, load_settings
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services
from projections.audit import Scope
from projections.catalog import PROJECTIONS
from projections.db import create_pool
from projections.projector import Projector
from projections.rebuild import rebuild

# The demo model's pace: a "long" turn of 2,000 tokens lasts ~10 s, a short one well under 1 s.
TOKENS_PER_S = 200.0
ACTIONS = {  # action: weight
    "message": 30,
    "tool_turn": 10,
    "queued_pair": 8,
    "cancel": 8,
    "interrupt": 8,
    "regenerate": 8,
    "edit": 8,
    "broken_stream": 4,
    "project_turn": 12,
    "poor_project_turn": 4,
}
_TURN_TIMEOUT_S = 120.0
_IDLE_WAIT_S = 20.0


class SoakResult(msgspec.Struct):
    minutes: float
    users: int
    viewers: int
    workers: int
    turns: int  # turns that started
    turns_per_s: float
    tokens: int  # output tokens the turns reported
    tokens_per_s: float
    events: int
    actions: dict[str, int]
    outcomes: dict[str, int]  # how the actions' requests were answered
    viewer_turns: int  # turns a viewer followed and had checked
    viewer_reconnects: int
    conversations: int
    audit_mismatches: int
    rebuilt_tables: int
    rss_mb_baseline: float
    rss_mb_end: float
    open_files_baseline: int
    open_files_end: int
    postgres_connections_baseline: int
    postgres_connections_end: int
    redis_clients_baseline: int
    redis_clients_end: int
    tasks_baseline: int
    tasks_end: int
    # what the resident memory holds: blocks Python has allocated, and the kinds of
    # object whose number grew most (a leak shows there, not as heap kept by malloc)
    python_blocks_baseline: int
    python_blocks_end: int
    grew_most: list[str]
    problems: list[str]


class Resources(msgspec.Struct):
    rss_mb: float
    open_files: int
    postgres: int
    redis: int
    tasks: int


class Tally:
    """What the load did, and what went wrong while it ran."""

    def __init__(self) -> None:
        self.actions: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.accepted: list[tuple[str, str]] = []  # (conversation, message) a POST got accepted
        self.conversations: set[str] = set()
        self.owners: dict[str, dict[str, str]] = {}  # conversation -> its owner's auth header
        self.viewer_turns = 0
        self.reconnects = 0
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)


class Client:
    """One user's HTTP calls."""

    def __init__(self, http: aiohttp.ClientSession, base: str, user: str, tally: Tally) -> None:
        self.http = http
        self.base = base
        self.user = user
        self.auth = {"Authorization": f"Bearer {mint(SECRET, user)}"}
        self.tally = tally

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(
            method,
            self.base + path,
            json=body,
            headers={**self.auth, "Accept": "application/json"},
        ) as response:
            text = await response.text()
            if response.status >= 500:
                self.tally.problem(f"{method} {path}: {response.status} {text[:200]}")
            return response.status, json.loads(text) if text else None

    async def post_message(self, cid: str, content: str, on_busy: str = "enqueue") -> int | None:
        """POST a message (202); the log position its turn comes after, or None if refused."""
        status, body = await self.call(
            "POST", f"/v1/conversations/{cid}/messages", {"content": content, "on_busy": on_busy}
        )
        self.tally.outcomes[f"message {status}"] += 1
        if status != 202:
            return None
        self.tally.accepted.append((cid, body["message_id"]))
        return int(body["after"])

    async def ends(self, cid: str, after: int, count: int) -> list[str]:
        """Read the conversation's events after `after` through `count` turn ends.

        A stream that ends before them (the edge ends a viewer's stream when the
        conversation looks idle after a turn's end, and a queued turn may not have
        started yet) is opened again from its last id, as an EventSource does: a
        turn that never ends is a timeout here, not a silent short count."""
        ends: list[str] = []
        url = f"{self.base}/v1/conversations/{cid}/events"
        last = str(after)
        async with asyncio.timeout(_TURN_TIMEOUT_S):
            while len(ends) < count:
                async with self.http.get(
                    url,
                    params={"after": last},
                    headers={**self.auth, "Accept": "text/event-stream"},
                ) as response:
                    async for event_id, envelope in _sse(response):
                        if event_id is not None:
                            last = event_id
                        if envelope["event"] == "done":
                            ends.append(str(envelope["data"]))
                            if len(ends) >= count:
                                break
        return ends

    async def first_token(self, cid: str, after: int) -> None:
        url = f"{self.base}/v1/conversations/{cid}/events"
        async with (
            asyncio.timeout(_TURN_TIMEOUT_S),
            self.http.get(
                url,
                params={"after": str(after)},
                headers={**self.auth, "Accept": "text/event-stream"},
            ) as response,
        ):
            async for envelope in _envelopes(response):
                if envelope["event"] in ("token", "done"):
                    return


async def _envelopes(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for item in _sse(response):
        yield item[1]


async def _sse(
    response: aiohttp.ClientResponse,
) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
    """(id, envelope) of each SSE event; comments (keep-alive pings) skipped."""
    event_id: str | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if data:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


class User:
    """A user with a personal conversation and two project conversations."""

    def __init__(self, client: Client, rng: random.Random) -> None:
        self.client = client
        self.rng = rng
        self.personal = ""
        self.funded = ""
        self.poor = ""

    async def setup(self, admin: Client) -> None:
        c = self.client
        self.personal = await self._conversation(None)
        for name, credits in (("funded", 50_000_000_000), ("poor", 40_000)):
            status, project = await c.call("POST", "/v1/projects", {"name": f"{c.user} {name}"})
            assert status == 201, project
            status, grant = await admin.call(
                "POST",
                f"/v1/billing/accounts/project/{project['id']}/credits",
                {"micro_credits": credits},
            )
            assert status == 201, grant
            setattr(self, name, await self._conversation(project["id"]))

    async def _conversation(self, project: str | None) -> str:
        body = {"project_id": project} if project else {}
        status, created = await self.client.call("POST", "/v1/conversations", body)
        assert status == 201, created
        self.client.tally.conversations.add(created["id"])
        self.client.tally.owners[created["id"]] = self.client.auth
        return str(created["id"])

    async def act(self) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        self.client.tally.actions[action] += 1
        await getattr(self, action)()

    def _tokens(self) -> int:
        return self.rng.randint(20, 300)

    async def _turn(self, cid: str, content: str) -> None:
        after = await self.client.post_message(cid, content)
        if after is not None:
            await self.client.ends(cid, after, 1)

    async def message(self) -> None:
        await self._turn(self.personal, f"say something [[tokens={self._tokens()}]]")

    async def tool_turn(self) -> None:
        content = self.rng.choice(["what time is it [[rounds=2]]", "calculate 6*7"])
        await self._turn(self.personal, content)

    async def broken_stream(self) -> None:
        kind = self.rng.choice(["cut", "bad_json", "error"])
        await self._turn(self.personal, f"break [[fail={kind}]]")

    async def project_turn(self) -> None:
        await self._turn(self.funded, f"project work [[tokens={self._tokens()}]]")

    async def poor_project_turn(self) -> None:
        await self._turn(self.poor, f"project work [[tokens={self._tokens()}]]")

    async def queued_pair(self) -> None:
        cid = self.personal
        first = await self.client.post_message(cid, f"one [[tokens={self._tokens()}]]")
        second = await self.client.post_message(cid, f"two [[tokens={self._tokens()}]]")
        if first is not None:
            await self.client.ends(cid, first, 2 if second is not None else 1)

    async def cancel(self) -> None:
        cid = self.personal
        after = await self.client.post_message(cid, "a long one [[tokens=2000]]")
        if after is None:
            return
        await self.client.first_token(cid, after)
        status, _ = await self.client.call("POST", f"/v1/conversations/{cid}/cancel")
        self.client.tally.outcomes[f"cancel {status}"] += 1
        await self.client.ends(cid, after, 1)

    async def interrupt(self) -> None:
        cid = self.funded if self.rng.random() < 0.5 else self.personal
        after = await self.client.post_message(cid, "a long one [[tokens=2000]]")
        if after is None:
            return
        await self.client.first_token(cid, after)
        again = await self.client.post_message(cid, "instead [[tokens=20]]", on_busy="interrupt")
        await self.client.ends(cid, after, 2 if again is not None else 1)

    async def _latest(self, cid: str, role: str) -> str | None:
        status, body = await self.client.call("GET", f"/v1/conversations/{cid}/messages")
        if status != 200:
            return None
        ids = [m["id"] for m in body["messages"] if m["role"] == role]
        return ids[-1] if ids else None

    async def regenerate(self) -> None:
        cid = self.personal
        answer = await self._latest(cid, "assistant")
        if answer is None:
            return await self.message()
        status, body = await self.client.call(
            "POST", f"/v1/conversations/{cid}/messages/{answer}/regenerate", {"on_busy": "enqueue"}
        )
        self.client.tally.outcomes[f"regenerate {status}"] += 1
        if status == 202:
            await self.client.ends(cid, int(body["after"]), 1)

    async def edit(self) -> None:
        cid = self.personal
        asked = await self._latest(cid, "user")
        if asked is None:
            return await self.message()
        content = f"edited [[tokens={self._tokens()}]]"
        status, body = await self.client.call(
            "PATCH",
            f"/v1/conversations/{cid}/messages/{asked}",
            {"content": content, "on_busy": "enqueue"},
        )
        self.client.tally.outcomes[f"edit {status}"] += 1
        if status == 202:
            self.client.tally.accepted.append((cid, body["message_id"]))
            await self.client.ends(cid, int(body["after"]), 1)


async def viewer(client: Client, rng: random.Random, stop: asyncio.Event) -> None:
    """Follow one turn of a conversation a message was just sent to, with random drops,
    then check it."""
    while not stop.is_set():
        recent = client.tally.accepted[-20:]
        if not recent:
            await asyncio.sleep(0.1)
            continue
        cid = rng.choice(recent)[0]
        auth = client.tally.owners[cid]
        seen: list[tuple[str, dict[str, Any]]] = []
        last: str | None = None
        url = f"{client.base}/v1/conversations/{cid}/events"
        loop = asyncio.get_running_loop()
        try:
            # The turn may have ended before the viewer joined (a refused one ends at
            # once): it then waits for the conversation's next turn, a while at most.
            async with asyncio.timeout(_IDLE_WAIT_S) as window:
                while not stop.is_set() and not (seen and seen[-1][1]["event"] == "done"):
                    headers = {**auth, "Accept": "text/event-stream"}
                    if last is not None:
                        headers["Last-Event-ID"] = last
                        client.tally.reconnects += 1
                    drop_after = rng.randint(1, 60)
                    async with client.http.get(url, headers=headers) as response:
                        if response.status != 200:
                            client.tally.problem(f"viewer of {cid}: {response.status}")
                            break
                        got = 0
                        async for event_id, envelope in _sse(response):
                            if event_id is None:
                                continue
                            seen.append((event_id, envelope))
                            last, got = event_id, got + 1
                            if len(seen) == 1:  # a turn began: it must end in time
                                window.reschedule(loop.time() + _TURN_TIMEOUT_S)
                            if envelope["event"] == "done" or got >= drop_after:
                                break
        except TimeoutError:
            if seen:
                client.tally.problem(f"viewer of {cid}: no end of the turn in {_TURN_TIMEOUT_S} s")
            continue
        if not seen or seen[-1][1]["event"] != "done":
            continue  # stopped while following
        await _check_viewed(client, auth, cid, seen)


async def _check_viewed(
    client: Client, auth: dict[str, str], cid: str, seen: list[tuple[str, dict[str, Any]]]
) -> None:
    first = int(seen[0][0].partition("-")[0])
    reference: list[tuple[str, dict[str, Any]]] = []
    url = f"{client.base}/v1/conversations/{cid}/events"
    headers = {**auth, "Accept": "text/event-stream"}
    async with (
        asyncio.timeout(_TURN_TIMEOUT_S),
        client.http.get(url, headers=headers, params={"after": str(first - 1)}) as response,
    ):
        async for event_id, envelope in _sse(response):
            if event_id is None:
                continue
            reference.append((event_id, envelope))
            if envelope["event"] == "done":
                break
    client.tally.viewer_turns += 1
    if [i for i, _ in seen] != [i for i, _ in reference]:
        client.tally.problem(
            f"viewer of {cid} from {first}: saw {len(seen)} events, the log has {len(reference)}"
        )
    elif seen != reference:
        client.tally.problem(f"viewer of {cid} from {first}: events differ from the log")


async def _turn_stats(js: Any, conversations: set[str], after: int) -> dict[str, int]:
    """Turns started and output tokens reported since the warm-up."""
    event_log = EventLog(js)
    turns = tokens = 0
    for cid in conversations:
        for stored in await event_log.read(cid):
            if stored.seq <= after:
                continue
            event = stored.event
            if isinstance(event, Started):
                turns += 1
            elif isinstance(event, Done | Cancelled | Failed):
                tokens += event.output_tokens
    return {"turns": turns, "tokens": tokens}


# How far the end may be above the baseline (a quarter into the load) before it
# counts as a leak: caches (folded conversations, accounts, prepared statements)
# grow with the number of conversations, which is fixed by then.
_LEAK = Resources(rss_mb=150.0, open_files=64, postgres=4, redis=8, tasks=32)


def _compare_resources(warm: Resources, end: Resources, tally: Tally) -> None:
    for field in Resources.__struct_fields__:
        start, now, slack = getattr(warm, field), getattr(end, field), getattr(_LEAK, field)
        if now > start + slack:
            tally.problem(f"{field}: {start} a quarter into the load, {now} at the end")


class Census(msgspec.Struct):
    blocks: int  # sys.getallocatedblocks(): memory Python holds for live objects
    by_type: dict[str, int]  # objects the collector tracks, by type name


def census() -> Census:
    gc.collect()
    counts = Counter(type(o).__qualname__ for o in gc.get_objects())
    return Census(blocks=sys.getallocatedblocks(), by_type=dict(counts))


def grew_most(before: Census, after: Census, top: int = 8) -> list[str]:
    growth = Counter(after.by_type)
    growth.subtract(before.by_type)
    return [f"{name} {n:+d}" for name, n in growth.most_common(top) if n > 0]


def _resources_now(pg: int, rd: int) -> Resources:
    gc.collect()
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return Resources(
        rss_mb=round(rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1),
        open_files=len(os.listdir("/proc/self/fd")),
        postgres=pg,
        redis=rd,
        tasks=len(asyncio.all_tasks()),
    )


async def _resources(servers: Servers) -> Resources:
    conn = await asyncpg.connect(servers.database_url)
    try:
        pg = int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
        )
    finally:
        await conn.close()
    client = aioredis.from_url(servers.redis_url)
    try:
        rd = len(await client.client_list())
    finally:
        await client.aclose()
    return _resources_now(pg, rd)


async def _wait_idle(js: Any, conversations: set[str], timeout_s: float = 180.0) -> list[str]:
    """Wait until no conversation has a turn active or queued; the ones still busy."""
    event_log = EventLog(js)
    deadline = time.monotonic() + timeout_s
    busy = sorted(conversations)
    while busy and time.monotonic() < deadline:
        still = []
        for cid in busy:
            state = fold(
                Conversation(conversation_id=cid), [s.event for s in await event_log.read(cid)]
            )
            if state.busy:
                still.append(cid)
        busy = still
        if busy:
            await asyncio.sleep(0.5)
    return busy


async def _reached(projector: Projector, position: int) -> None:
    async with asyncio.timeout(120), projector.applied:
        await projector.applied.wait_for(lambda: projector.position >= position)


async def _answered(js: Any, tally: Tally) -> None:
    """Every accepted message has its answer (an assistant message that grew from it) or
    its refusal in the log; no conversation is broken."""
    event_log = EventLog(js)
    by_conversation: dict[str, list[str]] = {}
    for cid, mid in tally.accepted:
        by_conversation.setdefault(cid, []).append(mid)
    for cid, mids in by_conversation.items():
        stored = [s.event for s in await event_log.read(cid)]
        state = fold(Conversation(conversation_id=cid), stored)
        if state.broken:
            tally.problem(f"conversation {cid} is broken: {state.broken}")
        answered = {m.parent_message_id for m in state.messages if m.role == "assistant"}
        refused = {e.message_id for e in stored if isinstance(e, CommandRejected)}
        for mid in mids:
            if mid not in answered and mid not in refused:
                tally.problem(f"message {mid} of {cid} was accepted and has no turn")


async def _snapshot(conn: asyncpg.Connection, schema: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for projection in PROJECTIONS.values():
        for table in (*projection.tables, "projection_errors"):
            rows = await conn.fetch(f'SELECT * FROM "{schema}"."{table}"')
            out[table] = sorted(repr(sorted(dict(r).items())) for r in rows)
    return out


async def _rebuild_equals_live(js: Any, servers: Servers, schema: str, tally: Tally) -> int:
    conn = await asyncpg.connect(servers.database_url)
    try:
        live = await _snapshot(conn, schema)
        for projection in PROJECTIONS.values():
            await rebuild(js, servers.database_url, schema, projection)
        rebuilt = await _snapshot(conn, schema)
    finally:
        await conn.close()
    for table, rows in live.items():
        if rows != rebuilt[table]:
            gone = len(set(rows) - set(rebuilt[table]))
            new = len(set(rebuilt[table]) - set(rows))
            tally.problem(
                f"rebuild of {table} differs from the live rows: {gone} live rows not rebuilt, {new} new"
            )
    return len(live)


async def run_soak(
    servers: Servers, minutes: float, users: int, viewers: int, seed: int = 7
) -> SoakResult:
    settings = load_settings()
    runner, model_url = await start_demo_model(
        "127.0.0.1", 0, DemoConfig(tokens_per_s=TOKENS_PER_S, think=False)
    )
    schema = f"soak_{int(time.time())}"
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=load_catalog(settings),
        model_base_url=model_url,
        db_schema=schema,
        port=0,
        limits=NO_LIMITS,
    )
    tally = Tally()
    rng = random.Random(seed)
    try:
        async with contextlib.AsyncExitStack() as stack:
            front = await stack.enter_async_context(
                Services(servers, options, ("edge", "projector"))
            )
            for _ in range(2):
                await stack.enter_async_context(Services(servers, options, ("worker",)))
            http = await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                )
            )
            nc = await connect(servers.nats_url, name="parley-soak", reconnect_forever=False)
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            admin = Client(http, front.edge_url, "soak-admin", tally)
            admin.auth = {"Authorization": f"Bearer {mint(SECRET, 'soak-admin', admin=True)}"}
            people = [
                User(Client(http, front.edge_url, f"soak-{i}", tally), random.Random(rng.random()))
                for i in range(users)
            ]
            for person in people:
                await person.setup(admin)
            for person in people:  # warm-up: every path once
                await person.message()
            head_before = int((await js.stream_info("CHAT_EVT")).state.last_seq)
            stop = asyncio.Event()
            began = time.monotonic()

            async def user_loop(person: User) -> None:
                while time.monotonic() - began < minutes * 60:
                    try:
                        await person.act()
                    except (TimeoutError, aiohttp.ClientError) as err:
                        tally.problem(f"{person.client.user}: {err!r}")

            watchers = [
                asyncio.create_task(
                    viewer(
                        Client(http, front.edge_url, f"soak-viewer-{i}", tally),
                        random.Random(rng.random()),
                        stop,
                    )
                )
                for i in range(viewers)
            ]

            async def baseline() -> tuple[Resources, Census]:
                await asyncio.sleep(minutes * 60 / 4)
                return await _resources(servers), census()

            sample = asyncio.create_task(baseline())
            await asyncio.gather(*(user_loop(p) for p in people))
            warm, warm_census = await sample
            elapsed = time.monotonic() - began
            stop.set()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            still_busy = await _wait_idle(js, tally.conversations)
            for cid in still_busy:
                tally.problem(f"conversation {cid} still has a turn active or queued")
            head = int((await js.stream_info("CHAT_EVT")).state.last_seq)
            for projector in front.projectors.values():
                await _reached(projector, head)
            await _answered(js, tally)
            stats = await _turn_stats(js, tally.conversations, head_before)
            pool = await create_pool(servers.database_url, schema, max_size=2)
            stack.push_async_callback(pool.close)
            summary = await audit_billing(js, pool, Scope())
            for mismatch in summary.mismatches:
                tally.problem(f"audit: {mismatch}")
            streaming = await pool.fetchval(
                "SELECT count(*) FROM messages WHERE status = 'streaming'"
            )
            if streaming:
                tally.problem(f"{streaming} message rows are still 'streaming'")
            tables = await _rebuild_equals_live(js, servers, schema, tally)
            end, end_census = await _resources(servers), census()
    finally:
        await runner.cleanup()
    _compare_resources(warm, end, tally)
    return SoakResult(
        minutes=round(elapsed / 60, 2),
        users=users,
        viewers=viewers,
        workers=2,
        turns=stats["turns"],
        turns_per_s=round(stats["turns"] / elapsed, 2),
        tokens=stats["tokens"],
        tokens_per_s=round(stats["tokens"] / elapsed, 1),
        events=head - head_before,
        actions=dict(tally.actions),
        outcomes=dict(tally.outcomes),
        viewer_turns=tally.viewer_turns,
        viewer_reconnects=tally.reconnects,
        conversations=len(tally.conversations),
        audit_mismatches=len(summary.mismatches),
        rebuilt_tables=tables,
        rss_mb_baseline=warm.rss_mb,
        rss_mb_end=end.rss_mb,
        open_files_baseline=warm.open_files,
        open_files_end=end.open_files,
        postgres_connections_baseline=warm.postgres,
        postgres_connections_end=end.postgres,
        redis_clients_baseline=warm.redis,
        redis_clients_end=end.redis,
        tasks_baseline=warm.tasks,
        tasks_end=end.tasks,
        python_blocks_baseline=warm_census.blocks,
        python_blocks_end=end_census.blocks,
        grew_most=grew_most(warm_census, end_census),
        problems=tally.problems,
    )


def render(r: SoakResult) -> str:
    lines = [
        f"soak: {r.minutes} min, {r.users} users, {r.viewers} viewers, {r.workers} workers, "
        f"{r.conversations} conversations",
        f"  load held: {r.turns} turns ({r.turns_per_s}/s), {r.tokens} output tokens "
        f"({r.tokens_per_s}/s), {r.events} events",
        f"  actions: {dict(sorted(r.actions.items()))}",
        f"  answers: {dict(sorted(r.outcomes.items()))}",
        f"  viewers: {r.viewer_turns} turns followed and checked, {r.viewer_reconnects} resumes",
        f"  audit: {r.audit_mismatches} mismatches; rebuild: {r.rebuilt_tables} tables compared",
        f"  a quarter in -> end: rss {r.rss_mb_baseline} -> {r.rss_mb_end} MB, "
        f"files {r.open_files_baseline} -> {r.open_files_end}, "
        f"postgres {r.postgres_connections_baseline} -> {r.postgres_connections_end}, "
        f"redis {r.redis_clients_baseline} -> {r.redis_clients_end}, "
        f"tasks {r.tasks_baseline} -> {r.tasks_end}, "
        f"python blocks {r.python_blocks_baseline} -> {r.python_blocks_end}",
        f"  objects that grew most: {', '.join(r.grew_most) or 'none'}",
        f"  problems: {len(r.problems)}",
    ]
    lines.extend(f"    - {p}" for p in r.problems)
    return "\n".join(lines)
