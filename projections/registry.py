"""What a projection is: a name, the tables it owns, and one handler per event type.

A projection turns events into rows. Its handlers are registered per event
class (`@projection.on(UserMessage)`), each with its SQL beside it, in a module
of handlers (`projections/handlers.py` for the read models). A handler is pure:
given an event and its position it returns the statements (`Write`s) that apply
it, and the projector (`projections/projector.py`) runs them inside its
transaction. An event class with no handler is ignored by that projection: that
is how a projection says "this event changes none of my rows".

`conversation_local` is a promise about every handler of the projection: it
writes only rows of its own event's conversation. Events of different
conversations then commute, and the projector may run a batch's statements
grouped by kind (one `executemany` per kind) while keeping each conversation's
own order; without the promise it runs them in log order. A handler that
writes shared rows (an account's balance, a project) belongs in a projection
without it.

`tables` and `ddl` say what a rebuild replaces (`projections/rebuild.py`): the
tables a projection owns are created by its DDL file and nothing else writes
them. Tables that are configuration (models, prices) belong to no projection.

A deleted conversation's tombstone (`conversation_deleted`) also takes, in every
projection, the records of its events that projection could not apply
(`projection_errors`, which keep each such event's bytes): its content goes
from everywhere, and a rebuild of the purged log records none of them.

Nothing here does I/O: this module is the shape, not the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from events.vocabulary import ConversationDeleted, Event

E = TypeVar("E", bound=Event)


class Write(NamedTuple):
    """One statement and its arguments, for the projector to run."""

    sql: str
    args: tuple[Any, ...]


def write(sql: str, *args: Any) -> Write:
    return Write(sql, args)


# handler(seq, event) -> the writes that apply the event; `seq` is its position in CHAT_EVT.
Handler = Callable[[int, E], Sequence[Write]]
H = TypeVar("H", bound=Handler[Any])

_FORGET_ERRORS = "DELETE FROM projection_errors WHERE projection = $1 AND conversation_id = $2"


class Projection:
    """A named set of tables and the handlers that fill them from the log."""

    def __init__(
        self, name: str, *, tables: tuple[str, ...], ddl: str, conversation_local: bool = False
    ) -> None:
        self.name = name
        self.tables = tables  # owned: a rebuild replaces exactly these
        self.ddl = ddl  # file in this package that creates them (CREATE ... IF NOT EXISTS)
        self.conversation_local = conversation_local  # see the module docstring
        self._handlers: dict[type[Event], Handler[Any]] = {}

    def on(self, *kinds: type[Event]) -> Callable[[H], H]:
        """Register the decorated function as the handler of `kinds`; one handler per kind.

        The handler's own annotation names the event type(s) it takes.
        """

        def register(handler: H) -> H:
            for kind in kinds:
                if kind in self._handlers:
                    raise ValueError(f"{self.name}: {kind.__name__} already has a handler")
                self._handlers[kind] = handler
            return handler

        return register

    def writes(self, seq: int, event: Event) -> Sequence[Write]:
        """What applying `event` takes: its handler's writes, none if it has no handler."""
        handler = self._handlers.get(type(event))
        writes = () if handler is None else handler(seq, event)
        if isinstance(event, ConversationDeleted):
            # what this projection recorded of the conversation's unapplied events
            return [*writes, write(_FORGET_ERRORS, self.name, event.conversation_id)]
        return writes

    @property
    def handled(self) -> frozenset[type[Event]]:
        return frozenset(self._handlers)
