"""The billing audit's arithmetic, without servers: a log folded into a book, held
against ledger rows and balances, and every kind of difference it must name."""

from __future__ import annotations

import itertools
import sys
import types
from typing import Any

import msgspec
import pytest

from events.billing import turn_cost
from events.codec import decode_entry, timestamp
from events.subjects import account_of, account_subject, event_subject
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    ConversationCreated,
    ConversationDeleted,
    CreditsGranted,
    CreditsReserved,
    Done,
    Prices,
    Started,
    TurnCharged,
)
from parley.audit_command import Summary, render, summarise
from projections.audit import (
    AccountRow,
    Book,
    Charge,
    GrantRow,
    Mismatch,
    ReservationRow,
    Rows,
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
    for seq, event in enumerate(events, start=1):
        fold_book(book, event, seq=seq)
    return book


def reserve(cid: str, turn_id: str, amount: int = 5250) -> CreditsReserved:
    return CreditsReserved(
        conversation_id=cid, at=9, event_id=eid(), account=ACCOUNT, turn_id=turn_id, amount=amount
    )


def clean_log() -> list[AnyEvent]:
    return [
        ConversationCreated(
            conversation_id="c1", at=1, event_id=eid(), user_id="u", project_id=PROJECT
        ),
        CreditsGranted(conversation_id="", at=2, event_id=eid(), account=ACCOUNT, amount=1_000_000),
        reserve("c1", "t1"),
        *turn("c1", "t1", (100, 20)),
        charge("c1", "t1", turn_cost(100, 20, PRICES)),
        reserve("c1", "t2"),
        *turn("c1", "t2", (7, 3)),
        charge("c1", "t2", turn_cost(7, 3, PRICES)),
        reserve("c1", "t3"),  # a turn still running: its reservation is held
        turn("c1", "t3", (0, 0))[0],
    ]


def faithful(events: list[AnyEvent]) -> tuple[Book, Rows]:
    """The book of `events` and the rows a faithful projection of them holds."""
    book = book_of(events)
    return book, book.faithful()


def kinds(found: list[Mismatch]) -> list[str]:
    return [m.kind for m in found]


def test_a_clean_log_and_a_faithful_projection_give_no_mismatch() -> None:
    book, rows = faithful(clean_log())
    assert check(book, rows, Scope()) == []
    cost = turn_cost(100, 20, PRICES) + turn_cost(7, 3, PRICES)
    assert rows.accounts == [AccountRow(ACCOUNT, granted=1_000_000, charged=cost, reserved=5250)]
    assert [r.turn_id for r in rows.reservations] == ["t3"]
    assert [r.debt for r in rows.ledger] == [0, 0]


def test_a_charge_beyond_the_balance_is_debt_in_its_ledger_row() -> None:
    events = clean_log()
    events[1] = CreditsGranted(conversation_id="", at=2, event_id=eid(), account=ACCOUNT, amount=10)
    _, rows = faithful(events)
    first = turn_cost(100, 20, PRICES)
    assert [r.debt for r in rows.ledger] == [first - 10, turn_cost(7, 3, PRICES)]


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
        {"debt": 777},
        {"charged_at": timestamp(86_400 * 10**9)},
        {"seq": 1},
    ],
)
def test_a_tampered_ledger_row_is_named_with_what_differs(tampered: dict[str, object]) -> None:
    book, rows = faithful(clean_log())
    (name,) = tampered
    value = tampered[name]
    if isinstance(value, int) and not isinstance(value, bool):
        value = getattr(rows.ledger[0], name) + value  # a number: off by that much
    rows.ledger[0] = msgspec.structs.replace(rows.ledger[0], **{name: value})
    found = check(book, rows, Scope())
    assert kinds(found) == ["ledger_row_differs"] and found[0].subject == "t1", found
    assert name in found[0].seen, found


def test_a_dropped_ledger_row_is_named() -> None:
    book, rows = faithful(clean_log())
    rows.ledger = rows.ledger[1:]
    found = check(book, rows, Scope())
    assert kinds(found) == ["ledger_row_missing"] and found[0].subject == "t1", found


def test_a_turn_without_its_charge_and_a_wrong_balance_are_named() -> None:
    events = clean_log()
    _, rows = faithful(events)
    book = Book()
    for seq, event in enumerate(events, start=1):  # each at its place in the log
        if not (isinstance(event, TurnCharged) and event.turn_id == "t2"):
            fold_book(book, event, seq=seq)
    found = check(book, rows, Scope())
    assert kinds(found) == [
        "not_charged",
        "ledger_row_extra",
        "balance_differs",
        "reservation_row_missing",  # the log still holds t2's reservation
    ], found


