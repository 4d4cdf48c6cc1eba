"""A log that ends before the projections' checkpoints: restored from an older copy of
the NATS store, or deleted and created again.

Postgres is then ahead of the log: the checkpoints name positions the log does
not have yet, and the log's next appends reuse them. The session's log cannot be
cut back under the other tests, so each test gives a projection of its own schema
a checkpoint past the log's end, which is what such a projection looks like.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient

from events.codec import encode
from events.ids import new_id
from events.log import EventLog
from events.streams import ensure_streams
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import Chunk
from parley.services import Servers
from parley.stack import EmbeddedStack
from projections.billing import BILLING
from projections.db import create_pool
from projections.feed import LogBehind, LogFeed, log_end
from projections.handlers import READ_MODELS
from projections.projector import Projector
from projections.rebuild import rebuild
from projections.store import STOPPED_SQL, ReadStore
from tests.conftest import extra_edge
from tests.sse import SseClient
from tests.test_faults import until
from tests.test_poison import publish_raw
from tests.test_projection import _wait_position, read_models_from_log_end, running

# How far past the log's end the checkpoint is put: more than anything else in the
# session appends while a test runs (nothing does, between tests' requests).
AHEAD = 20


async def _chunks(nc: NatsClient, count: int, conversation: str = "") -> int:
    """Append `count` entries no projection writes a row for (on `conversation`'s log,
    else a new one's); the last one's position."""
    conversation = conversation or new_id()
    seq = 0
    for _ in range(count):
        chunk = Chunk(
            conversation_id=conversation,
            at=0,
            event_id=new_id(),
            turn_id="t",
            kind="answer",
            text=".",
        )
        seq = await publish_raw(nc, conversation, encode(chunk))
    return seq


async def _refused(projector: Projector) -> str:
    """Run `projector` until it stops by itself; what it refused with."""
    with pytest.raises(LogBehind) as refused:
        await asyncio.wait_for(projector.run(asyncio.Event()), 30)
    return str(refused.value)


async def _readiness(stack: Servers, schema: str) -> tuple[int, dict[str, Any]]:
    async with (
        extra_edge(stack, db_schema=schema) as base,
        aiohttp.ClientSession() as http,
        http.get(f"{base}/readyz") as response,
    ):
        return response.status, await response.json()


async def test_a_checkpoint_past_the_log_s_end_stops_the_projector_until_a_rebuild(
    stack: Servers, nc: NatsClient, event_log: EventLog, scratch: tuple[str, Any]
) -> None:
    name, pool = scratch
    js = nc.jetstream()
    end = await log_end(js)
    await pool.execute(
        "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2)",
        READ_MODELS.name,
        end + AHEAD,
    )
    # /readyz says so before any projector ran
    status, body = await _readiness(stack, name)
    assert status == 503, body
    assert any("projections rebuild" in reason for reason in body["reasons"]), body

    # The projector refuses to follow from a position the log does not have, and
    # says why and what to do, rather than wait for the log to get there.
    reason = await _refused(Projector(js, pool, projection=READ_MODELS))
    assert f"up to position {end + AHEAD}" in reason and "projections rebuild" in reason
    assert await ReadStore(pool).stopped_projections() == {READ_MODELS.name: reason}
    status, body = await _readiness(stack, name)
    assert status == 503 and reason in body["reasons"], body
    # and says it once, as recorded, after the log has grown (still short of it)
    assert await _chunks(nc, 2) < end + AHEAD
    status, body = await _readiness(stack, name)
    assert status == 503 and body["reasons"] == [reason], body

    # A feed asked to go on after a position past the log's end refuses too (the log
    # replaced under a running projector: its consumer is made again from there).
    feed = LogFeed(js, end + AHEAD)
    with pytest.raises(LogBehind):
        await feed.next_batch(10, wait_s=0.1)
    await feed.close()

    # Once the log has grown past the old checkpoint, the projection is still not
    # followed from it: what lies below it in this log was never applied.
    assert await _chunks(nc, AHEAD + 5) > end + AHEAD
    assert await _refused(Projector(js, pool, projection=READ_MODELS)) == reason
    status, body = await _readiness(stack, name)
    assert status == 503 and reason in body["reasons"], body

    # The documented way out: a rebuild from this log, and the projector follows it.
    report = await rebuild(js, stack.database_url, name, READ_MODELS)
    assert await ReadStore(pool).stopped_projections() == {}
    projector = Projector(js, pool, projection=READ_MODELS)
    async with running(projector):
        await _wait_position(projector, max(report.position, await _chunks(nc, 1)))
    status, body = await _readiness(stack, name)
    assert not [r for r in body["reasons"] if "rebuild" in r], body


async def test_a_rebuild_replaces_a_projection_whose_checkpoint_is_past_the_log_s_end(
    stack: Servers, nc: NatsClient, api: SseClient, scratch: tuple[str, Any]
) -> None:
    """The way out must work in the state it is for: the log still ends before the
    checkpoint (nothing appended since the restore)."""
    name, pool = scratch
    js = nc.jetstream()
    conversation = (await api.create_conversation())["id"]
    answer = await api.send_stream(conversation, "hello [[tokens=5]]")
    assert answer[-1].data == "ok", answer[-3:]
    end = await log_end(js)
    # rows of the log that was: a conversation this log does not hold, and a checkpoint
    await pool.execute(
        "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2)",
        READ_MODELS.name,
        end + AHEAD,
    )
    await pool.execute(
        "INSERT INTO conversations (id, user_id, title, created_at, updated_at, last_seq)"
        " VALUES ('gone', 'someone', 'of the log that was', now(), now(), $1)",
        end + AHEAD,
    )
    await _refused(Projector(js, pool, projection=READ_MODELS))

    report = await asyncio.wait_for(rebuild(js, stack.database_url, name, READ_MODELS), 60)
    assert report.position <= await log_end(js)
    assert await pool.fetchval("SELECT position FROM projection_checkpoints") == report.position
    assert await ReadStore(pool).stopped_projections() == {}
    ids = {row["id"] for row in await pool.fetch("SELECT id FROM conversations")}
    assert conversation in ids and "gone" not in ids
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1", conversation
        )
        == 2
    )
    projector = Projector(js, pool, projection=READ_MODELS)
    async with running(projector):
        await _wait_position(projector, await _chunks(nc, 1))


async def test_entries_removed_before_a_projector_applied_them_are_recorded(
    nc: NatsClient, event_log: EventLog, scratch: tuple[str, Any]
) -> None:
    """A projector behind when a retention limit or a purge removed entries goes on
    from the oldest kept one (there is nothing else to follow), and says which
    positions it never applied rather than pass over them in silence."""
    _, pool = scratch
    js = nc.jetstream()
    # applied up to an entry of its own: a projection at 0 has no rows to miss
    checkpoint = await _chunks(nc, 1)
    await pool.execute(
        "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2)",
        READ_MODELS.name,
        checkpoint,
    )
    gone = new_id()
    last_gone = await _chunks(nc, 3, gone)
    purge = msgspec.json.encode({"filter": event_subject(gone)})
    answer = msgspec.json.decode(
        (await nc.request(f"$JS.API.STREAM.PURGE.{EVT_STREAM}", purge)).data
    )
    assert answer.get("purged") == 3, answer
    kept = await _chunks(nc, 1)

    projector = Projector(js, pool, projection=READ_MODELS)
    async with running(projector):
        await _wait_position(projector, kept)
    rows = await pool.fetch("SELECT seq, rule, reason FROM projection_errors")
    assert [(row["seq"], row["rule"]) for row in rows] == [(checkpoint + 1, "removed")], rows
    assert f"positions {checkpoint + 1} to {last_gone}" in rows[0]["reason"], rows
    assert "projections rebuild" in rows[0]["reason"]


async def test_a_busy_log_is_not_taken_for_one_that_ends_before_the_checkpoints(
    stack: Servers, nc: NatsClient, event_log: EventLog, scratch: tuple[str, Any]
) -> None:
    """/readyz reads the log's end beside the checkpoints: what is appended and applied
    between the two reads puts a checkpoint past the end it read, on a healthy log (a
    busy one, with a Postgres slow to answer, did so on most probes)."""
    name, pool = scratch
    js = nc.jetstream()
    await read_models_from_log_end(pool, js)
    async with extra_edge(stack, db_schema=name) as base, aiohttp.ClientSession() as http:

        async def probe() -> tuple[int, dict[str, Any]]:
            async with http.get(f"{base}/readyz") as response:
                return response.status, await response.json()

        async with pool.acquire() as blocker, blocker.transaction():
            # Postgres slow to answer the probe: its first query waits on this lock
            await blocker.execute("LOCK TABLE projection_errors IN ACCESS EXCLUSIVE MODE")
            answer = asyncio.create_task(probe())
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%FROM projection_errors%' AND pid <> pg_backend_pid()"
            )
            await until(lambda: pool.fetchval(waiting), "the probe waits on Postgres", 1.0)
            # meanwhile an entry is appended, and the projector applies it
            await pool.execute(
                "UPDATE projection_checkpoints SET position = $2 WHERE name = $1",
                READ_MODELS.name,
                await _chunks(nc, 1),
            )
        status, body = await answer
    assert status == 200, body
    assert body["projection_lag"] == 0, body


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    """Servers of the test's own: the session's log cannot lose its first entries
    under the other tests."""
    with EmbeddedStack(tmp_path / "stack") as running:
        yield running


async def test_a_projection_built_from_a_log_whose_start_was_removed_misses_nothing(
    own_stack: EmbeddedStack,
) -> None:
    """A rebuild, or a new projection, starts from position 0: the log's first
    entries, removed by a retention limit or a purge, made no rows of it, and a row
    `removed` telling to rebuild (which would write it again) would be false."""
    urls = own_stack.urls
    nc = await nats.connect(urls.nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        await _chunks(nc, 3)
        kept = await _chunks(nc, 2)
        # what max_age or max_msgs does to the log's start
        purge = msgspec.json.encode({"seq": kept - 1})
        answer = msgspec.json.decode(
            (await nc.request(f"$JS.API.STREAM.PURGE.{EVT_STREAM}", purge)).data
        )
        assert answer.get("purged") == kept - 2, answer

        await rebuild(js, urls.database_url, "parley", READ_MODELS)
        pool = await create_pool(urls.database_url, "parley", max_size=2)
        try:
            assert await pool.fetch("SELECT * FROM projection_errors") == []
            projector = Projector(js, pool, projection=BILLING)
            async with running(projector):
                await _wait_position(projector, kept)
            assert await pool.fetch("SELECT * FROM projection_errors") == []
        finally:
            await pool.close()
    finally:
        await nc.close()


async def test_the_audit_refuses_a_ledger_projected_from_another_log(
    stack: Servers, nc: NatsClient, event_log: EventLog, scratch: tuple[str, Any]
) -> None:
    """A billing position past the log's end is not a log whose entries were removed:
    the ledger is of the log that was, and there is nothing to audit it against."""
    name, pool = scratch
    end = await log_end(nc.jetstream())
    await pool.execute(
        "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2)",
        BILLING.name,
        end + AHEAD,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(
        PARLEY_NATS_URL=stack.nats_url,
        PARLEY_DATABASE_URL=stack.database_url,
        PARLEY_REDIS_URL=stack.redis_url,
        PARLEY_DB_SCHEMA=name,
    )
    command = [sys.executable, "-m", "parley.cli", "audit", "billing", "--json"]
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert f"up to position {end + AHEAD}, but CHAT_EVT ends at" in done.stderr, done.stderr
    assert "projections rebuild" in done.stderr, done.stderr


async def test_entries_of_other_subjects_are_not_taken_for_removed_ones(
    own_stack: EmbeddedStack,
) -> None:
    """A CHAT_EVT made by an operator may hold subjects besides parley's: their entries
    take positions the projector's feed passes over, and were never removed."""
    urls = own_stack.urls
    nc = await nats.connect(urls.nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        config = (await js.stream_info(EVT_STREAM)).config
        config.subjects = [*(config.subjects or []), "ops.notes.>"]
        await js.update_stream(config)
        checkpoint = await _chunks(nc, 2)
        pool = await create_pool(urls.database_url, "parley", max_size=2)
        try:
            await pool.execute(
                "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2)",
                READ_MODELS.name,
                checkpoint,
            )
            for _ in range(3):
                await js.publish("ops.notes.deploy", b"an operator's note")
            kept = await _chunks(nc, 1)
            projector = Projector(js, pool, projection=READ_MODELS)
            async with running(projector):
                await _wait_position(projector, kept)
            assert await pool.fetch("SELECT * FROM projection_errors") == []

            # among them, entries of parley's that were removed are still said
            gone = new_id()
            last_gone = await _chunks(nc, 2, gone)
            await js.publish("ops.notes.deploy", b"another note")
            purge = msgspec.json.encode({"filter": event_subject(gone)})
            await nc.request(f"$JS.API.STREAM.PURGE.{EVT_STREAM}", purge)
            kept = await _chunks(nc, 1)
            projector = Projector(js, pool, projection=READ_MODELS)
            async with running(projector):
                await _wait_position(projector, kept)
            rows = await pool.fetch("SELECT seq, rule, reason FROM projection_errors")
            assert [(r["seq"], r["rule"]) for r in rows] == [(last_gone - 1, "removed")], rows
            assert f"positions {last_gone - 1} to {last_gone}" in rows[0]["reason"], rows
        finally:
            await pool.close()
    finally:
        await nc.close()


async def test_readiness_finds_stopped_projections_without_reading_every_error(
    scratch: tuple[str, Any],
) -> None:
    """/readyz asks which projections stopped on every probe: on a table with a row
    for each event a projection could not apply, that must not be a read of it all."""
    _, pool = scratch
    await pool.execute(
        "INSERT INTO projection_errors (projection, seq, conversation_id, event_type, rule,"
        " reason, raw) SELECT 'read_models', n, 'c', 'message_added', 'skipped',"
        " 'it could not be stored', NULL FROM generate_series(1, 20000) AS n"
    )
    await pool.execute("ANALYZE projection_errors")
    plan = await pool.fetchval(f"EXPLAIN (FORMAT JSON) {STOPPED_SQL}")
    assert "Seq Scan" not in plan, plan
    assert await ReadStore(pool).stopped_projections() == {}
