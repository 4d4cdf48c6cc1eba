"""Connecting to NATS the one way every role does: reconnecting for ever.

A broker that restarts (the dev stack's supervisor, a rolling upgrade of a
cluster) must cost a role a pause, never its connection: the client tries again
every `RECONNECT_WAIT_S` without a limit, keeps what is published meanwhile in
its buffer (`pending_size`), and re-creates its subscriptions once back. A
connection that silently died (a peer behind a dropped network) is found by
pings: `PING_INTERVAL_S` x `MAX_OUTSTANDING_PINGS` without an answer.

What the caller does about the outage (log it, answer 503, wait) is its own
business: pass the callbacks. This module does not log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client

RECONNECT_WAIT_S = 1
PING_INTERVAL_S = 20
MAX_OUTSTANDING_PINGS = 3
CONNECT_TIMEOUT_S = 5

# (level, message, structured fields): the caller's logger, e.g.
# `lambda level, message, fields: log.log(level, message, extra=fields)`
Report = Callable[[int, str, dict[str, str]], None]


async def connect(url: str, name: str, report: Report | None = None) -> Client:
    """A client that reconnects for ever; the first connection must succeed.

    `report` hears of the connection's changes: lost and back (warnings, so an
    operator sees the outage and its end), and other client errors. Failed
    reconnect attempts are reported at debug level: one a second while a broker
    is down says nothing the first line did not.
    """
    fields = {"client": name}
    nc = Client()

    async def disconnected() -> None:
        if report is not None and not (nc.is_closed or nc.is_draining):
            report(logging.WARNING, "NATS connection lost; reconnecting", fields)

    async def reconnected() -> None:
        if report is not None:
            report(logging.WARNING, "NATS connection back", fields)

    async def error(err: Exception) -> None:
        if report is None:
            return
        attempt = isinstance(err, OSError | nats.errors.StaleConnectionError)
        level = logging.DEBUG if attempt else logging.WARNING
        report(level, "NATS client error", {**fields, "error": repr(err)})

    await nc.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT_S,
        ping_interval=PING_INTERVAL_S,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        connect_timeout=CONNECT_TIMEOUT_S,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
    )
    return nc
