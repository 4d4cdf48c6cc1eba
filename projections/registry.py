"""What a projection is: a name, the tables it owns, and one handler per event type.

A projection turns events into rows. Its handlers are registered per event
class (`@projection.on(UserMessage)`), each with its SQL beside it, in a module
of handlers (`projections/handlers.py` for the read models); the projector
(`projections/projector.py`) looks the handler up by the event's class and runs
it inside its transaction. An event class with no handler is ignored by that
projection: that is how a projection says "this event changes none of my rows".

`tables` and `ddl` say what a rebuild replaces (`projections/rebuild.py`): the
tables a projection owns are created by its DDL file and nothing else writes
them. Tables that are configuration (models, prices) belong to no projection.

Nothing here does I/O: this module is the shape, not the work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from events.vocabulary import Event

E = TypeVar("E", bound=Event)


class Db(Protocol):
    """What a handler may do with the projector's connection: run statements inside
    the transaction the projector opened (never open, commit or roll back one)."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...


# handler(db, seq, event): apply one event; `seq` is its position in CHAT_EVT.
Handler = Callable[[Db, int, E], Awaitable[None]]
H = TypeVar("H", bound=Handler[Any])


class Projection:
    """A named set of tables and the handlers that fill them from the log."""

    def __init__(self, name: str, *, tables: tuple[str, ...], ddl: str) -> None:
        self.name = name
        self.tables = tables  # owned: a rebuild replaces exactly these
        self.ddl = ddl  # file in this package that creates them (CREATE ... IF NOT EXISTS)
        self._handlers: dict[type[Event], Handler[Any]] = {}

    def on(self, *kinds: type[Event]) -> Callable[[H], H]:
        """Register the decorated coroutine as the handler of `kinds`; one handler per kind.

        The handler's own annotation names the event type(s) it takes.
        """

        def register(handler: H) -> H:
            for kind in kinds:
                if kind in self._handlers:
                    raise ValueError(f"{self.name}: {kind.__name__} already has a handler")
                self._handlers[kind] = handler
            return handler

        return register

    def handler(self, event: Event) -> Handler[Any] | None:
        return self._handlers.get(type(event))

    @property
    def handled(self) -> frozenset[type[Event]]:
        return frozenset(self._handlers)
