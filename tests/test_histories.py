"""Generated histories against the pure core: random interleavings of what users
and turns do, driven the way an actor drives the core, checked after every step.

A hypothesis state machine plays the actor's protocol with the pure functions
only (`decide_*`, `evolve`, `next_turn`, the account fold): users send, edit and
regenerate with every `on_busy`, commands are redelivered, turns stream, call
tools, end every way a turn can end (done, cancelled by the user or by an
interrupting request, failed, its worker lost), are refused by the pre-flight,
and are charged, with charges that fail and are retried later. After every step:

- never two active turns (the fold would mark the conversation broken), and
  the log itself never has two turns open at once;
- every turn ends exactly once in the log, and every accepted request ends:
  its turn ran and ended, or it was refused;
- versions are consistent: numbers in a group unique and counting up, at most
  one latest version per group, no message in force hanging off one that is not;
- the state folded step by step equals the state folded from the whole log;
- billed tokens equal consumed tokens: each account is charged once for each
  ended turn it paid for, with exactly the tokens that turn's end reported, and
  its balance is what was granted minus those charges.

No server and no I/O.
"""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Iterable

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from actors.billing import Refused, Usage, decide_charge, decide_reservation
from actors.decide import (
    ModelChoice,
    Rejected,
    TurnTotals,
    choose_payer,
    decide_billing_rejected,
    decide_cancelled,
    decide_done,
    decide_failed,
    decide_orphan_end,
    decide_rejection,
    decide_request,
    decide_start,
    decide_tool_call,
    decide_tool_result,
    next_turn,
)
from actors.model_stream import ToolCallRequest
from actors.snapshots import Folded, decode_snapshot, encode_snapshot
from actors.state import Conversation, evolve, fold, latest_messages
from actors.tools import ToolOutcome
from events.billing import AccountState, evolve_account, preflight_estimate, turn_cost
from events.vocabulary import (
    AnswerRequested,
    AnyEvent,
    BillingRejected,
    Cancelled,
    Chunk,
    CommandRejected,
    ConversationCreated,
    CreditsGranted,
    Done,
    EditMessage,
    Event,
    Failed,
    OnBusy,
    Prices,
    Regenerate,
    SendMessage,
    Started,
    TurnCharged,
    TurnCommand,
    UserMessage,
)

CONV = "conv-h"
OWNER = "owner"
MEMBER = "member"
PROJECT = "proj-h"
PRICES = Prices(input_price=3.0, output_price=15.0)
MODEL = ModelChoice(name="demo", version_id="demo@1", prices=PRICES)
ESTIMATE = preflight_estimate(PRICES)

on_busy = st.sampled_from(typing.get_args(OnBusy))
users = st.sampled_from([OWNER, MEMBER])
texts = st.text(alphabet="abc xyz", min_size=1, max_size=12)
tokens = st.integers(min_value=0, max_value=5_000)
ENDS = ("done", "user_cancel", "failed", "worker_lost")


def as_any(events: Iterable[Event]) -> list[AnyEvent]:
    members = typing.get_args(AnyEvent)
    out: list[AnyEvent] = []
    for event in events:
        assert isinstance(event, members), f"{type(event).__name__} is not in AnyEvent"
        out.append(event)
    return out


