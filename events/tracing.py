"""The request a piece of work is for, named in its log lines.

An edge gives each HTTP request an id (api/request_ids.py) and sets it here while
it serves the request; a command carries it to the worker, which sets it while it
handles the command and runs the turn it asked for. parley's log handler adds it
to every line as `request_id` (parley/logs.py): one id leads from a user's report
to the edge's lines and the worker's.
"""

from __future__ import annotations

from contextvars import ContextVar

# "" outside any request
REQUEST_ID: ContextVar[str] = ContextVar("parley_request_id", default="")
