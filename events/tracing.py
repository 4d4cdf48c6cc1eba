"""The request a piece of work is for, named in its log lines.

An edge gives each HTTP request an id (api/request_ids.py) and sets it here while
it serves the request; a command carries it to the worker, which sets it while it
handles the command and runs the turn it asked for. parley's log handler adds it
to every line as `request_id` (parley/logs.py): one id leads from a user's report
to the edge's lines and the worker's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from contextvars import ContextVar

# "" outside any request
REQUEST_ID: ContextVar[str] = ContextVar("parley_request_id", default="")


@contextlib.contextmanager
def naming(request_id: str) -> Iterator[None]:
    """Within the block, log lines name `request_id` ("": none)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def unnamed_context() -> contextvars.Context:
    """A copy of the current context that names no request: for a task that outlives
    the request that starts it and serves many (a hub, a queue's drain, a shared check)."""
    context = contextvars.copy_context()
    context.run(REQUEST_ID.set, "")
    return context