class ConversationHistories(RuleBasedStateMachine):
    """One conversation, its accounts, and the log they write."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[AnyEvent] = []
        self.state = Conversation(conversation_id=CONV)
        self.accounts: dict[str, AccountState] = {}
        self.account_log: dict[str, list[AnyEvent]] = {}
        self.count = 0
        self.commands: list[TurnCommand] = []
        self.accepted: set[str] = set()  # command ids the log accepted into the queue
        self.refused: set[str] = set()  # command ids refused (before or after queueing)
        self.uncharged: str | None = None  # a turn whose charge failed: retried later
        self.snapshot: tuple[int, Conversation] | None = None  # the latest: its position, state

    # ------------------------------------------------------------ plumbing

    def new_id(self) -> str:
        self.count += 1
        return f"id-{self.count}"

    def now(self) -> int:
        return 1_767_225_600_000_000_000 + self.count

    def append(self, events: Iterable[Event]) -> None:
        for event in as_any(events):
            self.log.append(event)
            self.state = evolve(self.state, event)

    def account(self, name: str) -> AccountState:
        return self.accounts.setdefault(name, AccountState(account=name))

    def append_account(self, name: str, event: AnyEvent) -> None:
        self.account_log.setdefault(name, []).append(event)
        self.accounts[name] = evolve_account(self.account(name), event)

    # ------------------------------------------------------------ setup

    @initialize(in_project=st.booleans(), funded=st.booleans(), credits=st.integers(0, 400_000))
    def create(self, in_project: bool, funded: bool, credits: int) -> None:
        self.append(
            [
                ConversationCreated(
                    conversation_id=CONV,
                    at=self.now(),
                    event_id=self.new_id(),
                    user_id=OWNER,
                    project_id=PROJECT if in_project else None,
                    model="demo",
                )
            ]
        )
        grantee = f"project:{PROJECT}" if funded else f"user:{MEMBER}"
        self.append_account(
            grantee,
            CreditsGranted(
                conversation_id="",
                at=self.now(),
                event_id=self.new_id(),
                account=grantee,
                amount=credits,
            ),
        )

    # ------------------------------------------------------------ requests

    def request(self, cmd: TurnCommand) -> None:
        """What the actor does with a turn request: accept it into the queue, or record
        why not; an interrupting request then cancels the running turn."""
        self.commands.append(cmd)
        outcome = decide_request(self.state, cmd, self.now(), self.new_id)
        if isinstance(outcome, Rejected):
            self.append([decide_rejection(self.state, cmd, outcome, self.now(), self.new_id)])
            self.refused.add(cmd.command_id)
            return
        self.append(outcome)
        if outcome:
            self.accepted.add(cmd.command_id)
        if outcome and getattr(outcome[0], "interrupts", False) and self.state.active:
            self.end_active(
                decide_cancelled(
                    self.state, "superseded", TurnTotals(7, 3), self.now(), self.new_id
                )
            )

    @rule(content=texts, busy=on_busy, user=users)
    def send(self, content: str, busy: OnBusy, user: str) -> None:
        self.request(
            SendMessage(
                conversation_id=CONV,
                command_id=self.new_id(),
                user_id=user,
                at=self.now(),
                message_id=self.new_id(),
                content=content,
                on_busy=busy,
            )
        )

    @precondition(lambda self: any(m.role == "user" for m in self.state.messages))
    @rule(pick=st.integers(0, 50), content=texts, busy=on_busy, user=users)
    def edit(self, pick: int, content: str, busy: OnBusy, user: str) -> None:
        mine = [m for m in self.state.messages if m.role == "user"]
        self.request(
            EditMessage(
                conversation_id=CONV,
                command_id=self.new_id(),
                user_id=user,
                at=self.now(),
                message_id=self.new_id(),
                edits=mine[pick % len(mine)].message_id,
                content=content,
                on_busy=busy,
            )
        )

    @precondition(lambda self: any(m.role == "assistant" for m in self.state.messages))
    @rule(pick=st.integers(0, 50), busy=on_busy, user=users)
    def regenerate(self, pick: int, busy: OnBusy, user: str) -> None:
        answers = [m for m in self.state.messages if m.role == "assistant"]
        self.request(
            Regenerate(
                conversation_id=CONV,
                command_id=self.new_id(),
                user_id=user,
                at=self.now(),
                message_id=answers[pick % len(answers)].message_id,
                on_busy=busy,
            )
        )

    @precondition(lambda self: bool(self.commands))
    @rule(pick=st.integers(0, 50))
    def redeliver(self, pick: int) -> None:
        """JetStream hands a command over again: the log already holds what it caused."""
        cmd = self.commands[pick % len(self.commands)]
        before = len(self.log)
        outcome = decide_request(self.state, cmd, self.now(), self.new_id)
        assert outcome == [], f"a redelivered {cmd!r} decided {outcome!r}"
        assert len(self.log) == before

    # ------------------------------------------------------------ turns

    @precondition(lambda self: next_turn(self.state) is not None and self.uncharged is None)
    @rule()
    def start(self) -> None:
        """The queue's head starts; a billed turn is reserved for, or refused."""
        queued = next_turn(self.state)
        assert queued is not None
        funded = bool(self.account_log.get(f"project:{PROJECT}"))
        payer = choose_payer(self.state, queued.user_id, funded)
        self.append(decide_start(self.state, queued, MODEL, self.now(), self.new_id, payer=payer))
        turn = self.state.active
        if turn is None:  # its message left the branch in force while it waited
            assert isinstance(self.log[-1], CommandRejected), self.log[-1]
            self.refused.add(queued.command_id)
            return
        assert turn.payer == payer
        if payer is None:
            return
        held = decide_reservation(
            self.account(payer), turn.turn_id, CONV, ESTIMATE, self.now(), self.new_id
        )
        if isinstance(held, Refused):
            self.append(
                [
                    decide_billing_rejected(
                        self.state, payer, held.needed, held.available, self.now(), self.new_id
                    )
                ]
            )
            return
        assert held is not None, "a new turn found a hold already taken for it"
        self.append_account(payer, held)

    @precondition(lambda self: self.state.active is not None)
    @rule(text=texts, thinking=st.booleans())
    def stream(self, text: str, thinking: bool) -> None:
        turn = self.state.active
        assert turn is not None
        self.append(
            [
                Chunk(
                    conversation_id=CONV,
                    at=self.now(),
                    event_id=self.new_id(),
                    turn_id=turn.turn_id,
                    kind="thinking" if thinking else "answer",
                    text=text,
                )
            ]
        )

    @precondition(lambda self: self.state.active is not None)
    @rule(failed=st.booleans())
    def use_a_tool(self, failed: bool) -> None:
        call = ToolCallRequest(call_id=self.new_id(), name="clock", arguments="{}")
        self.append([decide_tool_call(self.state, call, self.now(), self.new_id)])
        outcome = ToolOutcome(result=None if failed else "12:00", error="boom" if failed else None)
        self.append([decide_tool_result(self.state, call, outcome, 1.0, self.now(), self.new_id)])

    @precondition(lambda self: self.state.active is not None)
    @rule(
        how=st.sampled_from(ENDS),
        input_tokens=tokens,
        output_tokens=tokens,
        charge_fails=st.booleans(),
    )
    def end(self, how: str, input_tokens: int, output_tokens: int, charge_fails: bool) -> None:
        totals = TurnTotals(input_tokens, output_tokens)
        now = self.now()
        match how:
            case "done":
                ending: Event = decide_done(self.state, "stop", totals, now, self.new_id)
            case "user_cancel":
                ending = decide_cancelled(self.state, "user", totals, now, self.new_id)
            case "failed":
                ending = decide_failed(self.state, "model_error", "cut", totals, now, self.new_id)
            case _:
                ending = decide_orphan_end(self.state, now, self.new_id)
        self.end_active(ending, charge_fails=charge_fails)

    def end_active(self, ending: Event, *, charge_fails: bool = False) -> None:
        self.append([ending])
        assert self.state.active is None
        if self.state.last_billed is not None and not charge_fails:
            self.charge_last()
        elif self.state.last_billed is not None:
            self.uncharged = self.state.last_billed.turn_id

    @precondition(lambda self: self.uncharged is not None)
    @rule()
    def retry_charge(self) -> None:
        """The conversation is loaded again (or the log came back): the charge is retried."""
        self.charge_last()

    def charge_last(self) -> None:
        billed = self.state.last_billed
        assert billed is not None
        usage = Usage(
            input_tokens=billed.input_tokens,
            output_tokens=billed.output_tokens,
            estimated=billed.estimated,
            end=billed.end,
            user_id=billed.user_id,
            project_id=self.state.project_id,
        )
        for _ in range(2):  # a retried charge (its ack lost) must not charge twice
            charge = decide_charge(
                self.account(billed.payer),
                billed.turn_id,
                CONV,
                billed.prices,
                usage,
                self.now(),
                self.new_id,
            )
            if charge is not None:
                self.append_account(billed.payer, charge)
        self.uncharged = None

    # ------------------------------------------------------------ what must hold

    @invariant()
    def never_broken_never_two_turns(self) -> None:
        assert self.state.broken is None, self.state.broken
        open_turns: set[str] = set()
        for event in self.log:
            if isinstance(event, Started):
                assert not open_turns, f"{event.turn_id} started while {open_turns} ran"
                open_turns.add(event.turn_id)
            elif isinstance(event, Done | Cancelled | Failed | BillingRejected):
                open_turns.discard(event.turn_id)

    @invariant()
    def every_turn_ends_at_most_once(self) -> None:
        ends = Counter(
            e.turn_id
            for e in self.log
            if isinstance(e, Done | Cancelled | Failed | BillingRejected)
        )
        started = {e.turn_id for e in self.log if isinstance(e, Started)}
        assert all(n == 1 for n in ends.values()), ends
        assert set(ends) <= started, set(ends) - started

    @invariant()
    def versions_are_consistent(self) -> None:
        groups: dict[str, list[int]] = {}
        for m in self.state.messages:
            groups.setdefault(m.version_group_id, []).append(m.version_number)
        for group, numbers in groups.items():
            assert numbers == sorted(set(numbers)), f"group {group}: versions {numbers}"
        latest = list(latest_messages(self.state))
        in_force = Counter(m.version_group_id for m in latest)
        assert all(n == 1 for n in in_force.values()), in_force
        by_id = {m.message_id: m for m in self.state.messages}
        for m in latest:
            parent = by_id.get(m.parent_message_id) if m.parent_message_id else None
            assert m.parent_message_id is None or parent is not None, m
            assert parent is None or parent.is_latest, (
                f"{m.role} {m.message_id} is in force but grew from {parent.message_id}, "
                "which is not"
            )

    @invariant()
    def the_whole_log_folds_to_the_same_state(self) -> None:
        assert fold(Conversation(conversation_id=CONV), self.log) == self.state

    @invariant()
    def a_snapshot_folds_on_as_the_log_does(self) -> None:
        """What a snapshot keeps (actors.snapshots), read back, is the state; and the
        latest one taken, folded on with what came after it, is the whole log's state."""
        if self.state.exists and self.state.active is None:
            folded = Folded(self.state, seq=len(self.log), entries=len(self.log), event_id="e")
            read = decode_snapshot(encode_snapshot(folded))
            assert read is not None and read == folded
            self.snapshot = (len(self.log), read.state)
        if self.snapshot is not None:
            at, state = self.snapshot
            assert fold(state, self.log[at:]) == self.state

    @invariant()
    def billed_tokens_equal_consumed_tokens(self) -> None:
        starts = {e.turn_id: e for e in self.log if isinstance(e, Started)}
        consumed: dict[str, tuple[str, int, int]] = {}  # turn -> payer, input, output
        for e in self.log:
            if isinstance(e, Done | Cancelled | Failed) and starts[e.turn_id].payer:
                payer = starts[e.turn_id].payer
                assert payer is not None
                consumed[e.turn_id] = (payer, e.input_tokens, e.output_tokens)
        charged: dict[str, tuple[str, int, int]] = {}
        for name, events in self.account_log.items():
            for e in events:
                if isinstance(e, TurnCharged):
                    assert e.turn_id not in charged, f"turn {e.turn_id} charged twice"
                    charged[e.turn_id] = (name, e.input_tokens, e.output_tokens)
                    assert e.cost == turn_cost(e.input_tokens, e.output_tokens, PRICES)
        pending = {self.uncharged} if self.uncharged else set()
        assert set(charged) == set(consumed) - pending, (set(consumed), set(charged), pending)
        for turn, bill in charged.items():
            assert bill == consumed[turn], f"turn {turn}: consumed {consumed[turn]}, billed {bill}"
        for name, account in self.accounts.items():
            costs = sum(
                e.cost for e in self.account_log.get(name, []) if isinstance(e, TurnCharged)
            )
            assert account.balance == account.granted - costs
            holds = {turn for turn, _ in account.holds}
            active = self.state.active.turn_id if self.state.active else None
            assert holds <= {active, self.uncharged}, f"{name} holds {holds} for ended turns"

    @invariant()
    def every_accepted_request_is_queued_running_or_finished(self) -> None:
        queued = {q.command_id for q in self.state.queue}
        running = {self.state.active.command_id} if self.state.active else set()
        finished = set(self.state.commands_done)
        for command_id in self.accepted:
            assert command_id in queued | running | finished, command_id
        assert self.refused <= finished | self.refused

    def teardown(self) -> None:
        """Run everything out: every accepted request ends exactly once."""
        if not self.log:
            return
        if self.uncharged:
            self.charge_last()
        for _ in range(2 * len(self.accepted) + 2):
            if self.state.active is not None:
                self.end_active(
                    decide_done(self.state, "stop", TurnTotals(1, 1), self.now(), self.new_id)
                )
            elif next_turn(self.state) is not None:
                self.start()
        assert self.state.active is None and not self.state.queue
        assert self.accepted <= self.state.commands_done, self.accepted - self.state.commands_done
        self.billed_tokens_equal_consumed_tokens()
        self.versions_are_consistent()
        self.every_turn_ends_at_most_once()
        ended = Counter(
            e.turn_id
            for e in self.log
            if isinstance(e, Done | Cancelled | Failed | BillingRejected)
        )
        started = [e.turn_id for e in self.log if isinstance(e, Started)]
        assert all(ended[t] == 1 for t in started), "a started turn never ended"
        requests = [e for e in self.log if isinstance(e, UserMessage | AnswerRequested)]
        assert {e.command_id for e in requests} == self.accepted
        assert not {e.command_id for e in self.log if isinstance(e, CommandRejected)} & {
            s.command_id for s in self.log if isinstance(s, Started)
        }, "a refused command also ran"


TestConversationHistories = ConversationHistories.TestCase
TestConversationHistories.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
