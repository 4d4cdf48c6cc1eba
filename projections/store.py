"""Reads of the projected rows, for the edge. Read-only: only the projector writes."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec

from projections.catalog import PROJECTIONS
from projections.poison import LOG_BEHIND

T = TypeVar("T")

# The rule written out, not a parameter: only then can Postgres answer from the
# partial index on it (bookkeeping.sql), rather than read the whole table on
# every readiness probe.
STOPPED_SQL = (
    "SELECT projection, reason FROM projection_errors"
    f" WHERE rule = '{LOG_BEHIND}' ORDER BY projection, seq"
)
_STOPPED_ONE_SQL = (
    "SELECT reason FROM projection_errors"
    f" WHERE projection = $1 AND rule = '{LOG_BEHIND}' ORDER BY seq LIMIT 1"
)


async def recorded_stop(conn: Any, projection: str) -> str | None:
    """Why `projection` stopped for a log that ends before its checkpoint, as its
    projector recorded it (projections.projector `_check_log`); None when it did not.
    `conn`: a connection or a pool."""
    reason = await conn.fetchval(_STOPPED_ONE_SQL, projection)
    return None if reason is None else str(reason)


# How long the edge waits for Postgres before answering 503: a server that hangs
# (stopped, swapping, a full disk) answers nothing and breaks no connection.
QUERY_TIMEOUT_S = 5.0


async def bounded(work: Awaitable[T], within_s: float) -> T:
    """`work`'s result, or TimeoutError after `within_s`, whatever `work` does then.

    `asyncio.timeout` is not enough against a Postgres that hangs: the query it
    cancels hands its connection back to asyncpg's pool, which first waits,
    without a limit and shielded from cancellation, for the server to confirm
    the cancel. Here the caller goes on at the deadline and the work is left to
    end by itself (when the server answers, or its connection breaks)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task}, timeout=within_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        task.cancel()
        task.add_done_callback(_retrieved)
        raise TimeoutError(f"no answer within {within_s:g} s")
    return task.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # seen: an abandoned query's error is not worth a warning


