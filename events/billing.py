"""What a turn costs and what an account holds: arithmetic every reader of the log shares.

The actor reserves and charges with it, the projection writes the ledger with
it, and the audit recomputes both from the log alone with it, so all three
agree by construction. Pure: no I/O.

Prices are credits per million tokens; the ledger counts integer
micro-credits (1 credit = 1,000,000), so a turn costs
`input_tokens * input_price + output_tokens * output_price` micro-credits,
rounded up when the prices have decimals. Prices are read as the decimals
they were written as (3.3, not 3.29999...): `Fraction(str(price))`.
"""

from __future__ import annotations

import math
from fractions import Fraction

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


class AccountState(msgspec.Struct, frozen=True):
    """One account, folded from its subject."""

    account: str
    granted: int = 0  # micro-credits ever granted
    charged: int = 0  # micro-credits ever charged
    holds: tuple[tuple[str, int], ...] = ()  # open reservations: (turn_id, amount)
    charged_turns: frozenset[str] = frozenset()
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
                charged_turns=state.charged_turns | {event.turn_id},
                events=state.events + 1,
            )
        case _:
            return state
