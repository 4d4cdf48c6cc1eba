"""The billing audit: every charge and balance recomputed from the event log alone,
then held against the ledger and the balances the projection wrote.

`Book` is a pure fold over the whole log (no I/O): what each billed turn
should have cost (its tokens from its end, its prices and payer from its
`started`), which charges the accounts hold, and each account's balance. Then
`check` lists every difference:

- a billed turn that ended but was not charged, was charged twice, to another
  account, or at another cost than its tokens at its prices;
- a charge for a turn the log does not show ending billed;
- a ledger row missing, extra or different from its charge (its debt and
  time included: both follow from the log's order);
- an account whose projected balance is not granted minus charged, whose
  granted, charged or reserved totals differ, or that the log never made;
- a grant or a held reservation missing, extra or different from the log's;
- an account's entry this version cannot read (a grant or a charge, perhaps).

A deleted conversation's log is purged down to its tombstone
(`conversation_deleted`), which names its turns: a charge for one of them is a
charge for an erased turn, not one "without a turn". Its cost can no longer be
recomputed (the tokens and prices went with the conversation), nor its payer
checked; everything on the accounts' subjects still is (one charge per turn, the
ledger row, the balances, the reservations), and a turn of the tombstone that
still holds its reservation uncharged is reported (`erased_not_charged`).

`Book.faithful()` is what a faithful projection holds at the audited position,
and `check` holds the projection's rows (`Rows`) against it.

Every other entry it cannot read is listed with the result (`Book.not_read`):
whatever it held is in neither the book nor the read models.

Nothing here trusts the projection: it is what is being checked.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from events.billing import turn_cost
from events.codec import Unreadable, timestamp
from events.subjects import account_of
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    ConversationCreated,
    ConversationDeleted,
    CreditsGranted,
    CreditsReserved,
    Done,
    Failed,
    Prices,
    Started,
    TurnCharged,
)


class BilledTurn(msgspec.Struct):
    turn_id: str
    conversation_id: str
    project_id: str | None
    payer: str
    prices: Prices
    started_at: int
    ended_at: int | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    refused: bool = False

    @property
    def cost(self) -> int:
        return turn_cost(self.input_tokens, self.output_tokens, self.prices)


class AccountRow(msgspec.Struct, frozen=True):
    """An account's totals, as the projection holds them (balance = granted - charged)."""

    account: str
    granted: int = 0
    charged: int = 0
    reserved: int = 0

    @property
    def balance(self) -> int:
        return self.granted - self.charged


class GrantRow(msgspec.Struct, frozen=True):
    event_id: str
    account: str
    amount: int
    note: str
    granted_by: str
    granted_at: dt.datetime
    seq: int


class ReservationRow(msgspec.Struct, frozen=True):
    """A reservation still held: its turn has not been charged yet."""

    turn_id: str
    account: str
    conversation_id: str
    amount: int
    reserved_at: dt.datetime
    seq: int


class NotRead(msgspec.Struct, frozen=True):
    """An entry of the log this version cannot read: whatever it held is not in the book."""

    seq: int
    subject: str
    type: str | None
    error: str


class Charge(msgspec.Struct, frozen=True, gc=False):
    """A turn's charge as the book keeps it: who paid, how much. The rest of the event
    is in the turn's ledger row (made of its first charge); the whole event was kept
    for every billed turn of the log, for the whole run."""

    account: str
    cost: int


class Book(msgspec.Struct):
    """What the audit needs of the log, folded: per billed turn its facts, its
    charges and its ledger row; per account its totals; per conversation its project;
    the grants and the held reservations. Values that repeat from turn to turn (a
    conversation, an account, a user, how a turn ended) are one string each, shared
    (`_shared`), not a copy per turn: the rest is what the comparison needs."""

    turns: dict[str, BilledTurn] = {}
    charges: dict[str, list[Charge]] = {}
    # each charged turn's ledger row, made as the projection makes it: from its
    # first charge, with the debt the balance before it left
    ledger: dict[str, LedgerRow] = {}
    accounts: dict[str, AccountRow] = {}
    grants: dict[str, GrantRow] = {}
    reservations: dict[str, ReservationRow] = {}  # held: not charged yet
    projects: dict[str, str | None] = {}  # conversation -> project
    # the turns of deleted conversations (their tombstones'): turn -> its conversation
    erased: dict[str, str] = {}
    not_read: list[NotRead] = []
    events: int = 0

    def faithful(self) -> Rows:
        """The rows a faithful projection holds after the events folded so far."""
        return Rows(
            ledger=list(self.ledger.values()),
            accounts=list(self.accounts.values()),
            grants=list(self.grants.values()),
            reservations=list(self.reservations.values()),
        )


