"""Rebuilding a projection from the log while parley keeps serving: build beside, then swap.

Readers must never see a half-built projection, and the live projector must
go on afterwards without losing or doubling an event. So:

1. **One at a time.** A rebuild holds the session advisory lock
   `parley-rebuild/<schema>/<projection>` throughout; a second one is refused.
2. **Build beside.** A side schema, `<schema>_rebuild_<projection>` (dropped
   first if a crashed rebuild left it), gets the bookkeeping tables and the
   projection's own tables (its DDL file), nothing else: configuration tables
   (`config.sql`) exist only in the live schema and are never touched. An
   ordinary `Projector` on the side schema follows the log from the start up
   to its head; its advisory lock is keyed by schema, so it does not wait for
   the live one, which keeps projecting meanwhile. A long log is first read by
   worker processes side by side (projections/prefetch.py: reading, not
   Postgres, is what a rebuild waits on) and applied range by range in order.
3. **Swap, in one transaction on the live schema.**
   - lock the live checkpoint row (`FOR UPDATE`): the live projector's next
     batch waits on it, and the row says how far the live tables are (L); an L
     past the log's end (the log was restored from an older copy, or made
     again: the live rows are of another log) is taken as the log's end;
   - bring the side up to L inside this transaction (events that arrived since
     the side stopped; same projector code, savepoints, poison rule);
   - move the live tables out to `<schema>_retired_<projection>` and the side's
     in under the live names (`ALTER TABLE ... SET SCHEMA`; same names, same
     columns), and replace the projection's rows of `projection_errors` and
     `projection_checkpoints` with the side's;
   - commit. A reader's statement waits on the moved tables' locks and, after
     the commit, resolves the names again: it sees the old tables or the new
     ones, never a mix.
4. **The live projector goes on.** Its waiting batch reads the checkpoint the
   swap wrote (L, or more if the side had gone further: it then skips what is
   in), and its statements resolve `messages` & co to the new tables: Postgres
   re-plans a prepared statement whose table moved. Its advisory lock is keyed
   by schema and projection name, not by table, so it stays the leader.
5. The retired tables and the side schema are dropped.

`projection_errors` is part of the projection: the rebuilt rows replace the
old, so events a newer rule can now apply disappear from it.

What may not enter this module: what an event does to rows (the handlers),
how the log is read (the feed, the projector), and anything about tables that
no projection owns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
from nats.js import JetStreamContext

from events.broker import NatsSecurity
from projections.db import check_schema_name, connect_first, ensure_schema
from projections.feed import LogFeed, log_end
from projections.prefetch import prefetch
from projections.projector import Projector
from projections.registry import Projection

log = logging.getLogger(__name__)

# A swap that cannot lock the live tables within this (a long read holds them)
# gives up and tries again, rather than queue every reader behind it.
_SWAP_LOCK_TIMEOUT = "2s"
_SWAP_ATTEMPTS = 5


class RebuildError(Exception):
    """A rebuild that cannot start or finish; the message says why. The live
    projection is untouched."""


class RebuildReport(msgspec.Struct, frozen=True):
    projection: str
    position: int  # the log position the swapped-in projection had reached
    entries: int  # log entries read
    turns: int  # `started` events among them
    errors: int  # rows of projection_errors the rebuilt projection has
    build_s: float  # following the log into the side schema
    swap_s: float  # the swap transaction, catch-up included
    seconds: float  # the whole rebuild
    entries_per_s: float
    turns_per_s: float
    counts: dict[str, int]  # entries read, by type


def default_workers() -> int:
    """Reader processes for a long rebuild: one per core, up to four (the NATS server
    and Postgres want their share of the machine too)."""
    return max(1, min(4, os.cpu_count() or 1))


def side_schema(schema: str, purpose: str, projection: str) -> str:
    """`<schema>_<purpose>_<projection>`, shortened with a hash if Postgres would not take it."""
    name = f"{schema}_{purpose}_{projection}"
    if len(name) > 63:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{schema[: 63 - len(purpose) - 12]}_{purpose}_{digest}"
    return check_schema_name(name)


async def rebuild(
    js: JetStreamContext,
    database_url: str,
    schema: str,
    projection: Projection,
    *,
    nats_url: str | None = None,
    nats_security: NatsSecurity | None = None,
    workers: int = 2,
    parallel_from: int = 200_000,
    batch_max: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Rebuild `projection` in `schema` from the whole log, swap it in, and report.

    With `nats_url`, a log of `parallel_from` entries or more is first read by
    `workers` processes side by side (projections/prefetch.py); the projector
    then follows the rest as usual.
    """
    schema = check_schema_name(schema)
    side = side_schema(schema, "rebuild", projection.name)
    retired = side_schema(schema, "retired", projection.name)
    began = time.perf_counter()
    lock = await connect_first(database_url)
    try:
        key = f"parley-rebuild/{schema}/{projection.name}"
        if not await lock.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            raise RebuildError(f"a rebuild of {projection.name} in {schema} is already running")
        await lock.execute(f'DROP SCHEMA IF EXISTS "{side}" CASCADE')
        await lock.execute(f'DROP SCHEMA IF EXISTS "{retired}" CASCADE')
        await ensure_schema(lock, schema)  # the live side exists even if nothing ran yet
        await ensure_schema(lock, side, projections=[projection], config=False)
        pool = await asyncpg.create_pool(
            database_url, min_size=1, max_size=3, server_settings={"search_path": side}
        )
        try:
            projector = Projector(js, pool, projection=projection, batch_max=batch_max)
            if nats_url is not None and workers > 1:
                await _prefetched(
                    js, projector, nats_url, nats_security, workers, parallel_from, progress
                )
            await _build(js, projector, progress)
            built = time.perf_counter()
            await _swap(js, lock, projector, schema, side, retired)
            swapped = time.perf_counter()
        finally:
            await pool.close()
        errors = await lock.fetchval(
            f'SELECT count(*) FROM "{schema}".projection_errors WHERE projection = $1',
            projection.name,
        )
        await lock.execute(f'DROP SCHEMA IF EXISTS "{retired}" CASCADE')
        await lock.execute(f'DROP SCHEMA IF EXISTS "{side}" CASCADE')
    finally:
        await lock.close()  # releases the advisory lock with the session
    seconds = swapped - began
    entries = sum(projector.counts.values())
    turns = projector.counts.get("started", 0)
    return RebuildReport(
        projection=projection.name,
        position=projector.position,
        entries=entries,
        turns=turns,
        errors=int(errors),
        build_s=round(built - began, 3),
        swap_s=round(swapped - built, 3),
        seconds=round(seconds, 3),
        entries_per_s=round(entries / seconds, 1) if seconds else 0.0,
        turns_per_s=round(turns / seconds, 1) if seconds else 0.0,
        counts=dict(projector.counts),
    )


