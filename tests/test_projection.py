"""The read-model projection: rows match the log, and restarts neither lose nor double them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from actors.content import merge_blocks
from events.follow import RawEvent
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Chunk, Done, ToolCall
from parley.services import Servers, Services
from projections.db import create_pool, drop_schema, ensure_schema
from projections.feed import LogFeed, log_end
from projections.handlers import READ_MODELS
from projections.projector import Projector
from tests.sse import SseClient

_COLUMNS_CONVERSATIONS = "id, user_id, project_id, title, title_source, model, message_count, token_usage_total, created_at, updated_at, last_seq"
_COLUMNS_MESSAGES = "*"


async def _rows(pool: Any, ids: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    conversations = await pool.fetch(
        f"SELECT {_COLUMNS_CONVERSATIONS} FROM conversations WHERE id = ANY($1) ORDER BY id", ids
    )
    messages = await pool.fetch(
        f"SELECT {_COLUMNS_MESSAGES} FROM messages WHERE conversation_id = ANY($1) ORDER BY seq",
        ids,
    )
    return [dict(r) for r in conversations], [dict(r) for r in messages]


async def _wait_position(projector: Projector, target: int) -> None:
    async with asyncio.timeout(30), projector.applied:
        await projector.applied.wait_for(lambda: projector.position >= target)


async def read_models_from_log_end(pool: Any, js: JetStreamContext) -> None:
    """A new schema's read models start at the log's present end: its projector reads
    what a test appends next, not the whole session's log."""
    await pool.execute(
        "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2)",
        READ_MODELS.name,
        await log_end(js),
    )


@contextlib.asynccontextmanager
async def running(projector: Projector) -> AsyncIterator[asyncio.Event]:
    """Run a projector until the block ends; it always stops and is awaited."""
    stopping = asyncio.Event()
    task = asyncio.create_task(projector.run(stopping))
    try:
        yield stopping
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


async def _run_some_turns(api: SseClient, conversations: int = 2) -> list[str]:
    ids = []
    for i in range(conversations):
        created = await api.create_conversation()
        ids.append(created["id"])
        await api.send_stream(created["id"], f"first question number {i} [[tokens=20]]")
        await api.send_stream(created["id"], "calculate 3*3")
    return ids


@pytest.fixture
async def scratch_schema(stack: Servers) -> Any:
    schema = f"proj_{new_id().lower()}"
    pool = await create_pool(stack.database_url, schema, max_size=4)
    yield pool
    await pool.close()
    await drop_schema(stack.database_url, schema)