def fold_book(book: Book, event: AnyEvent | Unreadable, *, seq: int = 0, subject: str = "") -> None:
    """Add one event of the log to the book (in place: the log is large)."""
    book.events += 1
    match event:
        case Unreadable():
            book.not_read.append(NotRead(seq, subject, event.type, event.error[:200]))
        case ConversationCreated():
            book.projects[_shared(event.conversation_id)] = _shared_or_none(event.project_id)
        case ConversationDeleted():
            conversation = _shared(event.conversation_id)
            book.projects[conversation] = _shared_or_none(event.project_id)
            for turn_id in event.turn_ids:
                book.erased[turn_id] = conversation
        case Started():
            if event.payer:
                book.turns[event.turn_id] = BilledTurn(
                    turn_id=event.turn_id,
                    conversation_id=_shared(event.conversation_id),
                    project_id=book.projects.get(event.conversation_id),
                    payer=_shared(event.payer),
                    prices=event.prices,
                    started_at=event.at,
                )
        case Done() | Cancelled() | Failed():
            turn = book.turns.get(event.turn_id)
            if turn is not None and turn.ended_at is None:
                turn.ended_at = event.at
                turn.input_tokens = event.input_tokens
                turn.output_tokens = event.output_tokens
        case BillingRejected():
            turn = book.turns.get(event.turn_id)
            if turn is not None:
                turn.refused = True
                turn.ended_at = event.at
        case CreditsGranted():
            if event.event_id not in book.grants:
                book.grants[event.event_id] = GrantRow(
                    event_id=event.event_id,
                    account=event.account,
                    amount=event.amount,
                    note=event.note,
                    granted_by=event.granted_by,
                    granted_at=timestamp(event.at),
                    seq=seq,
                )
                _move(book, event.account, granted=event.amount)
        case CreditsReserved():
            # held once, until the turn's charge; a charged turn holds nothing more
            if event.turn_id not in book.reservations and event.turn_id not in book.ledger:
                book.reservations[event.turn_id] = ReservationRow(
                    turn_id=event.turn_id,
                    account=event.account,
                    conversation_id=event.conversation_id,
                    amount=event.amount,
                    reserved_at=timestamp(event.at),
                    seq=seq,
                )
                _move(book, event.account, reserved=event.amount)
        case TurnCharged():
            billed = book.turns.get(event.turn_id)
            # the turn's own id string, not a copy of it for each of the three dicts
            turn_id = event.turn_id if billed is None else billed.turn_id
            charges = book.charges.setdefault(turn_id, [])
            charges.append(Charge(_shared(event.account), event.cost))
            if len(charges) > 1:
                return  # the fold of an account counts a turn's charge once
            before = _move(book, event.account).balance
            book.ledger[turn_id] = LedgerRow.of(
                event, debt=max(0, event.cost - max(0, before)), seq=seq, turn_id=turn_id
            )
            held = book.reservations.pop(event.turn_id, None)
            released = held.amount if held is not None else 0
            _move(book, event.account, charged=event.cost, reserved=-released)
        case _:
            pass


def _move(
    book: Book, account: str, *, granted: int = 0, charged: int = 0, reserved: int = 0
) -> AccountRow:
    """Move an account's totals (made on its first entry, as the projection makes its
    row); the account as it was before the move."""
    was = book.accounts.get(account, AccountRow(account=account))
    book.accounts[account] = msgspec.structs.replace(
        was,
        granted=was.granted + granted,
        charged=was.charged + charged,
        reserved=was.reserved + reserved,
    )
    return was


class LedgerRow(msgspec.Struct, frozen=True):
    """A ledger row as the audit reads it: what its turn's `turn_charged` put there."""

    turn_id: str
    account: str
    cost: int
    conversation_id: str
    user_id: str
    project_id: str | None
    input_tokens: int
    output_tokens: int
    input_price: float
    output_price: float
    tokens_estimated: bool
    reserved: int
    turn_end: str
    debt: int  # the part of the cost the balance before it did not cover
    charged_at: dt.datetime
    seq: int

    @classmethod
    def of(
        cls, charge: TurnCharged, *, debt: int, seq: int, turn_id: str | None = None
    ) -> LedgerRow:
        """The row a faithful projection makes of `charge`, the turn's first (`turn_id`:
        the same id, as a string the caller already holds)."""
        return cls(
            turn_id=charge.turn_id if turn_id is None else turn_id,
            account=_shared(charge.account),
            cost=charge.cost,
            conversation_id=_shared(charge.conversation_id),
            user_id=_shared(charge.user_id),
            project_id=_shared_or_none(charge.project_id),
            input_tokens=charge.input_tokens,
            output_tokens=charge.output_tokens,
            input_price=charge.input_price,
            output_price=charge.output_price,
            tokens_estimated=charge.tokens_estimated,
            reserved=charge.reserved,
            turn_end=_shared(charge.end),
            debt=debt,
            charged_at=timestamp(charge.at),
            seq=seq,
        )

    @classmethod
    def read(cls, row: Mapping[str, Any]) -> LedgerRow:
        """A ledger row as Postgres gives it, its repeating values shared as the book's."""
        values: dict[str, Any] = {
            name: _shared_or_none(value) if name in _REPEATING else value
            for name, value in row.items()
        }
        return cls(**values)


