"""`parley audit billing [--project ID] [--since T] [--json]`: the command around
projections.audit (what is recomputed and compared is documented there).

The log is read up to the billing projection's position at the start, so the
ledger and the balances are compared with the log exactly as far as they were
built from it: a projection that lags is not a mismatch; one that is wrong is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec
from nats.js import JetStreamContext

from events.broker import connect
from events.codec import decode_entry
from events.log import EventLog
from events.streams import require_jetstream
from events.subjects import account_of, valid_id
from parley.commands import CliError
from parley.config import load_settings
from parley.services import resolve_servers
from projections.audit import (
    ACCOUNT_COLUMNS,
    GRANT_COLUMNS,
    LEDGER_COLUMNS,
    RESERVATION_COLUMNS,
    AccountRow,
    Book,
    GrantRow,
    LedgerRow,
    Mismatch,
    NotRead,
    ReservationRow,
    Rows,
    Scope,
    check,
    fold_book,
    parse_since,
)
from projections.billing import BILLING
from projections.db import create_pool
from projections.feed import LogBehind, log_end
from projections.poison import log_behind_reason
from projections.store import recorded_stop

# Chunks are most of the log and say nothing of money: recognised by their first
# bytes (msgspec writes the tag first), never decoded.
_CHUNK = b'{"type":"chunk"'
# rows of the billing projection read per round trip
_PAGE = 5000


class Summary(msgspec.Struct):
    position: int
    entries: int
    accounts: int
    billed_turns: int
    charges: int
    charged_micro_credits: int
    mismatches: list[Mismatch]
    # entries it could not read, apart from accounts' (those are mismatches)
    not_read: list[NotRead] = []
    # positions up to `position` the log no longer holds (a retention limit, a purge):
    # what they held is in the ledger but cannot be checked against the log
    removed: int = 0
    # charges for turns of deleted conversations (their log erased): held to one
    # charge per turn, the ledger and the balances, but their cost not recomputed
    erased_charges: int = 0


async def audit_billing(js: JetStreamContext, pool: Any, scope: Scope) -> Summary:
    """Recompute the billing from the log up to the billing projection's position and
    compare it with the ledger, the accounts, the grants and the reservations
    (`pool`: the projection's schema)."""
    position, seen = await read_projection(pool)
    # Read after the position: the log's end only grows, so a healthy one reaches it.
    end = await log_end(js)
    stopped = await recorded_stop(pool, BILLING.name)
    if stopped is not None or position > end:
        # The ledger was projected from another log (this one restored from an older
        # copy, or deleted and made again): there is nothing to check it against,
        # and what this log lacks is not removed entries.
        raise LogBehind(stopped or log_behind_reason(BILLING.name, position, end))
    book = Book()
    entries = 0
    async for batch in EventLog(js).scan():
        for entry in batch:
            if entry.seq > position:
                break
            entries += 1
            if not entry.data.startswith(_CHUNK):
                fold_book(book, decode_entry(entry.data), seq=entry.seq, subject=entry.subject)
        if batch[-1].seq >= position:
            break
    summary = summarise(book, seen, scope, position=position, entries=entries)
    summary.removed = position - entries  # every position up to it is an entry of the log
    return summary


def summarise(book: Book, seen: Rows, scope: Scope, *, position: int, entries: int) -> Summary:
    """The audit's result: the book's figures within `scope`, and every mismatch.

    Linear in the book: the turns in scope are a set made once (made anew for every
    charge, the audit of 300,000 billed turns took hours)."""
    in_scope = {t.turn_id for t in book.turns.values() if scope.turn(t) and not t.refused}
    charges = [c[0] for t, c in book.charges.items() if t in in_scope]
    return Summary(
        position=position,
        entries=entries,
        accounts=sum(1 for a in book.accounts if scope.account(a)),
        billed_turns=len(in_scope),
        charges=len(charges),
        charged_micro_credits=sum(c.cost for c in charges),
        mismatches=check(book, seen, scope),
        not_read=[e for e in book.not_read if account_of(e.subject) is None],
        erased_charges=sum(
            1
            for t, c in book.charges.items()
            if t in book.erased and t not in book.turns and scope.account(c[0].account)
        ),
    )


async def read_projection(pool: Any) -> tuple[int, Rows]:
    """The billing projection's position and rows, as of one moment: read in one
    snapshot, as the projector commits rows and position together. Read one by one,
    a turn charged between the position and the ledger looked like a charge the log
    did not have (the audit failed while turns ran)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        position = await conn.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", BILLING.name
        )

        def rows(table: str, columns: tuple[str, ...]) -> Any:
            # a page at a time, each row made into the audit's as it comes: fetched
            # whole, then copied into dicts, the ledger was held three times over
            # (a record, a dict and a row per billed turn) at the audit's peak
            return conn.cursor(f"SELECT {', '.join(columns)} FROM {table}", prefetch=_PAGE)

        seen = Rows(
            ledger=[LedgerRow.read(r) async for r in rows("ledger", LEDGER_COLUMNS)],
            accounts=[AccountRow(**r) async for r in rows("accounts", ACCOUNT_COLUMNS)],
            grants=[GrantRow(**r) async for r in rows("credit_grants", GRANT_COLUMNS)],
            reservations=[
                ReservationRow(**r) async for r in rows("reservations", RESERVATION_COLUMNS)
            ],
        )
    return int(position or 0), seen


def run_audit(args: argparse.Namespace) -> int:
    if args.project is not None and not valid_id(args.project):
        raise CliError(f"--project must be a project id, not {args.project!r}")
    try:
        since = parse_since(args.since) if args.since is not None else None
    except ValueError as err:
        raise CliError(f"--since: {err}; use an ISO date or time, e.g. 2026-11-01") from err
    scope = Scope(project=args.project, since_ns=since)
    settings = load_settings(args.data)
    servers = resolve_servers(settings)

    async def main() -> Summary:
        nc = await connect(
            servers.nats_url,
            name="parley-audit",
            reconnect_forever=False,
            security=servers.nats_security,
        )
        try:
            await require_jetstream(nc.jetstream())
        except BaseException:
            await nc.close()
            raise
        pool = await create_pool(servers.database_url, settings.db_schema, max_size=2, create=False)
        try:
            return await audit_billing(nc.jetstream(), pool, scope)
        except LogBehind as err:
            raise CliError(
                f"{err}. The ledger can be audited against the log once it is rebuilt"
                ' from it (README "Restoring or recreating the log")'
            ) from err
        finally:
            await pool.close()
            await nc.close()

    summary = asyncio.run(main())
    if args.json:
        print(msgspec.json.encode(summary).decode())
    else:
        print(render(summary, scope))
    return 1 if summary.mismatches else 0


def render(summary: Summary, scope: Scope) -> str:
    where = f" for project {scope.project}" if scope.project else ""
    lines = [
        f"billing audit{where}: the log up to position {summary.position}"
        f" ({summary.entries:,} entries) against the ledger and the balances",
        "",
        f"  {'accounts':<22}{summary.accounts:>12,}",
        f"  {'billed turns':<22}{summary.billed_turns:>12,}",
        f"  {'charges':<22}{summary.charges:>12,}",
        f"  {'charged (micro-credits)':<22}{summary.charged_micro_credits:>12,}",
        f"  {'mismatches':<22}{len(summary.mismatches):>12,}",
    ]
    if summary.erased_charges:
        lines += [
            "",
            f"  {summary.erased_charges:,} charges for turns of deleted conversations: their"
            " tokens and prices were erased with them, so their cost is not recomputed;"
            " each is still held to one charge per turn, its ledger row and the balances",
        ]
    if summary.removed:
        lines += [
            "",
            f"  {summary.removed:,} positions up to {summary.position} are no longer in the"
            " log (a retention limit or a purge removed them, or a deleted conversation's"
            " erasure): the charges and grants they held cannot be checked, and mismatches"
            " below may be theirs",
        ]
    if summary.not_read:
        lines += [
            "",
            f"  {len(summary.not_read):,} entries of conversations this version cannot read"
            " (neither here nor in the read models; `parley projections errors` lists them):",
        ]
        lines += [
            f"    {e.seq}  {e.subject}  {e.type or 'no type'}: {e.error}"
            for e in summary.not_read[:20]
        ]
        if len(summary.not_read) > 20:
            lines.append(f"    ... and {len(summary.not_read) - 20:,} more")
    if summary.mismatches:
        # a project's account id is 34 characters: the columns are as wide as the widest
        kind = max(len("kind"), *(len(m.kind) for m in summary.mismatches)) + 2
        subject = max(len("turn or account"), *(len(m.subject) for m in summary.mismatches)) + 2
        lines += ["", f"  {'kind':<{kind}}{'turn or account':<{subject}}expected -> seen"]
        lines += [
            f"  {m.kind:<{kind}}{m.subject:<{subject}}{m.expected} -> {m.seen}"
            for m in summary.mismatches
        ]
    else:
        lines += ["", "  every charge and balance agrees with the log"]
    return "\n".join(lines)


__all__ = ["run_audit", "sys"]
