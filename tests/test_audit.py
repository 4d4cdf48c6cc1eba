"""`parley audit billing` on the live stack: clean after a realistic workload, and it
fails loudly, naming the turn, when a ledger row is tampered with or dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from events.log import EventLog
from events.subjects import EVT_STREAM, account_subject, event_subject
from events.vocabulary import TurnCharged
from parley.audit_command import audit_billing
from parley.services import Servers, Services
from projections.audit import Scope
from projections.db import create_pool
from tests.conftest import Projected, caught_up, token_for
from tests.sse import SseClient


def audit(stack: Servers, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(
        PARLEY_NATS_URL=stack.nats_url,
        PARLEY_DATABASE_URL=stack.database_url,
        PARLEY_REDIS_URL=stack.redis_url,
        PARLEY_DB_SCHEMA="parley_test",
    )
    return subprocess.run(
        [sys.executable, "-m", "parley.cli", "audit", "billing", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def funded_project(api: SseClient, admin: SseClient, name: str, micro_credits: int) -> str:
    """A project of `api`'s user, granted `micro_credits` by `admin`: its id."""
    status, body = await api.request("POST", "/v1/projects", json={"name": name})
    assert status == 201
    status, _ = await admin.request(
        "POST",
        f"/v1/billing/accounts/project/{body['id']}/credits",
        json={"micro_credits": micro_credits},
    )
    assert status == 201
    project: str = body["id"]
    return project