def test_a_charge_at_another_cost_or_account_or_twice_is_named() -> None:
    events = clean_log()
    book, rows = faithful(events)
    found = check(book_of([*events, charge("c1", "t1", 999, "user:u")]), rows, Scope())
    assert kinds(found) == ["charged_twice"], found
    wrong = [e for e in events if not isinstance(e, TurnCharged)] + [
        charge("c1", "t1", 5, "user:u"),
        charge("c1", "t2", rows.ledger[1].cost),
    ]
    book, rows = faithful(wrong)
    found = check(book, rows, Scope())
    assert kinds(found)[:2] == ["wrong_account", "cost_differs"], found


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        ({"granted": 5_000_000, "charged": 5_000_000}, "account_row_differs"),
        ({"reserved": 5_000_000}, "account_row_differs"),
        ({"granted": 1}, "balance_differs"),
    ],
)
def test_an_accounts_totals_are_held_to_the_log_not_only_its_balance(
    change: dict[str, int], kind: str
) -> None:
    book, rows = faithful(clean_log())
    (account,) = rows.accounts
    rows.accounts = [
        msgspec.structs.replace(account, **{k: getattr(account, k) + v for k, v in change.items()})
    ]
    found = check(book, rows, Scope())
    assert kinds(found) == [kind] and found[0].subject == ACCOUNT, found
    for column in change:
        assert column in found[0].seen or kind == "balance_differs", found


def test_an_account_the_log_never_made_is_named() -> None:
    book, rows = faithful(clean_log())
    rows.accounts.append(AccountRow("user:mallory", granted=10**9))
    found = check(book, rows, Scope())
    assert [(m.kind, m.subject) for m in found] == [("account_row_extra", "user:mallory")]


def test_grants_and_reservations_are_held_to_the_log() -> None:
    book, rows = faithful(clean_log())
    (grant,) = rows.grants
    (held,) = rows.reservations
    cases: list[tuple[Rows, list[str]]] = [
        (msgspec.structs.replace(rows, grants=[]), ["grant_row_missing"]),
        (
            msgspec.structs.replace(
                rows, grants=[msgspec.structs.replace(grant, amount=grant.amount * 100)]
            ),
            ["grant_row_differs"],
        ),
        (
            msgspec.structs.replace(
                rows,
                grants=[grant, GrantRow("forged", ACCOUNT, 5, "", "", grant.granted_at, 99)],
            ),
            ["grant_row_extra"],
        ),
        (msgspec.structs.replace(rows, reservations=[]), ["reservation_row_missing"]),
        (
            msgspec.structs.replace(
                rows,
                reservations=[
                    held,
                    ReservationRow("t1", ACCOUNT, "c1", 5250, held.reserved_at, 3),
                ],
            ),
            ["reservation_row_extra"],  # t1 was charged: nothing of it is held
        ),
    ]
    for seen, expected in cases:
        assert kinds(check(book, seen, Scope())) == expected, seen


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
    assert check(book_of(events), Rows(), Scope()) == []
    book, rows = faithful([*events, charge("c2", "t9", 10)])
    found = check(book, rows, Scope())
    assert kinds(found) == ["charged_refused_turn"], found


def test_the_scope_limits_turns_to_a_project_and_a_time() -> None:
    book, rows = faithful(clean_log())
    assert check(book, Rows(), Scope(project="another")) == []
    late = Scope(since_ns=10**15)
    assert check(book, msgspec.structs.replace(rows, ledger=[]), late) == []  # none ended so late


def test_an_accounts_entry_that_cannot_be_read_is_named_others_are_listed() -> None:
    """Garbage on an account's subject passed the audit: it may have been a grant or a
    charge, and the projector skipped it too, so book and ledger agreed without it."""
    book, rows = faithful(clean_log())
    garbage = decode_entry(b"\xff\xfe not an event")
    fold_book(book, garbage, seq=90, subject=account_subject(ACCOUNT))
    fold_book(book, garbage, seq=91, subject=account_subject("user:someone-else"))
    fold_book(book, garbage, seq=92, subject=event_subject("c1"))
    assert [(n.seq, n.subject) for n in book.not_read] == [
        (90, account_subject(ACCOUNT)),
        (91, account_subject("user:someone-else")),
        (92, event_subject("c1")),
    ]
    found = check(book, rows, Scope(project=PROJECT))
    assert [(m.kind, m.subject) for m in found] == [("unreadable_entry", ACCOUNT)], found
    everyone = check(book, rows, Scope())
    assert [m.subject for m in everyone] == [ACCOUNT, "user:someone-else"], everyone
    assert account_of(event_subject("c1")) is None


def test_the_report_keeps_a_long_account_id_apart_from_the_numbers() -> None:
    account = "project:01M8P7P7K55B1SAB60ABKD8DX0"  # 34 characters
    summary = Summary(
        position=9,
        entries=9,
        accounts=1,
        billed_turns=0,
        charges=0,
        charged_micro_credits=0,
        mismatches=[Mismatch("balance_differs", account, "50 (50 granted - 0 charged)", "49")],
    )
    line = render(summary, Scope()).splitlines()[-1].split()
    assert line == [
        "balance_differs",
        account,
        "50",
        "(50",
        "granted",
        "-",
        "0",
        "charged)",
        "->",
        "49",
    ]


