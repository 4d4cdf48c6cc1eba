"""Reserving and charging credits: each account written like a conversation.

Every account (a user's, a project's) has its own subject in the log, and its
grants, reservations and charges are events appended with the same
single-writer check as a conversation's (`Nats-Expected-Last-Subject-Sequence`).
So two turns starting at once against the last credits cannot both reserve
them: the second append is refused, the writer reloads, decides again on the
account as it now is, and is refused for want of credits. Turns finishing at
once cannot lose an update the same way, and a retried charge is a no-op (the
fold knows the turn was charged).

`decide_*` are pure; `Accounts` is the shell (a worker's cache of folded
accounts, so a busy account is not re-read from its first event every time).

Within one worker the turns of an account take turns at it: each reservation or
charge holds the account's lock from its load to its append. The log's check
would keep them apart as well, but at the cost of a refused append for every
turn that lost the race, and `_ATTEMPTS` of those in a row ended a turn as if
its worker had died: a project's twelve members asking at once lost one turn in
twenty-five. Now a refusal means another process (a worker, a grant) appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import msgspec

from events.billing import AccountState, evolve_account, turn_cost
from events.codec import decode_entry
from events.errors import EventLogConflict
from events.log import EventLog
from events.subjects import account_subject
from events.vocabulary import CreditsReserved, Prices, TurnCharged

log = logging.getLogger(__name__)

NewId = Callable[[], str]
_ATTEMPTS = 8  # conflicts in a row before giving up: each one means another writer moved on


class Refused(msgspec.Struct, frozen=True):
    """The account cannot afford the pre-flight estimate."""

    account: str
    needed: int
    available: int


def decide_reservation(
    state: AccountState,
    turn_id: str,
    conversation_id: str,
    amount: int,
    now: int,
    new_id: NewId,
) -> CreditsReserved | Refused | None:
    """Hold `amount` for a turn if the account can afford it; None if already held."""
    if state.hold_of(turn_id) or turn_id in state.charged_turns:
        return None
    if state.available < amount:
        return Refused(account=state.account, needed=amount, available=state.available)
    return CreditsReserved(
        conversation_id=conversation_id,
        at=now,
        event_id=new_id(),
        account=state.account,
        turn_id=turn_id,
        amount=amount,
    )


class Usage(msgspec.Struct, frozen=True):
    """What a turn consumed, as its end event says, and who it was for."""

    input_tokens: int
    output_tokens: int
    estimated: bool
    end: str  # done | cancelled | failed
    user_id: str = ""
    project_id: str | None = None


def decide_charge(
    state: AccountState,
    turn_id: str,
    conversation_id: str,
    prices: Prices,
    usage: Usage,
    now: int,
    new_id: NewId,
) -> TurnCharged | None:
    """The turn's one charge, at the prices recorded when it started; None once charged."""
    if turn_id in state.charged_turns:
        return None
    return TurnCharged(
        conversation_id=conversation_id,
        at=now,
        event_id=new_id(),
        account=state.account,
        turn_id=turn_id,
        cost=turn_cost(usage.input_tokens, usage.output_tokens, prices),
        reserved=state.hold_of(turn_id),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        input_price=prices.input_price,
        output_price=prices.output_price,
        tokens_estimated=usage.estimated,
        end=usage.end,
        user_id=usage.user_id,
        project_id=usage.project_id,
    )


