"""The billing audit's arithmetic, without servers: a log folded into a book, held
against ledger rows and balances, and every kind of difference it must name."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from events.billing import turn_cost
from events.codec import decode_entry
from events.subjects import account_of, account_subject, event_subject
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    ConversationCreated,
    CreditsGranted,
    Done,
    Prices,
    Started,
    TurnCharged,
)
from projections.audit import (
    BalanceRow,
    Book,
    LedgerRow,
    Mismatch,
    Scope,
    check,
    fold_book,
)

PRICES = Prices(input_price=3.0, output_price=15.0)
PROJECT = "p1"
ACCOUNT = f"project:{PROJECT}"
_ids = itertools.count(1)


def eid() -> str:
    return f"e{next(_ids)}"


def turn(cid: str, turn_id: str, tokens: tuple[int, int], at: int = 10) -> list[AnyEvent]:
    return [
        Started(
            conversation_id=cid,
            at=at,
            event_id=eid(),
            turn_id=turn_id,
            user_message_id="m",
            model="demo",
            prices=PRICES,
            payer=ACCOUNT,
        ),
        Done(
            conversation_id=cid,
            at=at + 1,
            event_id=eid(),
            turn_id=turn_id,
            content=[],
            stop_reason="stop",
            input_tokens=tokens[0],
            output_tokens=tokens[1],
        ),
    ]


def charge(cid: str, turn_id: str, cost: int, account: str = ACCOUNT) -> TurnCharged:
    return TurnCharged(
        conversation_id=cid,
        at=20,
        event_id=eid(),
        account=account,
        turn_id=turn_id,
        cost=cost,
        reserved=5250,
        input_tokens=0,
        output_tokens=0,
        input_price=3.0,
        output_price=15.0,
    )


def book_of(events: list[AnyEvent]) -> Book:
    book = Book()
    for event in events:
        fold_book(book, event)
    return book


def clean_log() -> tuple[list[AnyEvent], list[LedgerRow], list[BalanceRow]]:
    cost_a, cost_b = turn_cost(100, 20, PRICES), turn_cost(7, 3, PRICES)
    events: list[AnyEvent] = [
        ConversationCreated(
            conversation_id="c1", at=1, event_id=eid(), user_id="u", project_id=PROJECT
        ),
        CreditsGranted(conversation_id="", at=2, event_id=eid(), account=ACCOUNT, amount=1_000_000),
        *turn("c1", "t1", (100, 20)),
        charge("c1", "t1", cost_a),
        *turn("c1", "t2", (7, 3)),
        charge("c1", "t2", cost_b),
    ]
    ledger = [LedgerRow.of(e) for e in events if isinstance(e, TurnCharged)]
    balances = [BalanceRow(ACCOUNT, 1_000_000 - cost_a - cost_b)]
    return events, ledger, balances


def kinds(found: list[Mismatch]) -> list[str]:
    return [m.kind for m in found]


def test_a_clean_log_and_a_faithful_projection_give_no_mismatch() -> None:
    events, ledger, balances = clean_log()
    assert check(book_of(events), ledger, balances, Scope()) == []


@pytest.mark.parametrize(
    "tampered",
    [
        {"cost": 1},
        {"account": "user:someone"},
        {"input_tokens": 1},
        {"output_tokens": 1},
        {"input_price": 0.5},
        {"output_price": 0.5},
        {"tokens_estimated": True},
        {"user_id": "mallory"},
        {"project_id": "another"},
        {"reserved": 1},
        {"turn_end": "failed"},
    ],
)
def test_a_tampered_ledger_row_is_named_with_what_differs(tampered: dict[str, object]) -> None:
    events, ledger, balances = clean_log()
    (name,) = tampered
    value = tampered[name]
    if isinstance(value, int) and not isinstance(value, bool):
        value = getattr(ledger[0], name) + value  # a number: off by that much
    ledger[0] = msgspec.structs.replace(ledger[0], **{name: value})
    found = check(book_of(events), ledger, balances, Scope())
    assert kinds(found) == ["ledger_row_differs"] and found[0].subject == "t1", found
    assert name in found[0].seen, found


def test_a_dropped_ledger_row_is_named() -> None:
    events, ledger, balances = clean_log()
    found = check(book_of(events), ledger[1:], balances, Scope())
    assert kinds(found) == ["ledger_row_missing"] and found[0].subject == "t1", found


def test_a_turn_without_its_charge_and_a_wrong_balance_are_named() -> None:
    events, ledger, balances = clean_log()
    events = [e for e in events if not (isinstance(e, TurnCharged) and e.turn_id == "t2")]
    found = check(book_of(events), ledger, balances, Scope())
    assert kinds(found) == ["not_charged", "ledger_row_extra", "balance_differs"], found


def test_a_charge_at_another_cost_or_account_or_twice_is_named() -> None:
    events, ledger, balances = clean_log()
    book = book_of([*events, charge("c1", "t1", 999, "user:u")])
    found = check(book, ledger, balances, Scope())
    assert kinds(found) == ["charged_twice"], found
    wrong = [e for e in events if not isinstance(e, TurnCharged)] + [
        charge("c1", "t1", 5, "user:u"),
        charge("c1", "t2", ledger[1].cost),
    ]
    rows = [LedgerRow.of(e) for e in wrong if isinstance(e, TurnCharged)]
    found = check(book_of(wrong), rows, [], Scope())
    assert kinds(found)[:2] == ["wrong_account", "cost_differs"], found


def test_a_refused_turn_must_not_be_charged() -> None:
    events: list[AnyEvent] = [
        ConversationCreated(
            conversation_id="c2", at=1, event_id=eid(), user_id="u", project_id=PROJECT
        ),
        turn("c2", "t9", (0, 0))[0],
        BillingRejected(
            conversation_id="c2",
            at=3,
            event_id=eid(),
            turn_id="t9",
            user_message_id="m",
            account=ACCOUNT,
            needed=5250,
            available=0,
        ),
    ]
    assert check(book_of(events), [], [], Scope()) == []
    found = check(
        book_of([*events, charge("c2", "t9", 10)]),
        [LedgerRow.of(charge("c2", "t9", 10))],
        [BalanceRow(ACCOUNT, -10)],
        Scope(),
    )
    assert kinds(found) == ["charged_refused_turn"], found


def test_the_scope_limits_turns_to_a_project_and_a_time() -> None:
    events, _, balances = clean_log()
    book = book_of(events)
    assert check(book, [], [], Scope(project="another")) == []
    late = Scope(since_ns=10**15)
    assert check(book, [], balances, late) == []  # no turn ended that late


def test_an_accounts_entry_that_cannot_be_read_is_named_others_are_listed() -> None:
    """Garbage on an account's subject passed the audit: it may have been a grant or a
    charge, and the projector skipped it too, so book and ledger agreed without it."""
    events, ledger, balances = clean_log()
    book = book_of(events)
    garbage = decode_entry(b"\xff\xfe not an event")
    fold_book(book, garbage, seq=90, subject=account_subject(ACCOUNT))
    fold_book(book, garbage, seq=91, subject=account_subject("user:someone-else"))
    fold_book(book, garbage, seq=92, subject=event_subject("c1"))
    assert [(n.seq, n.subject) for n in book.not_read] == [
        (90, account_subject(ACCOUNT)),
        (91, account_subject("user:someone-else")),
        (92, event_subject("c1")),
    ]
    found = check(book, ledger, balances, Scope(project=PROJECT))
    assert [(m.kind, m.subject) for m in found] == [("unreadable_entry", ACCOUNT)], found
    everyone = check(book, ledger, balances, Scope())
    assert [m.subject for m in everyone] == [ACCOUNT, "user:someone-else"], everyone
    assert account_of(event_subject("c1")) is None