async def _prefetched(
    js: JetStreamContext,
    projector: Projector,
    nats_url: str,
    nats_security: NatsSecurity | None,
    workers: int,
    parallel_from: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Apply the log up to its current head as worker processes read it, range by range."""
    projector.position = await projector.load_position()
    head = await log_end(js)
    if head - projector.position < parallel_from:
        return  # not worth starting processes for
    ranges = prefetch(
        nats_url,
        projector.position,
        head,
        workers=workers,
        skip_prefix=projector.skip_prefix,
        security=nats_security,
    )
    async for read in ranges:
        projector.counts["chunk"] += read.skipped
        # a batch at a time, as the projector follows the log: decoded whole, a range
        # of a log without chunks was every one of its events at once, and their writes
        kept, step = read.kept, projector.batch_max
        for start in range(0, max(1, len(kept)), step):
            batch = kept[start : start + step]
            last = start + step >= len(kept)
            await projector.apply(
                projector.decode(batch), through=read.hi if last else batch[-1].seq
            )
        if progress is not None:
            progress(projector.position, head)


async def _build(
    js: JetStreamContext, projector: Projector, progress: Callable[[int, int], None] | None
) -> None:
    """Follow the log into the side schema until the projector has reached the head."""
    stopping = asyncio.Event()
    task = asyncio.create_task(projector.run(stopping), name=f"rebuild-{projector.name}")
    try:
        target = await log_end(js)
        while True:
            await _reached(projector, target, timeout_s=2.0)
            if task.done():
                await task  # it failed: say why
                raise RebuildError("the rebuild's projector stopped before reaching the head")
            if progress is not None:
                progress(projector.position, target)
            if projector.position >= target:
                # Close enough: the swap brings the side up to the live position.
                return
            target = max(target, await log_end(js))
    finally:
        stopping.set()
        await task


async def _reached(projector: Projector, target: int, *, timeout_s: float) -> None:
    """Until the projector's position reaches `target`, or `timeout_s` passes."""
    async with projector.applied:
        try:
            async with asyncio.timeout(timeout_s):
                await projector.applied.wait_for(lambda: projector.position >= target)
        except TimeoutError:
            pass


async def _swap(
    js: JetStreamContext, conn: Any, projector: Projector, schema: str, side: str, retired: str
) -> None:
    for attempt in range(1, _SWAP_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await _swap_once(js, conn, projector, schema, side, retired)
            return
        except asyncpg.exceptions.LockNotAvailableError:
            log.warning(
                "swap could not lock the live tables; trying again", extra={"attempt": attempt}
            )
    raise RebuildError(f"the live tables stayed locked through {_SWAP_ATTEMPTS} attempts")


async def _swap_once(
    js: JetStreamContext, conn: Any, projector: Projector, schema: str, side: str, retired: str
) -> None:
    name = projector.name
    await conn.execute(f"SET LOCAL lock_timeout = '{_SWAP_LOCK_TIMEOUT}'")
    # ensure_schema of a process starting now must not race the moves
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"parley-ddl-{schema}")
    await conn.execute(
        f'INSERT INTO "{schema}".projection_checkpoints (name, position) VALUES ($1, 0)'
        " ON CONFLICT (name) DO NOTHING",
        name,
    )
    live: int = await conn.fetchval(
        f'SELECT position FROM "{schema}".projection_checkpoints WHERE name = $1 FOR UPDATE', name
    )
    # From here the live projector waits; bring the side up to where it stopped.
    end = await log_end(js)
    if live > end:
        # The live rows were projected from another log (this one was restored from
        # an older copy, or deleted and made again): they are not a position to
        # reach but what this rebuild replaces. The side has this log to its end.
        log.warning(
            "the live checkpoint is past the end of the log; replacing the projection",
            extra={"projection": name, "live": live, "log_end": end},
        )
        live = end
    await conn.execute(f'SET LOCAL search_path TO "{side}"')
    position = await _catch_up(js, conn, projector, live)
    await conn.execute(f'CREATE SCHEMA "{retired}"')
    for table in projector.projection.tables:
        await conn.execute(f'ALTER TABLE IF EXISTS "{schema}"."{table}" SET SCHEMA "{retired}"')
    for table in projector.projection.tables:
        await conn.execute(f'ALTER TABLE "{side}"."{table}" SET SCHEMA "{schema}"')
    await conn.execute(f'DELETE FROM "{schema}".projection_errors WHERE projection = $1', name)
    await conn.execute(
        f'INSERT INTO "{schema}".projection_errors SELECT * FROM "{side}".projection_errors'
        " WHERE projection = $1",
        name,
    )
    await conn.execute(
        f'UPDATE "{schema}".projection_checkpoints SET position = $2 WHERE name = $1',
        name,
        position,
    )
    log.info(
        "rebuilt projection swapped in",
        extra={"projection": name, "schema": schema, "position": position, "live_was": live},
    )


async def _catch_up(js: JetStreamContext, conn: Any, projector: Projector, target: int) -> int:
    """Apply the log after the side's position through `target`, on `conn`'s transaction."""
    position = projector.position
    if position >= target:
        return position
    feed = LogFeed(js, position, window=1000)
    try:
        while position < target:
            raws = await feed.next_batch(1000, wait_s=5.0)
            if not raws:
                # the live projector has applied `target`, so the log holds it
                raise RebuildError(f"the log did not deliver up to {target} (at {position})")
            batch = [raw for raw in raws if raw.seq <= target]
            # entries past the target are the live projector's, after the swap
            through = target if len(batch) < len(raws) else batch[-1].seq
            position = await projector.apply_on(conn, projector.decode(batch), through=through)
            projector.position = position
    finally:
        await feed.close()
    return position
