"""The edge's reads of the read models stay a page's work as the tables grow.

Rows are written straight into a scratch schema (many users, a user with
thousands of conversations, projects), analysed, and each read of the store is
run as the edge runs it, with its plan: how many rows Postgres read from a table
to answer a page must not grow with the table.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from events.ids import new_id
from parley.services import Servers
from projections.db import create_pool, drop_schema
from projections.store import LedgerFilter, ReadStore

HEAVY = "heavy"  # a user with thousands of conversations of their own
PROJECT = "big-project"
OWN, IN_PROJECT, OTHERS = 3_000, 1_500, 15_000


class Explaining:
    """A pool whose every read is first run under EXPLAIN ANALYZE, the plan kept."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.plans: list[dict[str, Any]] = []

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        plan = await self.pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
        self.plans.append(json.loads(plan)[0]["Plan"])
        rows: list[Any] = await self.pool.fetch(query, *args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self.pool.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.pool.fetchval(query, *args)


def rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the plan's scans of `table` looked at: those they gave and those they dropped."""
    own = 0
    if plan.get("Relation Name") == table:
        per_loop = (
            plan["Actual Rows"]
            + plan.get("Rows Removed by Filter", 0)
            + plan.get("Rows Removed by Index Recheck", 0)
        )
        own = round(per_loop * plan["Actual Loops"])
    return own + sum(rows_read(child, table) for child in plan.get("Plans", []))


@pytest.fixture
async def big(stack: Servers) -> AsyncIterator[Any]:
    schema = f"plans_{new_id().lower()}"
    pool = await create_pool(stack.database_url, schema, max_size=2)
    try:
        await pool.execute(
            "INSERT INTO projects (id, name, created_by, created_at, seq)"
            " VALUES ($1, 'big', 'someone', now(), 1)",
            PROJECT,
        )
        await pool.execute(
            "INSERT INTO project_members (project_id, user_id, added_at)"
            " SELECT $1, u, now() FROM unnest(ARRAY[$2, 'someone', 'another']) AS u",
            PROJECT,
            HEAVY,
        )
        # the heavy user's own, the project's (by its other members), everyone else's;
        # one minute apart, so the order is known
        await pool.execute(
            "INSERT INTO conversations (id, user_id, project_id, created_at, updated_at, last_seq)"
            " SELECT 'c' || lpad(i::text, 6, '0'),"
            f" CASE WHEN i <= {OWN} THEN $1 WHEN i <= {OWN + IN_PROJECT} THEN 'someone'"
            "  ELSE 'u' || (i % 2000)::text END,"
            f" CASE WHEN i > {OWN} AND i <= {OWN + IN_PROJECT} THEN $2 END,"
            f" t, t, i FROM generate_series(1, {OWN + IN_PROJECT + OTHERS}) AS i,"
            " LATERAL (SELECT timestamptz '2026-01-01' + i * interval '1 minute' AS t) AS at",
            HEAVY,
            PROJECT,
        )
        await pool.execute("ANALYZE")
        yield pool
    finally:
        await pool.close()
        await drop_schema(stack.database_url, schema)


async def test_a_page_of_conversations_reads_a_page_not_every_conversation(big: Any) -> None:
    """The list read and sorted every conversation of the table for each page (a user
    or a project condition joined by OR uses neither index in order): 50,000
    conversations took 25 ms a page for anyone, and more as the table grew."""
    explaining = Explaining(big)
    store = ReadStore(explaining)
    limit = 50
    seen: list[str] = []
    before: tuple[dt.datetime, str] | None = None
    for _ in range(3):
        page = await store.conversations_of(HEAVY, limit=limit + 1, before=before)
        seen += [row.id for row in page[:limit]]
        before = (page[limit - 1].updated_at, page[limit - 1].id)
    # the heavy user's and the project's, latest first, each once, across the pages
    expected = [f"c{i:06d}" for i in range(OWN + IN_PROJECT, OWN + IN_PROJECT - 3 * limit, -1)]
    assert seen == expected
    for plan in explaining.plans:
        read = rows_read(plan, "conversations")
        assert read <= 4 * (limit + 1), f"a page read {read} conversations"


async def test_the_last_page_of_conversations_reads_a_page(big: Any) -> None:
    explaining = Explaining(big)
    store = ReadStore(explaining)
    last = await big.fetchrow(
        "SELECT updated_at, id FROM conversations WHERE id = $1", f"c{(OWN // 100):06d}"
    )
    page = await store.conversations_of(HEAVY, limit=101, before=(last[0], last[1]))
    assert [row.id for row in page] == [f"c{i:06d}" for i in range(OWN // 100 - 1, 0, -1)]
    read = rows_read(explaining.plans[0], "conversations")
    assert read <= 4 * 101, f"the last page read {read} conversations"


async def test_a_user_of_no_project_reads_only_their_own(big: Any) -> None:
    explaining = Explaining(big)
    store = ReadStore(explaining)
    page = await store.conversations_of("u7", limit=21)
    assert page and all(row.user_id == "u7" for row in page)
    read = rows_read(explaining.plans[0], "conversations")
    assert read <= 4 * 21, f"a page read {read} conversations"


async def test_a_page_of_the_whole_ledger_reads_a_page(big: Any) -> None:
    """An admin's ledger with no filter, in log order: with no index on seq every
    page scanned and sorted the whole ledger (310,848 rows: 85-98 ms a page)."""
    await big.execute(
        "INSERT INTO ledger (turn_id, account, conversation_id, project_id, user_id,"
        " input_tokens, output_tokens, input_price, output_price, tokens_estimated, cost,"
        " reserved, debt, turn_end, charged_at, seq)"
        " SELECT 't' || i::text, 'user:u' || (i % 500)::text, 'c' || (i % 9000)::text, NULL,"
        " 'u' || (i % 500)::text, 10, 10, 3, 15, false, 180, 0, 0, 'done', now(), 10 * i"
        f" FROM generate_series(1, {OTHERS}) AS i"
    )
    await big.execute("ANALYZE ledger")
    explaining = Explaining(big)
    store = ReadStore(explaining)
    first = await store.ledger(LedgerFilter(), limit=101)
    last = await store.ledger(LedgerFilter(), limit=101, after=10 * (OTHERS - 50))
    assert [row.seq for row in first] == [10 * i for i in range(1, 102)]
    assert [row.seq for row in last] == [10 * i for i in range(OTHERS - 49, OTHERS + 1)]
    for plan in explaining.plans:
        read = rows_read(plan, "ledger")
        assert read <= 2 * 101, f"a page of the ledger read {read} rows"