class Accounts:
    def __init__(
        self,
        event_log: EventLog,
        clock: Callable[[], int],
        new_id: NewId,
        *,
        kept: int = 10_000,
    ) -> None:
        self._log = event_log
        self._clock = clock
        self._new_id = new_id
        self._states: OrderedDict[str, tuple[AccountState, int]] = OrderedDict()
        self._kept = kept
        # one lock per account a reservation or charge, or a load, is under way for,
        # with how many hold or wait for it (dropped when none does)
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self._loads: dict[str, tuple[asyncio.Lock, int]] = {}

    async def state(self, account: str) -> AccountState:
        state, _ = await self._load(account)
        return state

    async def reserve(
        self, account: str, turn_id: str, conversation_id: str, amount: int
    ) -> Refused | None:
        """Hold the estimate for the turn; the refusal when the account cannot afford it."""
        async with _held(self._turns, account):
            return await self._reserve(account, turn_id, conversation_id, amount)

    async def _reserve(
        self, account: str, turn_id: str, conversation_id: str, amount: int
    ) -> Refused | None:
        for _ in range(_ATTEMPTS):
            state, seq = await self._load(account)
            decision = decide_reservation(
                state, turn_id, conversation_id, amount, self._clock(), self._new_id
            )
            if decision is None:
                return None
            if isinstance(decision, Refused):
                return decision
            if await self._append(account, state, seq, decision):
                return None
        raise EventLogConflict(account, -1, "the account kept moving; try again")

    async def charge(
        self, account: str, turn_id: str, conversation_id: str, prices: Prices, usage: Usage
    ) -> TurnCharged | None:
        """Charge the turn once (a repeat finds it charged and does nothing)."""
        async with _held(self._turns, account):
            return await self._charge(account, turn_id, conversation_id, prices, usage)

    async def _charge(
        self, account: str, turn_id: str, conversation_id: str, prices: Prices, usage: Usage
    ) -> TurnCharged | None:
        for _ in range(_ATTEMPTS):
            state, seq = await self._load(account)
            decision = decide_charge(
                state, turn_id, conversation_id, prices, usage, self._clock(), self._new_id
            )
            if decision is None:
                return None
            if await self._append(account, state, seq, decision):
                return decision
        raise EventLogConflict(account, -1, "the account kept moving; try again")

    async def _load(self, account: str) -> tuple[AccountState, int]:
        """The account as its subject now says: the cached state, and what follows it.

        Read and folded a batch at a time, so a long subject (a busy account
        loaded after a restart, or after it left the cache) lets the worker's
        other work in between batches instead of holding its loop for all of it.
        The turns of one account start, reserve and are charged side by side, so
        its loads would overlap: they take turns instead, and each starts from the
        state the one before it kept. Two at once would both fold the subject from
        where the cache was (from its first event when the worker has not loaded the
        account yet: twelve turns of a project at its 25,000th turn folded 50,000
        entries each, a turn took 24 s).
        """
        async with _held(self._loads, account):
            state, seq = self._states.get(account, (AccountState(account=account), 0))
            subject = account_subject(account)
            while True:
                batch, pending = await self._log.read_events(subject, seq)
                for entry in batch:
                    state = evolve_account(state, decode_entry(entry.data))
                    seq = entry.seq
                if not batch or pending == 0:
                    break
            self._keep(account, state, seq)
            return state, seq

    async def _append(
        self, account: str, state: AccountState, seq: int, event: CreditsReserved | TurnCharged
    ) -> bool:
        try:
            new_seq = await self._log.append_to(account_subject(account), [event], seq)
        except EventLogConflict:
            log.info("account moved on; deciding again", extra={"account": account})
            return False
        self._keep(account, evolve_account(state, event), new_seq)
        return True

    def _keep(self, account: str, state: AccountState, seq: int) -> None:
        kept = self._states.get(account)
        if kept is None or kept[1] <= seq:  # a load that read less keeps no older state
            self._states[account] = (state, seq)
        self._states.move_to_end(account)
        while len(self._states) > self._kept:
            self._states.popitem(last=False)


@contextlib.asynccontextmanager
async def _held(locks: dict[str, tuple[asyncio.Lock, int]], account: str) -> AsyncIterator[None]:
    """Hold `account`'s lock of `locks` against the others of this worker."""
    lock, users = locks.get(account, (asyncio.Lock(), 0))
    locks[account] = (lock, users + 1)
    try:
        async with lock:
            yield
    finally:
        lock, users = locks[account]
        if users == 1:
            del locks[account]
        else:
            locks[account] = (lock, users - 1)