async def test_a_projector_restarted_midway_neither_loses_nor_doubles_rows(
    api: SseClient, services: Services, nc: NatsClient, scratch_schema: Any
) -> None:
    ids = await _run_some_turns(api)
    assert services.projector is not None
    info = await nc.jetstream().stream_info("CHAT_EVT")
    target = int(info.state.last_seq)
    await _wait_position(services.projector, target)
    expected = await _rows(services.projector._pool, ids)

    js = nc.jetstream()
    first = Projector(js, scratch_schema, batch_max=7)
    async with running(first):
        # leaving the block stops it after the batch in hand: a restart mid-log
        await _wait_position(first, target // 2)
    assert first.position < target, "stopped too late to test a restart"

    second = Projector(js, scratch_schema, batch_max=7)
    async with running(second):
        await _wait_position(second, target)

    assert await _rows(scratch_schema, ids) == expected


async def test_a_batch_delivered_twice_is_applied_once(
    api: SseClient, event_log: EventLog, nc: NatsClient, scratch_schema: Any
) -> None:
    created = await api.create_conversation()
    cid = created["id"]
    await api.send_stream(cid, "hello [[tokens=5]]")
    stored = await event_log.read(cid)
    projector = Projector(nc.jetstream(), scratch_schema)
    await projector.load_position()
    await projector.apply(stored)
    once = await _rows(scratch_schema, [cid])
    await projector.apply(stored)  # redelivery after a crash before the ack
    assert await _rows(scratch_schema, [cid]) == once
    assert once[0][0]["token_usage_total"] > 0


async def test_message_rows_hold_the_merged_blocks_and_conversation_counters(
    api: SseClient, services: Services, event_log: EventLog
) -> None:
    created = await api.create_conversation()
    cid = created["id"]
    await api.send_stream(cid, "what is the time right now? [[think]]")
    await api.send_stream(cid, "thanks [[tokens=7]]")
    log = await event_log.read(cid)
    assert services.projector is not None
    await _wait_position(services.projector, log[-1].seq)

    dones = [s.event for s in log if isinstance(s.event, Done)]
    assert len(dones) == 2
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages")
    assert status == 200
    rows = body["messages"]
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    for row, done in zip(rows[1::2], dones, strict=True):
        pieces = [
            (s.event.kind, s.event.text) if isinstance(s.event, Chunk) else (None, "")
            for s in log
            if isinstance(s.event, Chunk | ToolCall) and s.event.turn_id == done.turn_id
        ]
        merged = [{"role": b.role, "content": b.content} for b in merge_blocks(pieces)]
        assert row["content"] == merged
        assert merged == [{"role": b.role, "content": b.content} for b in done.content]
        assert row["status"] == "complete" and row["input_tokens"] == done.input_tokens

    status, conversation = await api.request("GET", f"/v1/conversations/{cid}")
    assert conversation["message_count"] == 4
    assert conversation["token_usage_total"] == sum(d.input_tokens + d.output_tokens for d in dones)
    assert conversation["title"] == "what the time right now?"
    status, listed = await api.request("GET", "/v1/conversations")
    assert [c["id"] for c in listed["conversations"]] == [cid]


async def test_the_projection_can_be_rebuilt_from_the_log_identically(
    api: SseClient, services: Services, nc: NatsClient, scratch_schema: Any
) -> None:
    ids = await _run_some_turns(api, conversations=1)
    assert services.projector is not None
    target = int((await nc.jetstream().stream_info("CHAT_EVT")).state.last_seq)
    await _wait_position(services.projector, target)
    rebuilt = Projector(nc.jetstream(), scratch_schema, batch_max=500)
    async with running(rebuilt):
        await _wait_position(rebuilt, target)
    assert await _rows(scratch_schema, ids) == await _rows(services.projector._pool, ids)


async def test_a_second_start_locks_no_table_a_projector_is_writing(
    stack: Servers, scratch_schema: Any
) -> None:
    """A role starting while a projector writes must not wait on, or deadlock with, its
    rows: `parley dev` on servers with a log to project died with "deadlock detected"
    when the edge ran the DDL (CREATE INDEX IF NOT EXISTS locks its table) meanwhile."""
    schema = await scratch_schema.fetchval("SELECT current_schema()")
    async with scratch_schema.acquire() as writer, writer.transaction():
        # what a projector's batch holds while it writes
        await writer.execute("LOCK TABLE messages, ledger IN ROW EXCLUSIVE MODE")
        starting = await asyncpg.connect(stack.database_url)
        try:
            await starting.execute("SET lock_timeout = '2s'")
            await ensure_schema(starting, schema)  # would wait 2 s, then fail, if it locked
        finally:
            await starting.close()


class _StopWhileReading(Projector):
    """A projector told to stop while its feed reads a batch, as a SIGTERM can land."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = asyncio.Event()

    def _feed(self) -> LogFeed:
        feed = super()._feed()
        read = feed.next_batch

        async def next_batch(*args: Any, **kwargs: Any) -> list[RawEvent]:
            batch = await read(*args, **kwargs)
            if batch:
                self.stopping.set()
            return batch

        feed.next_batch = next_batch  # type: ignore[method-assign]
        return feed


async def test_a_projector_told_to_stop_while_it_reads_does_not_apply_what_it_read(
    api: SseClient, nc: NatsClient, scratch_schema: Any
) -> None:
    """The stop cuts a batch being stored (on a Postgres that does not answer, a
    statement waits for ever) once, when it comes: a batch read as the stop came and
    applied after it had no cut, and held the stop until the roles' deadline (seen as
    "role did not stop in time" with Postgres frozen). It is left to the next projector:
    the checkpoint has not moved."""
    await _run_some_turns(api, conversations=1)
    projector = _StopWhileReading(nc.jetstream(), scratch_schema, batch_max=7)
    async with asyncio.timeout(20):
        await projector.run(projector.stopping)
    assert projector.stopping.is_set(), "no batch was read: the test proves nothing"
    assert projector.batches == 0 and projector.position == 0