def test_the_summary_of_a_large_book_is_linear_in_its_turns() -> None:
    """The turns in scope were a set made anew for each charge: 5,000 billed turns took
    6 s to summarise, 300,000 (a year of a busy deployment) hours. Counted in lines of
    Python run, not in seconds: twice the turns must cost about twice the lines (the
    old summary ran four times as many)."""

    def lines_run(turns: int) -> int:
        events: list[AnyEvent] = [
            ConversationCreated(conversation_id="c1", at=1, event_id=eid(), user_id="u")
        ]
        for i in range(turns):
            events += [
                *turn("c1", f"t{i}", (10, 10)),
                charge("c1", f"t{i}", turn_cost(10, 10, PRICES)),
            ]
        book, rows = faithful(events)
        count = 0

        def tracer(frame: types.FrameType, event: str, arg: object) -> Any:
            nonlocal count
            if event == "line":
                count += 1
            return tracer

        sys.settrace(tracer)
        try:
            summary = summarise(book, rows, Scope(), position=len(events), entries=len(events))
        finally:
            sys.settrace(None)
        assert summary.charges == summary.billed_turns == turns
        assert summary.mismatches == []
        return count

    small, large = lines_run(200), lines_run(400)
    assert large < 2.5 * small, (small, large)


def test_the_book_holds_a_billed_turn_once_sharing_what_repeats() -> None:
    """The audit holds every billed turn of the log for the whole run: of a charge only
    who paid and how much (its ledger row has the rest), one string for a turn's id
    whichever event named it, and one for each value that recurs from turn to turn
    (conversation, account, user, how it ended), not a copy per turn. Decoded from
    bytes, as the audit reads the log, every event's strings are new objects."""
    book = Book()
    for seq, event in enumerate(clean_log(), start=1):
        fold_book(book, decode_entry(msgspec.json.encode(event)), seq=seq)
    first, second = book.ledger["t1"], book.ledger["t2"]
    assert book.charges == {
        "t1": [Charge(ACCOUNT, first.cost)],
        "t2": [Charge(ACCOUNT, second.cost)],
    }
    for turn_id in ("t1", "t2"):
        (key,) = (k for k in book.ledger if k == turn_id)
        assert key is book.ledger[turn_id].turn_id is book.turns[turn_id].turn_id
        assert next(k for k in book.charges if k == turn_id) is key
    for name in ("account", "conversation_id", "user_id", "project_id", "turn_end"):
        assert getattr(first, name) is getattr(second, name), name
    assert book.turns["t1"].payer is book.turns["t2"].payer is first.account
    assert book.turns["t1"].conversation_id is book.turns["t2"].conversation_id


def _erased(events: list[AnyEvent], cid: str, turn_ids: list[str]) -> Book:
    """The book of `events` as the log holds them once conversation `cid` was deleted:
    its own events purged (the rest keep their positions), its tombstone (naming
    `turn_ids`) after them."""
    book = Book()
    for seq, event in enumerate(events, start=1):
        if event.conversation_id != cid or isinstance(event, CreditsReserved | TurnCharged):
            fold_book(book, event, seq=seq)
    tombstone = ConversationDeleted(
        conversation_id=cid, at=30, event_id=eid(), user_id="u", command_id="d1",
        project_id=PROJECT, turn_ids=turn_ids,
    )  # fmt: skip
    fold_book(book, tombstone, seq=len(events) + 1)
    return book


def test_a_charge_for_a_turn_of_a_deleted_conversation_is_no_mismatch() -> None:
    events = clean_log()[:-2]  # t1 and t2 ended and charged
    rows = book_of(events).faithful()
    assert check(_erased(events, "c1", ["t1", "t2"]), rows, Scope()) == []
    assert check(_erased(events, "c1", ["t1", "t2"]), rows, Scope(project=PROJECT)) == []
    # without the tombstone's turn ids, they are charges for turns the log does not show
    unnamed = _erased(events, "c1", [])
    assert kinds(check(unnamed, rows, Scope())) == ["charge_without_turn"] * 2
    # everything on the accounts' subjects is still held to the log
    twice = _erased([*events, charge("c1", "t1", 1)], "c1", ["t1", "t2"])
    assert kinds(check(twice, rows, Scope())) == ["charged_twice"]
    dropped = msgspec.structs.replace(rows, ledger=rows.ledger[:1])
    found = check(_erased(events, "c1", ["t1", "t2"]), dropped, Scope())
    assert kinds(found) == ["ledger_row_missing"]


def test_a_deleted_conversations_turn_reserved_for_and_never_charged_is_named() -> None:
    events = [*clean_log()[:-2], reserve("c1", "t3"), turn("c1", "t3", (0, 0))[0]]
    book = _erased(events, "c1", ["t1", "t2", "t3"])
    found = check(book, book.faithful(), Scope())
    assert kinds(found) == ["erased_not_charged"], found
    assert found[0].subject == "t3"
