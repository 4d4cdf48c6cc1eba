"""`parley projections rebuild`: built beside the live projection, swapped in atomically, identical.

The workload is what the system does: several conversations, several turns
each, tool calls, thinking, turns that fail midway ([[fail=...]]), a funded
project's conversation with billed turns, a regenerated answer, an edited
message, a cancelled and an interrupted turn, and poison in the log. Both
projections are rebuilt and compared row for row, the billing tables included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

import projections.prefetch
from events.ids import new_id
from events.log import EventLog
from events.subjects import account_subject
from events.vocabulary import TurnCharged
from parley.services import Servers, Services
from projections.billing import BILLING
from projections.db import create_pool, drop_schema
from projections.handlers import READ_MODELS
from projections.prefetch import in_order, plan_ranges, prefetch
from projections.projector import Projector
from projections.rebuild import RebuildError, rebuild, side_schema
from tests.conftest import SECRET, token_for
from tests.sse import SseClient, sse_events
from tests.test_audit import funded_project
from tests.test_cli import run, server_env
from tests.test_poison import publish_raw, raw_event
from tests.test_projection import _wait_position, running


async def _project_workload(api: SseClient, admin: SseClient) -> tuple[str, str]:
    """A funded project's conversation: billed turns ending every way, versions."""
    project = await funded_project(api, admin, "Rebuilt", 900_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    first = await api.send_stream(cid, "first [[tokens=12]]")
    answer = first[0].data["turn_id"]
    again = await api.send_stream_to(f"/v1/conversations/{cid}/messages/{answer}/regenerate", {})
    assert again[-1].data == "ok"
    # from the turn's own start, not the read models: they may not have it yet
    asked = first[0].data["user_message_id"]
    edited = await api.send_stream_to(
        f"/v1/conversations/{cid}/messages/{asked}",
        {"content": "first, edited [[tokens=8]]"},
        "PATCH",
    )
    assert edited[-1].data == "ok"
    await api.send_json(cid, "a long one [[tokens=4000]]")
    async with api.events(cid) as viewer:
        async for event in sse_events(viewer):
            if event.event == "token":
                break
        interrupted = await api.send_stream(cid, "instead [[tokens=5]]", on_busy="interrupt")
    assert interrupted[-1].data == "ok"
    await api.send_json(cid, "another long one [[tokens=4000]]")
    async with api.events(cid) as viewer:
        async for event in sse_events(viewer):
            if event.event == "token":
                break
        status, _ = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202
        ends = [e async for e in sse_events(viewer) if e.event == "done"]
    assert ends and ends[-1].data == "stopped"
    return cid, project


async def _charged(event_log: EventLog, project: str, turns: int) -> None:
    """Until the project's account holds the charges of `turns` turns."""
    subject = account_subject(f"project:{project}")
    async with asyncio.timeout(20):
        while True:
            charges = [
                s for s in await event_log.read_subject(subject) if isinstance(s.event, TurnCharged)
            ]
            if len(charges) >= turns:
                return
            await asyncio.sleep(0.05)


async def _workload(api: SseClient, nc: NatsClient) -> list[str]:
    ids = []
    for i in range(3):
        cid = (await api.create_conversation())["id"]
        ids.append(cid)
        await api.send_stream(cid, f"question {i}, thinking aloud [[think]] [[tokens=30]]")
        await api.send_stream(cid, f"calculate {i + 2}*7")
        await api.send_stream(cid, "what is the time?")
        await api.send_stream(cid, "and now break [[fail=error]]")
        await api.send_stream(cid, "cut me off [[fail=cut]]")
        await api.send_stream(cid, "one more after the failures [[tokens=10]]")
    # poison a rebuild must record again: an unknown type, text no column holds
    await publish_raw(nc, ids[0], raw_event(ids[0], "reaction", emoji="+1"))
    await publish_raw(nc, ids[1], raw_event(ids[1], "title", title="nul\u0000", source="user"))
    return ids


async def _billing_snapshot(db: Any, schema: str, project: str) -> dict[str, Any]:
    """Every row of every billing table that belongs to the project."""
    account = f"project:{project}"
    out: dict[str, Any] = {}
    for table, column, key in (
        ("projects", "id", project),
        ("project_members", "project_id", project),
        ("accounts", "account", account),
        ("credit_grants", "account", account),
        ("reservations", "account", account),
        ("ledger", "account", account),
    ):
        rows = await db.fetch(
            f'SELECT * FROM "{schema}".{table} WHERE {column} = $1 ORDER BY 1, 2', key
        )
        out[table] = [dict(r) for r in rows]
    assert set(BILLING.tables) == set(out), "snapshot the new tables too"
    return out


async def _snapshot(db: Any, schema: str, ids: list[str], through: int) -> dict[str, Any]:
    """Every row of every read-model table that belongs to `ids`, and the errors up to `through`."""
    conversations = await db.fetch(
        f'SELECT * FROM "{schema}".conversations WHERE id = ANY($1) ORDER BY id', ids
    )
    messages = await db.fetch(
        f'SELECT * FROM "{schema}".messages WHERE conversation_id = ANY($1) ORDER BY id', ids
    )
    errors = await db.fetch(
        f'SELECT * FROM "{schema}".projection_errors WHERE projection = $1 AND seq <= $2'
        " ORDER BY seq",
        READ_MODELS.name,
        through,
    )
    assert set(READ_MODELS.tables) == {"conversations", "messages"}, "snapshot the new tables too"
    return {
        "conversations": [dict(r) for r in conversations],
        "messages": [dict(r) for r in messages],
        "projection_errors": [dict(r) for r in errors],
    }


async def _head(nc: NatsClient) -> int:
    return int((await nc.jetstream().stream_info("CHAT_EVT")).state.last_seq)


def _differences(expected: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    out = []
    for table in expected:
        if len(expected[table]) != len(seen[table]):
            out.append(f"{table}: {len(expected[table])} rows expected, {len(seen[table])} seen")
        for a, b in zip(expected[table], seen[table], strict=False):
            if a != b:
                diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
                out.append(f"{table} row {a.get('id') or a.get('seq')}: {diff}")
    return out


@contextlib.asynccontextmanager
async def _readers_watching(api: SseClient, ids: list[str]) -> AsyncIterator[list[int]]:
    """Read the user's conversations and messages without pause while the block runs;
    every answer must show the whole projection (what each read found is checked live)."""
    expected = {}
    for cid in ids:
        _, body = await api.request("GET", f"/v1/conversations/{cid}/messages")
        expected[cid] = [(m["id"], m["status"], m["content"]) for m in body["messages"]]
    done = asyncio.Event()
    reads = [0]

    async def watch() -> None:
        while not done.is_set():
            status, listed = await api.request("GET", "/v1/conversations")
            assert status == 200, listed
            assert {c["id"] for c in listed["conversations"]} >= set(ids), listed
            for cid in ids:
                status, body = await api.request("GET", f"/v1/conversations/{cid}/messages")
                assert status == 200, body
                seen = [(m["id"], m["status"], m["content"]) for m in body["messages"]]
                assert seen == expected[cid], f"a reader saw a half-built projection: {seen}"
            reads[0] += 1

    task = asyncio.create_task(watch())
    try:
        yield reads
    finally:
        done.set()
        await task


async def test_a_rebuild_while_serving_swaps_in_identical_rows_and_the_live_projector_goes_on(
    api: SseClient, services: Services, stack: Servers, nc: NatsClient
) -> None:
    assert services.projector is not None
    live_projector = services.projector
    live_billing = services.projectors[BILLING.name]
    live = services.options.db_schema  # the session's live schema
    admin = SseClient(api.http, api.base_url, token_for("admin", admin=True))
    ids = await _workload(api, nc)
    billed, project = await _project_workload(api, admin)
    ids.append(billed)
    # a turn is charged on its account's subject after its end: the last (stopped)
    # one's charge may come after its viewer saw `done`, and the head read before it
    await _charged(EventLog(nc.jetstream()), project, 6)
    head = await _head(nc)
    await _wait_position(live_projector, head)
    await _wait_position(live_billing, head)
    db = await asyncpg.connect(stack.database_url)
    try:
        # a configuration table (no projection owns it): a rebuild must leave it alone
        await db.execute(f'CREATE TABLE IF NOT EXISTS "{live}".config_probe (name text)')
        await db.execute(f"INSERT INTO \"{live}\".config_probe VALUES ('kept')")
        before = await _snapshot(db, live, ids, head)
        billing_before = await _billing_snapshot(db, live, project)
        assert len(before["messages"]) >= 3 * 12 and len(before["projection_errors"]) >= 2
        assert len(billing_before["ledger"]) == 6, billing_before["ledger"]
        assert {r["turn_end"] for r in billing_before["ledger"]} == {"done", "cancelled"}
        assert any(not m["is_latest"] for m in before["messages"]), "versions were made"

        # a turn streams in another conversation while the rebuild runs and swaps
        during = (await api.create_conversation())["id"]
        turn = asyncio.create_task(api.send_stream(during, "during the rebuild [[tokens=800]]"))
        async with _readers_watching(api, ids) as reads:
            report = await rebuild(nc.jetstream(), stack.database_url, live, READ_MODELS)
            await rebuild(nc.jetstream(), stack.database_url, live, BILLING)
        assert reads[0] > 0, "the readers read while the rebuild ran"
        events = await turn
        assert events[-1].data == "ok", events[-3:]

        assert report.position >= head and report.entries >= head * 0.9, report
        assert report.turns >= 18 and report.errors >= 2, report
        after = await _snapshot(db, live, ids, head)
        assert after == before, "\n".join(_differences(before, after))
        billing_after = await _billing_snapshot(db, live, project)
        assert billing_after == billing_before, "\n".join(
            _differences(billing_before, billing_after)
        )
        assert await db.fetchval(f'SELECT name FROM "{live}".config_probe') == "kept"
        for leftover in ("rebuild", "retired"):
            name = side_schema(live, leftover, READ_MODELS.name)
            assert not await db.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname = $1", name
            ), f"{name} left behind"

        # the live projector goes on, on the swapped-in tables: a turn after the swap
        await api.send_stream(during, "after the rebuild, calculate 6*7")
        head = await _head(nc)
        await _wait_position(live_projector, head)
        scratch = f"fresh_{new_id().lower()}"
        pool = await create_pool(stack.database_url, scratch, max_size=4)
        try:
            fresh = Projector(nc.jetstream(), pool)
            async with running(fresh):
                await _wait_position(fresh, head)
            expected = await _snapshot(db, scratch, [*ids, during], head)
            seen = await _snapshot(db, live, [*ids, during], head)
            assert seen == expected, "\n".join(_differences(expected, seen))
        finally:
            await pool.close()
            await drop_schema(stack.database_url, scratch)
    finally:
        await db.execute(f'DROP TABLE IF EXISTS "{live}".config_probe')
        await db.close()


async def test_a_second_rebuild_of_the_same_projection_is_refused(
    stack: Servers, nc: NatsClient
) -> None:
    schema = f"busy_{new_id().lower()}"
    holder = await asyncpg.connect(stack.database_url)
    try:
        key = f"parley-rebuild/{schema}/{READ_MODELS.name}"
        assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
        with pytest.raises(RebuildError, match="already running"):
            await rebuild(nc.jetstream(), stack.database_url, schema, READ_MODELS)
        # said as a condition met at run time (exit 1), not as a bad argument (exit 2)
        env = {**server_env(stack), "PARLEY_DB_SCHEMA": schema, "PARLEY_JWT_SECRET": SECRET}
        busy = await asyncio.to_thread(
            run, "projections", "rebuild", "--projection", "read_models", env=env
        )
        assert busy.returncode == 1, (busy.returncode, busy.stderr)
        assert busy.stderr.strip().splitlines()[-1] == (
            f"parley: a rebuild of read_models in {schema} is already running"
        ), busy.stderr
    finally:
        await holder.close()
        await drop_schema(stack.database_url, schema)


async def test_the_rebuild_command_rebuilds_and_reports(
    api: SseClient, stack: Servers, nc: NatsClient
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "calculate 2+2")
    head = await _head(nc)
    schema = f"cli_{new_id().lower()}"
    env = {**server_env(stack), "PARLEY_DB_SCHEMA": schema, "PARLEY_JWT_SECRET": SECRET}
    try:
        started = time.monotonic()
        done = await asyncio.to_thread(
            run, "projections", "rebuild", "--projection", "read_models", "--json", env=env
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["projection"] == "read_models" and report["position"] >= head, report
        assert report["counts"]["tool_call"] >= 1 and report["seconds"] < time.monotonic() - started
        db = await asyncpg.connect(stack.database_url)
        try:
            row = await db.fetchrow(
                f'SELECT tool_calls::text, latency_ms FROM "{schema}".messages'
                " WHERE conversation_id = $1 AND role = 'assistant'",
                cid,
            )
        finally:
            await db.close()
        assert row is not None and json.loads(row["tool_calls"])[0]["result"] == "4", row
        assert row["latency_ms"] > 0

        unknown = await asyncio.to_thread(
            run, "projections", "rebuild", "--projection", "nope", env=env
        )
        assert unknown.returncode == 2 and "known: billing, read_models" in unknown.stderr
    finally:
        await drop_schema(stack.database_url, schema)


def test_a_stretch_of_the_log_is_cut_into_ranges_that_cover_it_once() -> None:
    assert plan_ranges(0, 10, 3) == [(1, 3), (4, 6), (7, 10)]
    assert plan_ranges(100, 102, 4) == [(101, 101), (102, 102)]
    assert plan_ranges(5, 5, 2) == []
    for after, head, parts in [(0, 1_000_001, 2), (17, 4_003, 4), (0, 7, 7)]:
        ranges = plan_ranges(after, head, parts)
        covered = [seq for lo, hi in ranges for seq in range(lo, hi + 1)]
        assert covered == list(range(after + 1, head + 1)), (after, head, parts)
    # a long stretch is cut finer than one range per worker: a range is what a reader
    # holds at once, so it is bounded, not a share of the log
    assert plan_ranges(0, 10, 2, span=3) == [(1, 2), (3, 5), (6, 7), (8, 10)]
    for after, head, parts, span in [(0, 1_000_001, 2, 50_000), (17, 4_003, 4, 7), (0, 9, 2, 20)]:
        ranges = plan_ranges(after, head, parts, span)
        assert all(hi - lo + 1 <= span for lo, hi in ranges), (after, head, span)
        assert len(ranges) >= min(parts, head - after)
        covered = [seq for lo, hi in ranges for seq in range(lo, hi + 1)]
        assert covered == list(range(after + 1, head + 1)), (after, head, parts, span)


async def test_ranges_are_read_ahead_only_as_far_as_there_are_readers() -> None:
    """Ranges finished and not yet applied are held in memory: no more than `ahead` are
    ever asked for beyond the one handed out, whatever the number of ranges, and they
    come in order even when later ones finish first."""
    started: list[int] = []
    handed: list[int] = []

    async def read(item: int) -> int:
        started.append(item)
        for _ in range(10 - item % 10):  # later ranges finish first
            await asyncio.sleep(0)
        return item

    async for item in in_order(read, range(40), ahead=2):
        assert len(started) <= len(handed) + 1 + 2, (handed, started)
        handed.append(item)
        for _ in range(20):  # the caller applies; readers run meanwhile
            await asyncio.sleep(0)
    assert handed == list(range(40)) and started == list(range(40))


async def test_worker_processes_read_the_log_in_ranges_of_bounded_length(
    services: Services, stack: Servers, nc: NatsClient
) -> None:
    cid = new_id()
    for n in range(30):
        await publish_raw(nc, cid, raw_event(cid, "chunk", turn_id="t", kind="answer", text=str(n)))
        await publish_raw(nc, cid, raw_event(cid, "title", title=str(n), source="auto"))
    head = await _head(nc)
    after = head - 60
    reads = [
        read
        async for read in prefetch(
            stack.nats_url, after, head, workers=2, skip_prefix=b'{"type": "chunk"', span=8
        )
    ]
    bounds = [after] + [read.hi for read in reads]
    assert bounds[-1] == head and all(0 < hi - lo <= 8 for lo, hi in itertools.pairwise(bounds))
    assert sum(read.skipped for read in reads) == 30
    kept = [raw.seq for read in reads for raw in read.kept]
    assert kept == list(range(after + 2, head + 1, 2)), "every title, once, in order"


async def test_a_rebuild_read_by_worker_processes_builds_the_same_rows(
    api: SseClient,
    services: Services,
    stack: Servers,
    nc: NatsClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin = SseClient(api.http, api.base_url, token_for("admin", admin=True))
    ids = await _workload(api, nc)
    billed, project = await _project_workload(api, admin)
    ids.append(billed)
    head = await _head(nc)
    # many short ranges, each applied in several batches: what a long log is cut into
    # (about twenty: the session's log, however long the tests before made it; each
    # range costs a consumer)
    monkeypatch.setattr(projections.prefetch, "SPAN", max(40, head // 20))
    assert services.projector is not None
    await _wait_position(services.projector, head)
    await _wait_position(services.projectors[BILLING.name], head)
    live = services.options.db_schema
    schema = f"par_{new_id().lower()}"
    db = await asyncpg.connect(stack.database_url)
    try:
        for projection in (READ_MODELS, BILLING):
            report = await rebuild(
                nc.jetstream(),
                stack.database_url,
                schema,
                projection,
                nats_url=stack.nats_url,
                workers=2,
                parallel_from=0,  # however short the log, read it in two processes
                batch_max=7,
            )
            assert report.counts.get("chunk", 0) > 0 and report.position >= head, report
        expected = await _snapshot(db, live, ids, head)
        seen = await _snapshot(db, schema, ids, head)
        assert seen == expected, "\n".join(_differences(expected, seen))
        billing_expected = await _billing_snapshot(db, live, project)
        billing_seen = await _billing_snapshot(db, schema, project)
        assert billing_expected["ledger"], "the project's turns were billed"
        assert billing_seen == billing_expected, "\n".join(
            _differences(billing_expected, billing_seen)
        )
    finally:
        await db.close()
        await drop_schema(stack.database_url, schema)


async def test_the_rebuild_benchmark_runs_on_a_small_log(stack: Servers) -> None:
    env = {**server_env(stack), "PARLEY_JWT_SECRET": SECRET}
    done = await asyncio.to_thread(
        run, "bench", "rebuild", "--events", "3000", "--rounds", "1", "--json", env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    result = json.loads(line)
    assert all(not isinstance(v, dict | list) for v in result.values()), "flat keys"
    assert result["published"] >= 3000 and result["events"] >= result["published"], result
    assert result["turns"] > 0 and result["messages"] >= 2 * result["turns"] * 0.9, result
    assert result["chunks"] > result["turns"] * 30 and result["events_per_s"] > 0, result