# the ledger's columns whose values repeat from row to row
_REPEATING = frozenset({"account", "conversation_id", "user_id", "project_id", "turn_end"})


def _shared(value: str) -> str:
    """One string object for equal values that recur (ids of conversations, accounts and
    users): the audit holds one per billed turn, or several, for the whole run."""
    return sys.intern(value)


def _shared_or_none(value: str | None) -> str | None:
    return None if value is None else sys.intern(value)


class Rows(msgspec.Struct):
    """The billing projection's rows the audit holds against the log (`Book.faithful`)."""

    ledger: list[LedgerRow] = []
    accounts: list[AccountRow] = []
    grants: list[GrantRow] = []
    reservations: list[ReservationRow] = []


# The columns the audit reads of each table: every column the projection writes
# from events (an account's updated_at and last_seq say only when it last moved).
LEDGER_COLUMNS: tuple[str, ...] = LedgerRow.__struct_fields__
ACCOUNT_COLUMNS: tuple[str, ...] = AccountRow.__struct_fields__
GRANT_COLUMNS: tuple[str, ...] = GrantRow.__struct_fields__
RESERVATION_COLUMNS: tuple[str, ...] = ReservationRow.__struct_fields__


class Mismatch(msgspec.Struct, frozen=True):
    kind: str
    subject: str  # a turn or an account
    expected: str
    seen: str


class Scope(msgspec.Struct, frozen=True):
    project: str | None = None
    since_ns: int | None = None

    def turn(self, turn: BilledTurn) -> bool:
        if self.project is not None and turn.project_id != self.project:
            return False
        return self.since_ns is None or (turn.ended_at or turn.started_at) >= self.since_ns

    def account(self, account: str) -> bool:
        return self.project is None or account == f"project:{self.project}"


