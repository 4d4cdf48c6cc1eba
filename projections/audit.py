"""The billing audit: every charge and balance recomputed from the event log alone,
then held against the ledger and the balances the projection wrote.

`Book` is a pure fold over the whole log (no I/O): what each billed turn
should have cost (its tokens from its end, its prices and payer from its
`started`), which charges the accounts hold, and each account's balance. Then
`check` lists every difference:

- a billed turn that ended but was not charged, was charged twice, to another
  account, or at another cost than its tokens at its prices;
- a charge for a turn the log does not show ending billed;
- a ledger row missing, extra or different from its charge;
- an account whose projected balance is not granted minus charged;
- an account's entry this version cannot read (a grant or a charge, perhaps).

Every other entry it cannot read is listed with the result (`Book.not_read`):
whatever it held is in neither the book nor the read models.

Nothing here trusts the projection: it is what is being checked.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import msgspec

from events.billing import turn_cost
from events.codec import Unreadable
from events.subjects import account_of
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    ConversationCreated,
    CreditsGranted,
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


class AccountBook(msgspec.Struct):
    account: str
    granted: int = 0
    charged: int = 0

    @property
    def balance(self) -> int:
        return self.granted - self.charged


class NotRead(msgspec.Struct, frozen=True):
    """An entry of the log this version cannot read: whatever it held is not in the book."""

    seq: int
    subject: str
    type: str | None
    error: str


class Book(msgspec.Struct):
    turns: dict[str, BilledTurn] = {}
    charges: dict[str, list[TurnCharged]] = {}
    accounts: dict[str, AccountBook] = {}
    projects: dict[str, str | None] = {}  # conversation -> project
    not_read: list[NotRead] = []
    events: int = 0


def fold_book(book: Book, event: AnyEvent | Unreadable, *, seq: int = 0, subject: str = "") -> None:
    """Add one event of the log to the book (in place: the log is large)."""
    book.events += 1
    match event:
        case Unreadable():
            book.not_read.append(NotRead(seq, subject, event.type, event.error[:200]))
        case ConversationCreated():
            book.projects[event.conversation_id] = event.project_id
        case Started():
            if event.payer:
                book.turns[event.turn_id] = BilledTurn(
                    turn_id=event.turn_id,
                    conversation_id=event.conversation_id,
                    project_id=book.projects.get(event.conversation_id),
                    payer=event.payer,
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
            _account(book, event.account).granted += event.amount
        case TurnCharged():
            charges = book.charges.setdefault(event.turn_id, [])
            if not charges:  # the fold of an account counts a turn's charge once
                _account(book, event.account).charged += event.cost
            charges.append(event)
        case _:
            pass


def _account(book: Book, account: str) -> AccountBook:
    if account not in book.accounts:
        book.accounts[account] = AccountBook(account=account)
    return book.accounts[account]


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

    @classmethod
    def of(cls, charge: TurnCharged) -> LedgerRow:
        """The row a faithful projection makes of `charge`."""
        return cls(
            turn_id=charge.turn_id,
            account=charge.account,
            cost=charge.cost,
            conversation_id=charge.conversation_id,
            user_id=charge.user_id,
            project_id=charge.project_id,
            input_tokens=charge.input_tokens,
            output_tokens=charge.output_tokens,
            input_price=charge.input_price,
            output_price=charge.output_price,
            tokens_estimated=charge.tokens_estimated,
            reserved=charge.reserved,
            turn_end=charge.end,
        )


# The ledger's columns the audit reads (debt and the times depend on when it was
# projected, not on the charge alone: the balances' check covers the money).
LEDGER_COLUMNS: tuple[str, ...] = LedgerRow.__struct_fields__


class BalanceRow(msgspec.Struct, frozen=True):
    account: str
    balance: int


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


def check(
    book: Book, ledger: Iterable[LedgerRow], balances: Iterable[BalanceRow], scope: Scope
) -> list[Mismatch]:
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
        if turn_id not in book.turns and scope.account(charges[0].account):
            out.append(Mismatch("charge_without_turn", turn_id, "a billed turn", _costs(charges)))

    rows = {row.turn_id: row for row in ledger}
    for turn_id, charges in sorted(book.charges.items()):
        known = book.turns.get(turn_id)
        if known is not None and turn_id not in in_scope:
            continue
        if known is None and not scope.account(charges[0].account):
            continue
        row = rows.pop(turn_id, None)
        if row is None:
            out.append(Mismatch("ledger_row_missing", turn_id, _costs(charges[:1]), "no row"))
        elif row != (faithful := LedgerRow.of(charges[0])):
            differ = [
                f"{name} {getattr(faithful, name)!r} != {getattr(row, name)!r}"
                for name in LEDGER_COLUMNS
                if getattr(row, name) != getattr(faithful, name)
            ]
            out.append(
                Mismatch(
                    "ledger_row_differs",
                    turn_id,
                    _costs(charges[:1]),
                    f"{row.cost} to {row.account}: {'; '.join(differ)}",
                )
            )
    for turn_id, row in sorted(rows.items()):
        unknown = turn_id not in book.turns
        if (unknown and scope.account(row.account)) or turn_id in in_scope:
            out.append(
                Mismatch("ledger_row_extra", turn_id, "no charge", f"{row.cost} to {row.account}")
            )

    projected = {row.account: row.balance for row in balances}
    for account, totals in sorted(book.accounts.items()):
        if not scope.account(account):
            continue
        seen = projected.get(account)
        if seen != totals.balance:
            out.append(
                Mismatch(
                    "balance_differs",
                    account,
                    f"{totals.balance} ({totals.granted} granted - {totals.charged} charged)",
                    "no row" if seen is None else str(seen),
                )
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


def _costs(charges: list[TurnCharged]) -> str:
    return ", ".join(f"{c.cost} to {c.account}" for c in charges)


def parse_since(text: str) -> int:
    """An ISO date or time (UTC when no zone is given) as ns since the epoch."""
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1e9)