class BoundedQueries:
    """A pool's read queries, each answered or given up (TimeoutError) in time."""

    def __init__(self, pool: Any, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = await bounded(self.pool.fetch(query, *args), self.timeout_s)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await bounded(self.pool.fetchrow(query, *args), self.timeout_s)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await bounded(self.pool.fetchval(query, *args), self.timeout_s)


class ConversationRow(msgspec.Struct, frozen=True):
    id: str
    user_id: str
    project_id: str | None
    title: str
    model: str | None
    message_count: int
    token_usage_total: int
    created_at: dt.datetime
    updated_at: dt.datetime
    last_seq: int


class MessageFields(msgspec.Struct, frozen=True):
    """A message's columns but its times: `MessageRow` adds them as Postgres holds
    them, the edge's answer (api.responses.MessageView) as it says times."""

    id: str
    conversation_id: str
    role: str
    content: list[dict[str, Any]]
    status: str
    turn_id: str | None
    parent_message_id: str | None
    version_group_id: str
    version_number: int
    is_latest: bool
    is_fork_origin: bool
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    stop_reason: str | None
    error_code: str | None
    error_message: str | None
    seq: int
    # the turn's tool cards, in call order: {id, name, arguments, raw_arguments?,
    # result, error, duration_ms}; duration_ms None while the call is pending
    tool_calls: list[dict[str, Any]]
    latency_ms: int | None  # the turn's start to its end, from event timestamps


class MessageRow(MessageFields, frozen=True):
    created_at: dt.datetime
    updated_at: dt.datetime


class ProjectRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    created_by: str
    created_at: dt.datetime
    members: list[str]


class AccountRow(msgspec.Struct, frozen=True):
    account: str
    kind: str
    owner: str
    granted: int
    charged: int
    reserved: int
    updated_at: dt.datetime

    @property
    def balance(self) -> int:
        return self.granted - self.charged


class LedgerRow(msgspec.Struct, frozen=True):
    turn_id: str
    account: str
    conversation_id: str
    project_id: str | None
    user_id: str
    input_tokens: int
    output_tokens: int
    input_price: float
    output_price: float
    tokens_estimated: bool
    cost: int
    reserved: int
    debt: int
    turn_end: str
    charged_at: dt.datetime
    seq: int


class LedgerFilter(msgspec.Struct, frozen=True):
    project: str | None = None
    user: str | None = None
    conversation: str | None = None
    account: str | None = None


class ProjectionErrorRow(msgspec.Struct, frozen=True):
    """An event a projection could not apply as written (see projections.projector)."""

    projection: str
    seq: int
    conversation_id: str | None
    event_type: str
    rule: str
    reason: str
    raw: str | None


_CONVERSATION_COLUMNS = (
    "id, user_id, project_id, title, model, message_count, token_usage_total,"
    " created_at, updated_at, last_seq"
)
_MESSAGE_COLUMNS = (
    "id, conversation_id, role, content::text AS content, status, turn_id, parent_message_id,"
    " version_group_id, version_number, is_latest, is_fork_origin, model, input_tokens,"
    " output_tokens, stop_reason, error_code, error_message, seq, created_at, updated_at,"
    " tool_calls::text AS tool_calls, latency_ms"
)


def _conversations_of(after: str) -> str:
    """A user's conversations and their projects', latest first (`after`: a condition
    on (updated_at, id) or nothing), each page read from the indexes a page at a time.

    The user's own and each of their projects' are read apart, each the first $2 of
    its index (conversations_by_user, conversations_by_project), and the few that
    gives merged: one condition "user_id = $1 OR project_id IN (...)" can use
    neither index in order, and read and sorted every conversation of the table for
    every page. A user's own conversation in their project comes from both: UNION
    keeps it once. Two statements, with and without the cursor, so that neither
    plan carries a condition that is known only when the statement runs."""
    return (
        f"SELECT {_CONVERSATION_COLUMNS} FROM ("
        f"(SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1{after}"
        " ORDER BY updated_at DESC, id DESC LIMIT $2)"
        f" UNION (SELECT c.* FROM project_members m CROSS JOIN LATERAL"
        f" (SELECT {_CONVERSATION_COLUMNS} FROM conversations"
        f" WHERE project_id = m.project_id{after}"
        " ORDER BY updated_at DESC, id DESC LIMIT $2) AS c WHERE m.user_id = $1)"
        ") AS mine ORDER BY updated_at DESC, id DESC LIMIT $2"
    )


_CONVERSATIONS_OF = _conversations_of("")
_CONVERSATIONS_OF_BEFORE = _conversations_of(" AND (updated_at, id) < ($3, $4)")


class ReadStore:
    def __init__(
        self, pool: Any, *, projection: str = "read_models", timeout_s: float = QUERY_TIMEOUT_S
    ) -> None:
        self.queries = BoundedQueries(pool, timeout_s)
        self._pool = self.queries
        self._projection = projection
        # Every projection's position as `positions` (or, the read models', `position`)
        # read it last: while Postgres is away a checkpoint cannot move (it moves only
        # by a commit there), so the lag is still known from it.
        self.last_positions: dict[str, int] = {}

    @property
    def last_position(self) -> int | None:
        """The read models' position last read; None before the first read."""
        return self.last_positions.get(self._projection)

    async def conversation(self, conversation_id: str) -> ConversationRow | None:
        row = await self._pool.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1", conversation_id
        )
        return None if row is None else ConversationRow(**dict(row))

    async def conversations_of(
        self,
        user_id: str,
        *,
        limit: int = 100,
        before: tuple[dt.datetime, str] | None = None,
    ) -> list[ConversationRow]:
        """The user's own conversations and those of the projects they belong to, the
        latest activity first; `before`: only those after (updated_at, id) in that order."""
        if before is None:
            rows = await self._pool.fetch(_CONVERSATIONS_OF, user_id, limit)
        else:
            rows = await self._pool.fetch(_CONVERSATIONS_OF_BEFORE, user_id, limit, *before)
        return [ConversationRow(**dict(r)) for r in rows]

    async def messages(
        self,
        conversation_id: str,
        *,
        all_versions: bool = False,
        last: int | None = None,
        before: int | None = None,
    ) -> list[MessageRow]:
        """The conversation's rows in the log's order (`seq`: each row is made by one
        event, so no two share it); `before`: only those made before that position;
        `last`: only the last so many of them. A row is never made before one already
        there, so a page read later begins where the one read earlier ended."""
        where = "conversation_id = $1" + ("" if all_versions else " AND is_latest")
        args: list[object] = [conversation_id]
        if before is not None:
            args.append(before)
            where += f" AND seq < ${len(args)}"
        if last is None:
            query = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY seq"
        else:
            # backwards along messages_by_conversation, for the last rows only
            args.append(last)
            query = (
                f"SELECT * FROM (SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where}"
                f" ORDER BY seq DESC LIMIT ${len(args)}) AS page ORDER BY seq"
            )
        rows = await self._pool.fetch(query, *args)
        return [
            MessageRow(
                **{
                    **dict(r),
                    "content": msgspec.json.decode(r["content"]),
                    "tool_calls": msgspec.json.decode(r["tool_calls"]),
                }
            )
            for r in rows
        ]

    async def projects_of(self, user_id: str) -> list[ProjectRow]:
        rows = await self._pool.fetch(
            "SELECT p.id, p.name, p.created_by, p.created_at,"
            " array_agg(m.user_id ORDER BY m.added_at, m.user_id) AS members"
            " FROM projects p JOIN project_members m ON m.project_id = p.id"
            " WHERE p.id IN (SELECT project_id FROM project_members WHERE user_id = $1)"
            " GROUP BY p.id ORDER BY p.created_at, p.id",
            user_id,
        )
        return [ProjectRow(**{**dict(r), "members": list(r["members"])}) for r in rows]

    async def grant_seq(self, event_id: str) -> int | None:
        """The log position of the grant with this event id, if the read model has it."""
        seq = await self._pool.fetchval(
            "SELECT seq FROM credit_grants WHERE event_id = $1", event_id
        )
        return None if seq is None else int(seq)

    async def account(self, account: str) -> AccountRow | None:
        row = await self._pool.fetchrow(
            "SELECT account, kind, owner, granted, charged, reserved, updated_at"
            " FROM accounts WHERE account = $1",
            account,
        )
        return None if row is None else AccountRow(**dict(row))

    async def ledger(
        self, where: LedgerFilter, *, limit: int = 500, after: int = 0
    ) -> list[LedgerRow]:
        """The rows `where` selects, in the log's order, from the one after `after`."""
        clauses: list[str] = ["seq > $1"]
        args: list[object] = [after]
        for column, value in (
            ("project_id", where.project),
            ("user_id", where.user),
            ("conversation_id", where.conversation),
            ("account", where.account),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        args.append(limit)
        rows = await self._pool.fetch(
            "SELECT turn_id, account, conversation_id, project_id, user_id, input_tokens,"
            " output_tokens, input_price, output_price, tokens_estimated, cost, reserved, debt,"
            " turn_end, charged_at, seq FROM ledger"
            + " WHERE "
            + " AND ".join(clauses)
            + f" ORDER BY seq LIMIT ${len(args)}",
            *args,
        )
        return [LedgerRow(**dict(r)) for r in rows]

    async def projection_errors(self, *, limit: int = 100) -> list[ProjectionErrorRow]:
        """The latest `limit` recorded, in log order."""
        rows = await self._pool.fetch(
            "SELECT * FROM (SELECT projection, seq, conversation_id, event_type, rule, reason,"
            " raw FROM projection_errors ORDER BY seq DESC, projection LIMIT $1) AS latest"
            " ORDER BY seq, projection",
            limit,
        )
        return [
            ProjectionErrorRow(
                **{
                    **dict(r),
                    "raw": None if r["raw"] is None else r["raw"].decode("utf-8", "replace"),
                }
            )
            for r in rows
        ]

    async def projection_error_count(self) -> int:
        value = await self._pool.fetchval("SELECT count(*) FROM projection_errors")
        return int(value or 0)

    async def stopped_projections(self) -> dict[str, str]:
        """Why each projection that stopped for a log that ends before its checkpoint
        did, by name (projections.projector `_check_log`); {} when none did."""
        rows = await self._pool.fetch(STOPPED_SQL)
        stopped: dict[str, str] = {}
        for row in rows:
            stopped.setdefault(str(row["projection"]), str(row["reason"]))
        return stopped

    async def positions(self) -> dict[str, int]:
        """Every projection's position by name (the read models' and the billing
        projection's: each has its checkpoint; 0 before its first batch), kept in
        `last_positions`."""
        rows = await self._pool.fetch("SELECT name, position FROM projection_checkpoints")
        found = {str(row["name"]): int(row["position"] or 0) for row in rows}
        names = [*PROJECTIONS, self._projection]
        self.last_positions = {name: found.get(name, 0) for name in names}
        return self.last_positions

    async def position(self) -> int:
        value = await self._pool.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", self._projection
        )
        self.last_positions[self._projection] = position = int(value or 0)
        return position