def check(book: Book, seen: Rows, scope: Scope) -> list[Mismatch]:
    """Every difference between the log's billing (`book`) and the projection's rows."""
    out: list[Mismatch] = []
    in_scope = {t.turn_id for t in book.turns.values() if scope.turn(t)}
    for turn_id in sorted(in_scope):
        turn = book.turns[turn_id]
        charges = book.charges.get(turn_id, [])
        if turn.refused or turn.ended_at is None:
            if charges and turn.refused:
                out.append(Mismatch("charged_refused_turn", turn_id, "no charge", _costs(charges)))
            continue  # still running: nothing to hold it to yet
        if not charges:
            out.append(Mismatch("not_charged", turn_id, f"{turn.cost} to {turn.payer}", "none"))
            continue
        distinct = {(c.account, c.cost) for c in charges}
        if len(distinct) > 1:
            out.append(Mismatch("charged_twice", turn_id, "one charge", _costs(charges)))
        charge = charges[0]
        if charge.account != turn.payer:
            out.append(Mismatch("wrong_account", turn_id, turn.payer, charge.account))
        if charge.cost != turn.cost:
            out.append(
                Mismatch(
                    "cost_differs",
                    turn_id,
                    f"{turn.cost} ({turn.input_tokens} in, {turn.output_tokens} out at "
                    f"{turn.prices.input_price}/{turn.prices.output_price})",
                    str(charge.cost),
                )
            )
    for turn_id, charges in sorted(book.charges.items()):
        if turn_id in book.turns or not scope.account(charges[0].account):
            continue
        if turn_id not in book.erased:
            out.append(Mismatch("charge_without_turn", turn_id, "a billed turn", _costs(charges)))
        elif len({(c.account, c.cost) for c in charges}) > 1:
            # erased with its conversation: its cost is not known any more, but a turn
            # is still charged once
            out.append(Mismatch("charged_twice", turn_id, "one charge", _costs(charges)))
    for turn_id, held in sorted(book.reservations.items()):
        # a turn erased with its conversation that was reserved for and never charged
        # (a live turn is charged before its tombstone is appended)
        if turn_id in book.erased and turn_id not in book.turns and scope.account(held.account):
            out.append(
                Mismatch(
                    "erased_not_charged",
                    turn_id,
                    f"a charge to {held.account} (its conversation "
                    f"{book.erased[turn_id]} was deleted)",
                    f"{held.amount} still held",
                )
            )

    def ledger_in_scope(row: LedgerRow) -> bool:
        # a known turn by the turn's scope; a charge for a turn the log does not
        # show, by its account
        known = row.turn_id in book.turns
        return row.turn_id in in_scope if known else scope.account(row.account)

    out += _compare(
        "ledger",
        {r.turn_id: r for r in book.ledger.values() if ledger_in_scope(r)},
        {r.turn_id: r for r in seen.ledger if ledger_in_scope(r)},
        describe=lambda r: f"{r.cost} to {r.account}",
    )
    out += _compare_accounts(
        {a: r for a, r in book.accounts.items() if scope.account(a)},
        {r.account: r for r in seen.accounts if scope.account(r.account)},
    )
    out += _compare(
        "grant",
        {r.event_id: r for r in book.grants.values() if scope.account(r.account)},
        {r.event_id: r for r in seen.grants if scope.account(r.account)},
        describe=lambda r: f"{r.amount} to {r.account}",
    )
    out += _compare(
        "reservation",
        {r.turn_id: r for r in book.reservations.values() if scope.account(r.account)},
        {r.turn_id: r for r in seen.reservations if scope.account(r.account)},
        describe=lambda r: f"{r.amount} held on {r.account}",
    )
    # An account's entry that cannot be read may be a grant or a charge: its balance
    # cannot be vouched for (the projector skipped the entry too, so the two agree).
    for entry in book.not_read:
        owner = account_of(entry.subject)
        if owner is not None and scope.account(owner):
            out.append(
                Mismatch(
                    "unreadable_entry",
                    owner,
                    "an entry this version reads",
                    f"entry {entry.seq} ({entry.type or 'no type'}): {entry.error}",
                )
            )
    return out


_Row = TypeVar("_Row", LedgerRow, GrantRow, ReservationRow)


def _compare(
    table: str,
    expected: dict[str, _Row],
    seen: dict[str, _Row],
    *,
    describe: Callable[[_Row], str],
) -> list[Mismatch]:
    """A table's rows by key: `<table>_row_missing`, `_extra` or `_differs` (naming
    each column that differs)."""
    out: list[Mismatch] = []
    for key in sorted(expected.keys() | seen.keys()):
        want, got = expected.get(key), seen.get(key)
        if got is None:
            assert want is not None
            out.append(Mismatch(f"{table}_row_missing", key, describe(want), "no row"))
        elif want is None:
            out.append(Mismatch(f"{table}_row_extra", key, "no row", describe(got)))
        elif got != want:
            out.append(Mismatch(f"{table}_row_differs", key, describe(want), _differing(want, got)))
    return out


def _compare_accounts(
    expected: dict[str, AccountRow], seen: dict[str, AccountRow]
) -> list[Mismatch]:
    out: list[Mismatch] = []
    for account in sorted(expected.keys() | seen.keys()):
        want, got = expected.get(account), seen.get(account)
        if want is None:
            assert got is not None
            out.append(
                Mismatch(
                    "account_row_extra",
                    account,
                    "no account (nothing granted, held or charged in the log)",
                    f"balance {got.balance} ({got.granted} granted - {got.charged} charged)",
                )
            )
            continue
        if got is not None and got == want:
            continue
        totals = f"{want.balance} ({want.granted} granted - {want.charged} charged)"
        if got is None or got.balance != want.balance:
            seen_balance = "no row" if got is None else str(got.balance)
            out.append(Mismatch("balance_differs", account, totals, seen_balance))
        else:
            out.append(
                Mismatch(
                    "account_row_differs",
                    account,
                    f"{totals}, {want.reserved} reserved",
                    _differing(want, got),
                )
            )
    return out


def _differing(want: msgspec.Struct, got: msgspec.Struct) -> str:
    return "; ".join(
        f"{name} {getattr(want, name)!r} != {getattr(got, name)!r}"
        for name in want.__struct_fields__
        if getattr(got, name) != getattr(want, name)
    )


def _costs(charges: list[Charge]) -> str:
    return ", ".join(f"{c.cost} to {c.account}" for c in charges)


def parse_since(text: str) -> int:
    """An ISO date or time (UTC when no zone is given) as ns since the epoch."""
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1e9)
