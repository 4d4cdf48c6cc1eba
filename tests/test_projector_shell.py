"""The projector's shell: chunks passed over undecoded, handlers registered once, a moved
checkpoint followed, and its lag behind the log reported by /readyz."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from api.app import create_app
from api.config import EdgeConfig
from api.context import HUBS, NATS
from events.broker import EntryClient
from events.codec import Unreadable, encode
from events.follow import RawEvent
from events.ids import new_id
from events.log import EventLog, StoredEvent
from events.vocabulary import Chunk, ContentPart, ConversationCreated, Title
from parley.services import Servers, Services
from projections.billing import BILLING
from projections.catalog import PROJECTIONS
from projections.db import create_pool, drop_schema
from projections.feed import log_end
from projections.handlers import READ_MODELS
from projections.projector import CHUNK_PREFIX, Projector
from projections.registry import Projection, Write, write
from tests.conftest import SECRET
from tests.sse import SseClient
from tests.test_projection import _rows, _wait_position, read_models_from_log_end, running
from tests.test_turn_rows import Writer


def _chunk(text: str) -> Chunk:
    return Chunk(
        conversation_id="c", at=1, event_id=new_id(), turn_id="t", kind="answer", text=text
    )


def test_chunks_are_passed_over_as_bytes_and_everything_else_is_decoded() -> None:
    projector = Projector(cast(Any, None), None)
    written = encode(_chunk("hello"))
    assert written.startswith(CHUNK_PREFIX), "msgspec writes the tag first; the shortcut needs it"
    title = Title(conversation_id="c", at=1, event_id=new_id(), title="x", source="user")
    # the same chunk with its keys in another order: not recognised, so decoded (and ignored)
    reordered = json.dumps({**json.loads(written), "type": "chunk"}, sort_keys=True).encode()
    lookalike = b'{"type":"chunky","conversation_id":"c"}'  # a newer type, not a chunk
    batch = [
        RawEvent(seq=1, data=written),
        RawEvent(seq=2, data=encode(title)),
        RawEvent(seq=3, data=reordered),
        RawEvent(seq=4, data=lookalike),
    ]
    decoded = projector.decode(batch)
    assert [s.seq for s in decoded] == [2, 3, 4]
    assert decoded[0].event == title and isinstance(decoded[1].event, Chunk)
    assert isinstance(decoded[2].event, Unreadable) and decoded[2].event.type == "chunky"


def test_a_projection_with_a_chunk_handler_gets_its_chunks_decoded() -> None:
    wants_chunks = Projection("typing_indicator", tables=(), ddl="")

    @wants_chunks.on(Chunk)
    def on_chunk(seq: int, event: Chunk) -> list[Write]:
        raise AssertionError("not called here")

    projector = Projector(cast(Any, None), None, projection=wants_chunks)
    (decoded,) = projector.decode([RawEvent(seq=1, data=encode(_chunk("hi")))])
    assert isinstance(decoded.event, Chunk) and decoded.event.text == "hi"


def test_an_event_type_gets_one_handler_per_projection() -> None:
    assert READ_MODELS.writes(1, _chunk("x")) == (), "the read models ignore chunks"
    with pytest.raises(ValueError, match="Title already has a handler"):

        @READ_MODELS.on(Title)
        def second(seq: int, event: Title) -> list[Write]:
            return []


def _titles(projection: Projection, conversations: str) -> list[StoredEvent]:
    """One Title per letter, in that order; each letter is a conversation. Each title
    writes two statements: UPDATE, then TOUCH (args: conversation, position)."""

    @projection.on(Title)
    def set_title(seq: int, event: Title) -> list[Write]:
        cid = event.conversation_id
        return [write("UPDATE", cid, seq), write("TOUCH", cid, seq)]

    return [
        StoredEvent(
            seq=i,
            event=Title(conversation_id=c, at=1, event_id=new_id(), title="t", source="user"),
        )
        for i, c in enumerate(conversations, 1)
    ]


def _steps(plan: list[Write]) -> list[tuple[str, str, int]]:
    return [(w.sql, *w.args) for w in plan]


def test_a_conversation_local_batch_puts_equal_statements_side_by_side() -> None:
    local = Projection("local", tables=(), ddl="", conversation_local=True)
    plan = Projector(cast(Any, None), None, projection=local).plan(_titles(local, "ABAC"))
    assert _steps(plan) == [
        ("UPDATE", "A", 1),
        ("UPDATE", "B", 2),
        ("UPDATE", "C", 4),
        ("TOUCH", "A", 1),
        ("TOUCH", "B", 2),
        ("TOUCH", "C", 4),
        ("UPDATE", "A", 3),
        ("TOUCH", "A", 3),
    ]


@given(st.text(alphabet="ABCDE", min_size=1, max_size=60))
def test_grouping_keeps_every_write_and_each_conversations_order(conversations: str) -> None:
    local = Projection("local", tables=(), ddl="", conversation_local=True)
    batch = _titles(local, conversations)
    plan = _steps(Projector(cast(Any, None), None, projection=local).plan(batch))
    titles = [(item.seq, item.event) for item in batch if isinstance(item.event, Title)]
    in_log_order = _steps([w for seq, title in titles for w in local.writes(seq, title)])
    assert sorted(plan) == sorted(in_log_order)
    for cid in set(conversations):
        assert [p for p in plan if p[1] == cid] == [p for p in in_log_order if p[1] == cid]
    # Grouped: after the first run every conversation's next write is the same kind,
    # so the runs are those of the longest conversation, plus at most one.
    runs = sum(1 for _ in itertools.groupby(plan, key=lambda p: p[0]))
    assert runs <= 2 * max(conversations.count(c) for c in set(conversations)) + 1


def test_a_projection_that_is_not_conversation_local_runs_in_log_order() -> None:
    shared = Projection("shared", tables=(), ddl="")
    plan = Projector(cast(Any, None), None, projection=shared).plan(_titles(shared, "ABA"))
    assert _steps(plan) == [
        ("UPDATE", "A", 1),
        ("TOUCH", "A", 1),
        ("UPDATE", "B", 2),
        ("TOUCH", "B", 2),
        ("UPDATE", "A", 3),
        ("TOUCH", "A", 3),
    ]


def test_billing_writes_shared_rows_so_it_runs_in_log_order() -> None:
    assert READ_MODELS.conversation_local and not BILLING.conversation_local


async def test_every_projection_has_a_projector_reading_through_a_connection_of_its_own(
    services: Services,
) -> None:
    assert set(services.projectors) == set(PROJECTIONS)
    assert services.projector is services.projectors[READ_MODELS.name]
    readers = [p._js._nc for p in services.projectors.values()]
    assert all(isinstance(reader, EntryClient) for reader in readers)
    assert len({id(reader) for reader in readers}) == len(readers)


async def test_a_checkpoint_moved_back_is_followed_again_from_there(
    api: SseClient, services: Services, nc: NatsClient, scratch: tuple[str, Any]
) -> None:
    _, pool = scratch
    js = nc.jetstream()
    start = await log_end(js)
    await read_models_from_log_end(pool, js)  # not the whole session's log, twice
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "before the reset [[tokens=3]]")
    head = await log_end(js)
    projector = Projector(js, pool)
    async with running(projector):
        await _wait_position(projector, head)
        # an operator empties the projection and sets its checkpoint back to its start
        await pool.execute("DELETE FROM messages; DELETE FROM conversations;")
        await pool.execute("UPDATE projection_checkpoints SET position = $1", start)
        await api.send_stream(cid, "after the reset [[tokens=3]]")
        head = await log_end(js)
        await _wait_position(projector, head)
    assert services.projector is not None
    await _wait_position(services.projector, head)
    assert await _rows(pool, [cid]) == await _rows(services.projector._pool, [cid])


@pytest.fixture
async def edge_on(stack: Servers) -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def start(schema: str, max_lag: int) -> str:
        config = EdgeConfig(
            nats_url=stack.nats_url,
            database_url=stack.database_url,
            redis_url=stack.redis_url,
            jwt_secret=SECRET,
            db_schema=schema,
            models=["demo"],
            max_projection_lag=max_lag,
        )
        server = TestServer(create_app(config), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_readyz_reports_the_projection_lag_and_is_unready_beyond_its_bound(
    services: Services, http: aiohttp.ClientSession, edge_on: Any, scratch: tuple[str, Any]
) -> None:
    async with http.get(services.edge_url + "/readyz") as response:
        live = await response.json()
    assert response.status == 200 and live["reasons"] == [], live
    assert isinstance(live["projection_lag"], int) and live["projection_lag"] >= 0

    # a schema no projector writes: its lag is the whole log
    schema, _ = scratch
    strict = await edge_on(schema, 1)
    async with http.get(strict + "/readyz") as response:
        behind = await response.json()
    assert response.status == 503 and behind["status"] == "not_ready", behind
    assert behind["projection_lag"] > 1 and behind["checks"]["postgres"] == "ok"
    assert behind["reasons"] == [
        f"the read models are {behind['projection_lag']} events behind the log (bound 1)"
    ]
    lenient = await edge_on(schema, 0)  # 0: report the lag, never unready for it
    async with http.get(lenient + "/readyz") as response:
        reported = await response.json()
    assert response.status == 200 and reported["projection_lag"] >= behind["projection_lag"]


# `messages` as the first release created it, before tool_calls and latency_ms.
_FIRST_MESSAGES = """
CREATE TABLE messages (
    id text PRIMARY KEY, conversation_id text NOT NULL, role text NOT NULL,
    content jsonb NOT NULL, status text NOT NULL, turn_id text, user_message_id text,
    parent_message_id text, version_group_id text NOT NULL, version_number integer NOT NULL,
    is_latest boolean NOT NULL, is_fork_origin boolean NOT NULL DEFAULT false, model text,
    model_version_id text, input_tokens integer, output_tokens integer,
    tokens_estimated boolean, stop_reason text, error_code text, error_message text,
    seq bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL
)
"""


async def test_a_schema_made_before_the_turn_columns_gets_them_on_start(stack: Servers) -> None:
    schema = f"old_{new_id().lower()}"
    db = await asyncpg.connect(stack.database_url)
    try:
        await db.execute(f'CREATE SCHEMA "{schema}"; SET search_path TO "{schema}";')
        await db.execute(_FIRST_MESSAGES)
        await db.execute(
            "INSERT INTO messages (id, conversation_id, role, content, status, version_group_id,"
            " version_number, is_latest, seq, created_at, updated_at)"
            " VALUES ('m', 'c', 'user', '[]', 'complete', 'm', 1, true, 1, now(), now())"
        )
        pool = await create_pool(stack.database_url, schema, max_size=1)
        await pool.close()
        row = await db.fetchrow("SELECT tool_calls::text, latency_ms FROM messages")
        assert row is not None and row["tool_calls"] == "[]" and row["latency_ms"] is None
        again = await create_pool(stack.database_url, schema, max_size=1)  # nothing to add
        await again.close()
    finally:
        await db.close()
        await drop_schema(stack.database_url, schema)


async def test_a_trickle_of_entries_shares_a_transaction(
    nc: NatsClient, event_log: EventLog, scratch: tuple[str, Any]
) -> None:
    _, pool = scratch
    await read_models_from_log_end(pool, nc.jetstream())
    cid = new_id()
    opening = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
    head = await event_log.append(cid, [opening], expected_seq=0)
    projector = Projector(nc.jetstream(), pool, linger_s=0.5)
    async with running(projector):
        await _wait_position(projector, head)
        before = projector.batches
        # six appends, each awaited (a turn's pace): without the linger, up to six batches
        for i in range(6):
            head = await event_log.append(
                cid,
                [Title(conversation_id=cid, at=1, event_id=new_id(), title=f"t{i}", source="user")],
                expected_seq=head,
            )
        await _wait_position(projector, head)
        assert projector.batches - before <= 2
    assert await pool.fetchval("SELECT title FROM conversations WHERE id = $1", cid) == "t5"


async def test_a_following_projector_needs_no_connection_beyond_the_one_holding_its_lock(
    nc: NatsClient, event_log: EventLog, stack: Servers
) -> None:
    """Batches are written on the lock's connection: no pool checkout and reset per batch."""
    schema = f"shell_{new_id().lower()}"
    pool = await create_pool(stack.database_url, schema, max_size=1)
    try:
        await read_models_from_log_end(pool, nc.jetstream())
        cid = new_id()
        opening = ConversationCreated(conversation_id=cid, at=1, event_id=new_id(), user_id="u")
        head = await event_log.append(cid, [opening], expected_seq=0)
        title = Title(conversation_id=cid, at=2, event_id=new_id(), title="held", source="user")
        head = await event_log.append(cid, [title], expected_seq=head)
        projector = Projector(nc.jetstream(), pool)
        async with running(projector):
            await _wait_position(projector, head)
        assert await pool.fetchval("SELECT title FROM conversations WHERE id = $1", cid) == "held"
    finally:
        await pool.close()
        await drop_schema(stack.database_url, schema)


