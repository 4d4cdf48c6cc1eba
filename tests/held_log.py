"""The real event log, made to hold chosen events open until a test lets them go.

Nothing is faked: a held event waits at a gate, then goes to JetStream as any
event does, one at a time (so the events before it in its append are in the log
meanwhile). Tests use it to stand in the moment between two appends, which under
load lasts long enough to matter (a loaded worker's round trip to NATS: 200 ms
p50 at 1,000 turns) and on an idle machine too short to hit by chance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from nats.js import JetStreamContext

from events.log import EventLog
from events.vocabulary import Event

HOLD_S = 10.0


class Hold:
    """Events that `picks` (given each as a list of one) wait for `gate` (at most
    HOLD_S) while `on` is set; `holding` is set once one does."""

    def __init__(self, picks: Callable[[Sequence[Event]], bool]) -> None:
        self.picks = picks
        self.on = False
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()


class HeldLog(EventLog):
    """The real log, whose events wait at each of `holds` that picks them."""

    def __init__(self, js: JetStreamContext, *holds: Hold) -> None:
        super().__init__(js)
        self.holds = holds

    async def append_to(self, subject: str, events: Sequence[Event], expected_seq: int) -> int:
        last = expected_seq
        for event in events:
            for hold in self.holds:
                if hold.on and hold.picks([event]):
                    hold.holding.set()
                    async with asyncio.timeout(HOLD_S):
                        await hold.gate.wait()
            last = await super().append_to(subject, [event], last)
        return last