@pytest.fixture
async def billed_project(
    api: SseClient,
    services: Services,
    http: aiohttp.ClientSession,
    event_log: EventLog,
    projected: Projected,
) -> AsyncIterator[tuple[str, list[str]]]:
    """A funded project with turns that ended every way: done, cancelled, failed."""
    admin = SseClient(http, services.edge_url, token_for("admin", admin=True))
    project = await funded_project(api, admin, "Audited", 500_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    assert (await api.send_stream(cid, "calculate 6*7"))[-1].data == "ok"
    assert (await api.send_stream(cid, "[[tokens=20]] [[fail=cut]]"))[-1].data == "error"
    await api.send_json(cid, "[[tokens=4000]]")
    async with asyncio.timeout(20):
        chunks = 0
        while chunks < 3:
            chunks = sum(type(s.event).__name__ == "Chunk" for s in await event_log.read(cid))
            await asyncio.sleep(0.05)
    await api.request("POST", f"/v1/conversations/{cid}/cancel")
    account = account_subject(f"project:{project}")
    async with asyncio.timeout(30):
        charged = 0
        while charged < 3:
            events = await event_log.read_subject(account)
            charged = sum(isinstance(s.event, TurnCharged) for s in events)
            await asyncio.sleep(0.05)
    await projected(cid)
    await caught_up(services.projectors["billing"], events[-1].seq)
    turns = [s.event.turn_id for s in events if isinstance(s.event, TurnCharged)]
    yield project, turns


async def test_the_audit_of_a_realistic_workload_is_clean(
    stack: Servers, billed_project: tuple[str, list[str]]
) -> None:
    project, _ = billed_project
    done = await asyncio.to_thread(audit, stack, "--project", project, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    assert summary["billed_turns"] == 3 and summary["charges"] == 3, summary
    assert summary["mismatches"] == []
    readable = await asyncio.to_thread(audit, stack, "--project", project)
    assert readable.returncode == 0 and "every charge and balance agrees" in readable.stdout


async def test_a_tampered_or_dropped_ledger_row_fails_the_audit(
    stack: Servers, billed_project: tuple[str, list[str]]
) -> None:
    project, turns = billed_project
    conn = await asyncpg.connect(stack.database_url, server_settings={"search_path": "parley_test"})
    try:
        await conn.execute("UPDATE ledger SET cost = cost + 1 WHERE turn_id = $1", turns[0])
        tampered = await asyncio.to_thread(audit, stack, "--project", project)
        await conn.execute("UPDATE ledger SET cost = cost - 1 WHERE turn_id = $1", turns[0])
        # not only the money: who asked, the tokens, the prices are the charge's too
        who = await conn.fetchval("SELECT user_id FROM ledger WHERE turn_id = $1", turns[0])
        await conn.execute("UPDATE ledger SET user_id = 'mallory' WHERE turn_id = $1", turns[0])
        misnamed = await asyncio.to_thread(audit, stack, "--project", project)
        await conn.execute("UPDATE ledger SET user_id = $2 WHERE turn_id = $1", turns[0], who)
        row = await conn.fetchrow("SELECT * FROM ledger WHERE turn_id = $1", turns[1])
        await conn.execute("DELETE FROM ledger WHERE turn_id = $1", turns[1])
        try:
            dropped = await asyncio.to_thread(audit, stack, "--project", project, "--json")
        finally:
            columns = list(row.keys())
            await conn.execute(
                f"INSERT INTO ledger ({', '.join(columns)}) VALUES"
                f" ({', '.join(f'${i + 1}' for i in range(len(columns)))})",
                *row.values(),
            )
    finally:
        await conn.close()
    assert tampered.returncode == 1, tampered.stdout
    assert "ledger_row_differs" in tampered.stdout and turns[0] in tampered.stdout
    assert misnamed.returncode == 1 and "mallory" in misnamed.stdout, misnamed.stdout
    assert dropped.returncode == 1, dropped.stdout
    kinds = [(m["kind"], m["subject"]) for m in json.loads(dropped.stdout)["mismatches"]]
    assert kinds == [("ledger_row_missing", turns[1])], kinds
    clean = await asyncio.to_thread(audit, stack, "--project", project)
    assert clean.returncode == 0, clean.stdout


class ChargedMeanwhile:
    """The projection's pool, but the first read of the ledger waits until another turn
    has been charged and projected: the projector moving on between the audit's
    reads, at the worst moment (reads on the pool or on a connection of it)."""

    def __init__(self, pool: Any, charge_another: Any) -> None:
        self._pool = pool
        self._charge_another = charge_another
        self.interleaved = False

    async def _before(self, query: str) -> None:
        if "FROM ledger" in query and not self.interleaved:
            self.interleaved = True
            await self._charge_another()

    async def fetch(self, query: str, *args: Any) -> Any:
        await self._before(query)
        return await self._pool.fetch(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._pool.fetchval(query, *args)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._pool.acquire() as conn:
            yield _Connection(conn, self)


class _Connection:
    def __init__(self, conn: Any, pool: ChargedMeanwhile) -> None:
        self._conn = conn
        self._pool = pool

    def transaction(self, **options: Any) -> Any:
        return self._conn.transaction(**options)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._conn.fetchval(query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        await self._pool._before(query)
        return await self._conn.fetch(query, *args)

    def cursor(self, query: str, *args: Any, **options: Any) -> AsyncIterator[Any]:
        async def rows() -> AsyncIterator[Any]:
            await self._pool._before(query)
            async for row in self._conn.cursor(query, *args, **options):
                yield row

        return rows()


async def test_a_turn_charged_while_the_audit_reads_is_no_mismatch(
    stack: Servers,
    api: SseClient,
    services: Services,
    event_log: EventLog,
    nc: NatsClient,
    billed_project: tuple[str, list[str]],
) -> None:
    """The audit read the projection's position, then the ledger and the balances one
    by one: a turn charged in between was a ledger row "the log did not have" and a
    balance that differed, and `parley audit billing` failed while turns ran."""
    project, _ = billed_project
    cid = (await api.create_conversation(project_id=project))["id"]

    async def charge_another() -> None:
        assert (await api.send_stream(cid, "one more [[tokens=3]]"))[-1].data == "ok"
        account = account_subject(f"project:{project}")
        async with asyncio.timeout(30):
            while True:
                events = await event_log.read_subject(account)
                if sum(
                    isinstance(s.event, TurnCharged) and s.event.conversation_id == cid
                    for s in events
                ):
                    break
                await asyncio.sleep(0.05)
        await caught_up(services.projectors["billing"], events[-1].seq)

    pool = await create_pool(stack.database_url, "parley_test", max_size=2, create=False)
    try:
        meanwhile = ChargedMeanwhile(pool, charge_another)
        summary = await audit_billing(nc.jetstream(), meanwhile, Scope(project=project))
    finally:
        await pool.close()
    assert meanwhile.interleaved
    assert summary.mismatches == [], summary.mismatches
    assert summary.billed_turns == 3  # as far as the projection had come when it began


async def test_the_audit_says_how_many_positions_the_log_no_longer_holds(
    stack: Servers,
    nc: NatsClient,
    api: SseClient,
    services: Services,
    event_log: EventLog,
    projected: Projected,
) -> None:
    """Entries a retention limit or a purge removed cannot be checked: the audit says
    how many, rather than let their charges pass for tampering without a word."""
    cid = (await api.create_conversation())["id"]
    assert (await api.send_stream(cid, "hello"))[-1].data == "ok"
    await projected(cid)
    entries = await event_log.read(cid)
    await caught_up(services.projectors["billing"], entries[-1].seq)
    before = await asyncio.to_thread(audit, stack, "--json")
    removed_before = json.loads(before.stdout)["removed"]

    purge = json.dumps({"filter": event_subject(cid)}).encode()
    answer = json.loads((await nc.request(f"$JS.API.STREAM.PURGE.{EVT_STREAM}", purge)).data)
    assert answer.get("purged") == len(entries), answer
    after = await asyncio.to_thread(audit, stack, "--json")
    assert json.loads(after.stdout)["removed"] == removed_before + len(entries), after.stdout
    readable = await asyncio.to_thread(audit, stack)
    assert "are no longer in the log" in readable.stdout, readable.stdout
