"""The billing projection's handlers: projects, accounts, reservations, the ledger.

One handler per event type, its SQL beside it. Like the read models' handlers
(projections/handlers.py) each is pure: it returns the statements (`Write`s)
that apply its event, and the projector runs them inside its transaction
(projections/projector.py). A write that depends on what is already there (a
balance, whether a reservation was new) says so in SQL (`ON CONFLICT`,
`x = x + $n`, a CTE), never by reading first. Rows carry only what events
carry, so a rebuild writes identical rows, and `parley audit billing`
(projections/audit.py) holds them against what it recomputes from the log.

The projection is not conversation-local: accounts and the ledger are shared
by every conversation that bills them, and a charge's debt depends on the
balance the charges before it left. So its writes run strictly in log order.

A turn's charge is applied once: a second `turn_charged` for the same turn
(a retry the account's fold also ignores) adds no row and moves no balance.

Every event takes effect once, also when it is applied again (the checkpoint
moved back under rows that are ahead of it, or an event came twice): every
write that moves an account sets its `last_seq` to the event's position, and
in log order that says how far the account's rows are. A grant, reservation or
charge at or below it moves nothing: not the balances, and no reservation row
(a turn's reservation is gone once the turn is charged, so its absence does
not mean it was never applied). Rows keyed by their event (a project, a
member, a grant, a ledger row) are kept once by their key. Rows restored from
a backup with their checkpoint are as far as it says, and get what followed
applied again.
"""

from __future__ import annotations

from events.codec import timestamp
from events.vocabulary import (
    CreditsGranted,
    CreditsReserved,
    MemberAdded,
    ProjectCreated,
    TurnCharged,
)
from projections.registry import Projection, Write, write

BILLING = Projection(
    "billing",
    tables=("projects", "project_members", "accounts", "credit_grants", "reservations", "ledger"),
    ddl="billing.sql",
)

# ---------------------------------------------------------------- projects


@BILLING.on(ProjectCreated)
def project_created(seq: int, event: ProjectCreated) -> list[Write]:
    at = timestamp(event.at)
    return [
        write(
            "INSERT INTO projects (id, name, created_by, created_at, seq)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
            event.project_id,
            event.name,
            event.created_by,
            at,
            seq,
        ),
        write(_ADD_MEMBER, event.project_id, event.created_by, None, at),
    ]


_ADD_MEMBER = (
    "INSERT INTO project_members (project_id, user_id, added_by, added_at)"
    " VALUES ($1, $2, $3, $4) ON CONFLICT (project_id, user_id) DO NOTHING"
)


@BILLING.on(MemberAdded)
def member_added(seq: int, event: MemberAdded) -> list[Write]:
    return [
        write(_ADD_MEMBER, event.project_id, event.user_id, event.added_by, timestamp(event.at))
    ]


# ---------------------------------------------------------------- accounts


def _unapplied(account: str, seq: str) -> str:
    """SQL true while the event at `seq` is not yet in the rows of `account` (both
    are placeholders: `$n`): every write that moves an account sets its last_seq, in
    log order, so an event at or below it was applied (a row that is not there yet
    has nothing applied)."""
    return f"NOT EXISTS (SELECT 1 FROM accounts WHERE account = {account} AND last_seq >= {seq})"


# The grant's row is keyed by its event; the balance moves only for an event
# after the account's last_seq.
_ACCOUNT = """
INSERT INTO accounts (account, kind, owner, granted, charged, reserved, updated_at, last_seq)
VALUES ($1, split_part($1, ':', 1), substr($1, strpos($1, ':') + 1), $2, $3, $4, $5, $6)
ON CONFLICT (account) DO UPDATE SET
    granted = accounts.granted + $2, charged = accounts.charged + $3,
    reserved = accounts.reserved + $4, updated_at = $5, last_seq = $6
WHERE accounts.last_seq < $6
"""


@BILLING.on(CreditsGranted)
def credits_granted(seq: int, event: CreditsGranted) -> list[Write]:
    at = timestamp(event.at)
    return [
        write(
            "INSERT INTO credit_grants (event_id, account, amount, note, granted_by, granted_at,"
            " seq) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
            event.event_id,
            event.account,
            event.amount,
            event.note,
            event.granted_by,
            at,
            seq,
        ),
        write(_ACCOUNT, event.account, event.amount, 0, 0, at, seq),
    ]


# A reservation holds its amount on the account once: only when its row is new
# (a second `credits_reserved` for the turn moves nothing), in one statement.
# Its row is gone once the turn is charged, so "new" is not enough to tell a
# reservation applied before: one at or below the account's last_seq is.
_RESERVE = f"""
WITH added AS (
    INSERT INTO reservations (turn_id, account, conversation_id, amount, reserved_at, seq)
    SELECT $1, $2, $3, $4, $5, $6
    WHERE {_unapplied("$2", "$6")}
    ON CONFLICT (turn_id) DO NOTHING
    RETURNING amount
)
INSERT INTO accounts (account, kind, owner, granted, charged, reserved, updated_at, last_seq)
SELECT $2, split_part($2, ':', 1), substr($2, strpos($2, ':') + 1), 0, 0, amount, $5, $6
FROM added
ON CONFLICT (account) DO UPDATE SET
    reserved = accounts.reserved + excluded.reserved,
    updated_at = excluded.updated_at, last_seq = excluded.last_seq
"""


@BILLING.on(CreditsReserved)
def credits_reserved(seq: int, event: CreditsReserved) -> list[Write]:
    return [
        write(
            _RESERVE,
            event.turn_id,
            event.account,
            event.conversation_id,
            event.amount,
            timestamp(event.at),
            seq,
        )
    ]


# The charge: a ledger row (with the part the balance did not cover: debt),
# the reservation released, the account moved: one statement, once per turn
# (the ledger row is keyed by the turn, and the account moves only with it). A
# charge applied again releases nothing: a reservation of its turn there now was
# taken after the charge.
_CHARGE = f"""
WITH before AS (
    SELECT granted - charged AS balance FROM accounts WHERE account = $2
), held AS (
    DELETE FROM reservations WHERE turn_id = $1 AND {_unapplied("$2", "$15")}
    RETURNING amount
), entry AS (
    INSERT INTO ledger (turn_id, account, conversation_id, project_id, user_id, input_tokens,
        output_tokens, input_price, output_price, tokens_estimated, cost, reserved, debt,
        turn_end, charged_at, seq)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        greatest(0, $11 - greatest(0, coalesce((SELECT balance FROM before), 0))),
        $13, $14, $15)
    ON CONFLICT (turn_id) DO NOTHING
    RETURNING cost
)
INSERT INTO accounts (account, kind, owner, granted, charged, reserved, updated_at, last_seq)
SELECT $2, split_part($2, ':', 1), substr($2, strpos($2, ':') + 1), 0, cost,
       -coalesce((SELECT sum(amount) FROM held), 0), $14, $15
FROM entry
ON CONFLICT (account) DO UPDATE SET
    charged = accounts.charged + excluded.charged,
    reserved = accounts.reserved + excluded.reserved,
    updated_at = excluded.updated_at, last_seq = excluded.last_seq
"""


@BILLING.on(TurnCharged)
def turn_charged(seq: int, event: TurnCharged) -> list[Write]:
    return [
        write(
            _CHARGE,
            event.turn_id,
            event.account,
            event.conversation_id,
            event.project_id,
            event.user_id,
            event.input_tokens,
            event.output_tokens,
            event.input_price,
            event.output_price,
            event.tokens_estimated,
            event.cost,
            event.reserved,
            event.end,
            timestamp(event.at),
            seq,
        )
    ]