async def test_the_edges_followers_read_through_an_entry_connection_of_their_own(
    stack: Servers,
) -> None:
    config = EdgeConfig(
        nats_url=stack.nats_url,
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        jwt_secret=SECRET,
        models=["demo"],
    )
    app = create_app(config)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        reader = app[HUBS].js._nc
        assert isinstance(reader, EntryClient) and reader is not app[NATS]
    finally:
        await server.close()


async def test_a_projector_stopped_while_postgres_reads_a_large_batch_slowly_stops_in_time(
    nc: NatsClient, event_log: EventLog, scratch: tuple[str, Any], user: str
) -> None:
    """asyncpg's executemany, cancelled while its writes wait for Postgres to read,
    swallows the cancel and waits for an answer that never comes, and the ROLLBACK
    after it waits past any further cancel: in CI a projector catching up on content
    parts outlived its role's deadline, and its process never exited. The cut batch's
    connection is now dropped; the batch is left to the next projector, whole."""
    _, pool = scratch
    js = nc.jetstream()
    await read_models_from_log_end(pool, js)
    writers = [Writer(event_log, user) for _ in range(40)]
    turns = []
    for writer in writers:
        await writer.create()
        question = writer.user_message(new_id(), 1, "a long answer, please")
        turns.append(new_id())
        head = await writer.append(question, writer.started(turns[-1], question.message_id))
    projector = Projector(js, pool)
    async with running(projector):
        await _wait_position(projector, head)
    # Postgres now takes 0.1 s a row: it reads the batch's 24 MB far slower than it comes
    await pool.execute(
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END $$;"
        " CREATE TRIGGER slow BEFORE UPDATE ON messages FOR EACH ROW EXECUTE FUNCTION slow_row()"
    )
    texts = [f"{i:02d}" + "x" * 600_000 for i in range(len(writers))]
    for writer, turn, text in zip(writers, turns, texts, strict=True):
        part = ContentPart(
            **writer._base(), turn_id=turn, index=0, block=0, role="assistant", text=text
        )
        head = await writer.append(part)
    projector = Projector(js, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(projector.run(stopping))
    try:
        async with asyncio.timeout(30):
            while projector._applying is None:  # noqa: ASYNC110 (no event says it)
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        began = asyncio.get_running_loop().time()
        stopping.set()
        await asyncio.wait({task}, timeout=15)
        took = asyncio.get_running_loop().time() - began
        assert task.done(), "the projector did not stop"
        task.result()
    finally:
        if not task.done():
            pool.terminate()  # what a cancel cannot end (the fault this test is about)
            await asyncio.wait({task}, timeout=5)
    assert took < 6, took  # 2 s for the cut, 1 more before the drop
    assert (
        await pool.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", READ_MODELS.name
        )
        < head
    )
    await pool.execute("DROP TRIGGER slow ON messages")
    projector = Projector(js, pool)
    async with running(projector):
        await _wait_position(projector, head)
    stored = await pool.fetch(
        "SELECT content->0->>'content' AS text FROM messages WHERE id = ANY($1::text[])", turns
    )
    assert sorted(row["text"] for row in stored) == texts
