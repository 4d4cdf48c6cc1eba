"""What a turn costs and what an account holds: arithmetic every reader of the log shares.

The actor reserves and charges with it, the projection writes the ledger with
it, and the audit recomputes both from the log alone with it, so all three
agree by construction. Pure: no I/O.

Prices are credits per million tokens; the ledger counts integer
micro-credits (1 credit = 1,000,000), so a turn costs
`input_tokens * input_price + output_tokens * output_price` micro-credits,
rounded up when the prices have decimals. Prices are read as the decimals
they were written as (3.3, not 3.29999...): `Fraction(str(price))`.

A turn is charged once, and every reader agrees on it by the same rule: the
first `turn_charged` of a turn counts, a later one for it counts nothing, and a
`credits_reserved` for a turn already charged holds nothing (the projection's
ledger is keyed by the turn, the audit's book too).

Why the fold remembers every turn it charged (`ChargedTurns`), not a recent
window or only the open holds. A second charge reaches an account's log only
if a writer decides it on a state that does not know the first: a resend of
the same append is dropped by its Nats-Msg-Id (within the stream's duplicate
window), and a writer refused by the single-writer check reads the account
again and decides on everything the subject holds. So the decision
(actors.billing) is exactly as good as what the fold remembers, and it is
asked about old turns: a conversation asks for its latest billed turn's
charge each time it is loaded (its worker may have died before charging it),
however long ago that turn ended and however many charges the account took
since; a stale worker may still charge or reserve a turn that another worker
already closed and charged. "No open hold" cannot stand for "charged"
either: a turn can be charged with no hold (it failed before its pre-flight,
its worker died before reserving, logs older than reservations have none).
Forgetting turns, by count or by age, would charge such a turn a second time
(and the projection would then disagree with the fold). Memory is one index
entry per charged turn, shared by every version of the account; a charge
adds one in O(1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from fractions import Fraction
from itertools import islice

import msgspec

from events.codec import Unreadable
from events.vocabulary import AnyEvent, CreditsGranted, CreditsReserved, Prices, TurnCharged

# The pre-flight (DESIGN section 4): a turn may start only if its account can
# afford this much at the price in force.
PREFLIGHT_INPUT_TOKENS = 500
PREFLIGHT_OUTPUT_TOKENS = 250


def turn_cost(input_tokens: int, output_tokens: int, prices: Prices) -> int:
    exact = input_tokens * Fraction(str(prices.input_price)) + output_tokens * Fraction(
        str(prices.output_price)
    )
    return math.ceil(exact)


def preflight_estimate(prices: Prices) -> int:
    return turn_cost(PREFLIGHT_INPUT_TOKENS, PREFLIGHT_OUTPUT_TOKENS, prices)


def user_account(user_id: str) -> str:
    return f"user:{user_id}"


def project_account(project_id: str) -> str:
    return f"project:{project_id}"


class ChargedTurns:
    """The turns one version of an account has charged: a set that costs O(1) to
    grow by one turn, where a frozenset copied all of them on every charge.

    Versions of an account share one index (turn -> the how-many-th charge it
    was), and each sees its first `len` entries: a turn is in a version if the
    index has it below that count. Growing the newest version (`len` == the
    index's size: how an account is folded, one version after another) adds
    the turn to the shared index in place. So an older version still sees
    exactly what it saw, the folds stay pure, and a turn is stored once in
    all versions. An older version grown again gets its own index (copied, its
    own entries only) unless it grows by the very turn that followed it (the
    same history folded again: a load that read the charge another coroutine
    already folded); in a worker that does not happen otherwise, since only the
    newest version of an account is ever appended to.
    """

    __slots__ = ("_index", "_len")

    def __init__(self, turns: Iterable[str] = ()) -> None:
        self._index: dict[str, int] = {}
        for turn_id in turns:
            self._index.setdefault(turn_id, len(self._index))
        self._len = len(self._index)

    @classmethod
    def _view(cls, index: dict[str, int], length: int) -> ChargedTurns:
        view = cls.__new__(cls)
        view._index, view._len = index, length
        return view

    def __contains__(self, turn_id: object) -> bool:
        if not isinstance(turn_id, str):
            return False
        at = self._index.get(turn_id)
        return at is not None and at < self._len

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        return islice(self._index, self._len)  # the index keeps the order of charging

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChargedTurns | AbstractSet):
            return len(self) == len(other) and all(turn in other for turn in self)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self))

    def __repr__(self) -> str:
        return f"ChargedTurns({list(self)!r})"

    def with_turn(self, turn_id: str) -> ChargedTurns:
        """This version and `turn_id`: O(1) (amortised: the dict grows by doubling), but
        for an older version taking another path, which copies its own entries."""
        if turn_id in self:
            return self
        index, length = self._index, self._len
        if len(index) == length:  # the newest version
            index[turn_id] = length
        elif index.get(turn_id) != length:  # not the turn the newer versions took next
            index = dict(islice(index.items(), length))
            index[turn_id] = length
        return ChargedTurns._view(index, length + 1)


class AccountState(msgspec.Struct, frozen=True):
    """One account, folded from its subject."""

    account: str
    granted: int = 0  # micro-credits ever granted
    charged: int = 0  # micro-credits ever charged
    holds: tuple[tuple[str, int], ...] = ()  # open reservations: (turn_id, amount)
    charged_turns: ChargedTurns = msgspec.field(default_factory=ChargedTurns)  # every turn charged
    events: int = 0

    @property
    def balance(self) -> int:
        """Granted minus charged; negative is debt."""
        return self.granted - self.charged

    @property
    def reserved(self) -> int:
        return sum(amount for _, amount in self.holds)

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    def hold_of(self, turn_id: str) -> int:
        return next((amount for turn, amount in self.holds if turn == turn_id), 0)


def evolve_account(state: AccountState, event: AnyEvent | Unreadable) -> AccountState:
    """Fold one entry of an account's subject; anything else there is ignored."""
    match event:
        case CreditsGranted():
            return msgspec.structs.replace(
                state, granted=state.granted + event.amount, events=state.events + 1
            )
        case CreditsReserved():
            if event.turn_id in state.charged_turns or state.hold_of(event.turn_id):
                return state
            return msgspec.structs.replace(
                state,
                holds=(*state.holds, (event.turn_id, event.amount)),
                events=state.events + 1,
            )
        case TurnCharged():
            if event.turn_id in state.charged_turns:
                return state  # charged once, whatever a retry wrote
            return msgspec.structs.replace(
                state,
                charged=state.charged + event.cost,
                holds=tuple(h for h in state.holds if h[0] != event.turn_id),
                charged_turns=state.charged_turns.with_turn(event.turn_id),
                events=state.events + 1,
            )
        case _:
            return state
