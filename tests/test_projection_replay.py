"""A checkpoint moved back under rows that are ahead of it: re-applying changes no row.

An operator's edit of `projection_checkpoints` (or any double delivery) makes
a projector apply again events whose effects are already in the rows. Every
handler's effect is keyed on the event's log position, so that must leave
both projections' tables exactly as they were. Rows restored from a backup
with their checkpoint are earlier too, consistently: there the events after
it must be applied again, to the same rows. The workload covers every handler
that moves a counter, a flag or a list: grants, reservations and charges;
regenerated and edited messages (version flips); tool cards; an answer too
large for one event (content parts); a refused turn; titles.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.client import Client as NatsClient

from events.codec import encode
from events.ids import new_id
from events.vocabulary import Chunk
from parley.services import Servers
from projections.billing import BILLING
from projections.db import create_pool, drop_schema
from projections.handlers import READ_MODELS
from projections.projector import Projector
from tests.conftest import token_for
from tests.sse import SseClient
from tests.test_poison import publish_raw
from tests.test_projection import _wait_position, running
from tests.test_projection_rebuild import _head, _project_workload, _workload

# Over NATS's max_payload: the answer's end carries its content in content_part events.
BULK = 2 * 1024 * 1024


_TABLES = (*READ_MODELS.tables, *BILLING.tables, "projection_errors")


async def _every_row(pool: Any) -> dict[str, list[dict[str, Any]]]:
    """All rows of both projections' tables, and their recorded errors."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table in _TABLES:
        # the first two columns are a key of every one of these tables
        out[table] = [dict(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
    return out


async def _back_up(pool: Any) -> None:
    """What a backup of the projections holds: their rows and checkpoints, as of one moment."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        for table in (*_TABLES, "projection_checkpoints"):
            await conn.execute(f"CREATE TABLE backup_{table} AS SELECT * FROM {table}")


async def _restore(pool: Any) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for table in (*_TABLES, "projection_checkpoints"):
            await conn.execute(f"DELETE FROM {table}")
            await conn.execute(f"INSERT INTO {table} SELECT * FROM backup_{table}")


async def _entry_that_writes_no_row(nc: NatsClient) -> int:
    """Append a chunk (no projection writes a row for one) of a conversation of its own;
    a projector notices a moved checkpoint at the batch that brings it."""
    chunk = Chunk(
        conversation_id=new_id(),
        at=time.time_ns(),
        event_id=new_id(),
        turn_id=new_id(),
        kind="answer",
        text=".",
    )
    return await publish_raw(nc, chunk.conversation_id, encode(chunk))


async def test_a_checkpoint_moved_back_under_newer_rows_changes_no_row_and_a_backup_catches_up(
    api: SseClient, stack: Servers, nc: NatsClient
) -> None:
    schema = f"replay_{new_id().lower()}"
    pool = await create_pool(stack.database_url, schema, max_size=4)
    read_models = Projector(nc.jetstream(), pool, projection=READ_MODELS)
    billing = Projector(nc.jetstream(), pool, projection=BILLING)

    async def caught_up(position: int) -> None:
        await _wait_position(read_models, position)
        await _wait_position(billing, position)

    try:
        async with running(read_models), running(billing):
            async with asyncio.timeout(30):  # their checkpoint rows are made
                await read_models.ready.wait()
                await billing.ready.wait()
            start = await _head(nc)
            await caught_up(start)
            await _back_up(pool)

            admin = SseClient(api.http, api.base_url, token_for("admin", admin=True))
            await _workload(api, nc)
            await _project_workload(api, admin)
            large = (await api.create_conversation())["id"]
            answer = await api.send_stream(large, f"a long one please [[bulk={BULK}]]")
            assert answer[-1].data == "ok", answer[-3:]
            unfunded = (await api.create_conversation(project_id=await _new_project(api)))["id"]
            refused = await api.send_stream(unfunded, "hello [[tokens=3]]")
            assert refused[-1].data == "billing_error", refused[-3:]
            await caught_up(await _head(nc))
            before = await _every_row(pool)
            _assert_the_workload_reached_every_handler(before)
            charges_read = billing.counts["turn_charged"]

            # An operator moves both checkpoints back to before the workload, under
            # rows that hold it all: each projector applies the workload again.
            await pool.execute("UPDATE projection_checkpoints SET position = $1", start)
            await caught_up(await _entry_that_writes_no_row(nc))
            assert billing.counts["turn_charged"] > charges_read, "the charges were read again"
            after = await _every_row(pool)
            assert after == before, "\n".join(_changes(before, after))

            # The backup from before the workload is restored, rows and checkpoints
            # together: what followed it is applied again, as the first time.
            await _restore(pool)
            assert (await _every_row(pool))["ledger"] != before["ledger"], "restored"
            await caught_up(await _entry_that_writes_no_row(nc))
            restored = await _every_row(pool)
            assert restored == before, "\n".join(_changes(before, restored))
    finally:
        await pool.close()
        await drop_schema(stack.database_url, schema)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What re-applying changed, row by row (named by their first two columns, a key),
    with long values cut: a large answer's content is megabytes."""
    out = []
    for table, rows in before.items():
        if len(rows) != len(after[table]):
            out.append(f"{table}: {len(rows)} rows before, {len(after[table])} after")
        for was, now in zip(rows, after[table], strict=False):
            changed = [
                f"{k} {_cut(v)} -> {_cut(now.get(k))}" for k, v in was.items() if v != now.get(k)
            ]
            if changed:
                out.append(f"{table} {list(was.values())[:2]}: {'; '.join(changed)}")
    return out


def _cut(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


async def _new_project(api: SseClient) -> str:
    status, body = await api.request("POST", "/v1/projects", json={"name": "Unfunded"})
    assert status == 201, body
    project: str = body["id"]
    return project


def _assert_the_workload_reached_every_handler(rows: dict[str, list[dict[str, Any]]]) -> None:
    messages = rows["messages"]
    assert any(not m["is_latest"] for m in messages), "versions were made"
    assert any(m["is_fork_origin"] for m in messages), "a branch was made"
    assert any(m["tool_calls"] for m in messages), "tools were called"
    assert any(m["status"] == "billing_error" for m in messages), "a turn was refused"
    assert any(len(str(m["content"])) > BULK for m in messages), "a large answer was projected"
    assert any(c["token_usage_total"] for c in rows["conversations"])
    assert rows["credit_grants"] and rows["ledger"], "credits were granted and charged"
    assert any(a["reserved"] == 0 and a["charged"] for a in rows["accounts"]), (
        "a charge released its reservation"
    )
