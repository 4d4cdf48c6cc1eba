"""Connecting to NATS the one way every role does: any node of a cluster, reconnecting for ever.

`PARLEY_NATS_URL` holds one URL or a comma-separated list of the nodes of one
cluster (`nats://n1:4222,nats://n2:4222,nats://n3:4222`). The client connects
to the first one that answers, in the order given (so each process can be told
which node it prefers), learns the rest of the cluster from the server, and
moves to another node when its node goes away.

A broker that restarts (the dev stack's supervisor, a rolling upgrade of a
cluster) must cost a role a pause, never its connection: the client tries again
every `RECONNECT_WAIT_S` without a limit, keeps what is published meanwhile in
its buffer (`pending_size`), and re-creates its subscriptions once back. A
JetStream request that gets no answer in time is the caller's to retry
(events.log does, safely: every append carries its Nats-Msg-Id). A connection
that silently died (a peer behind a dropped network) is found by pings:
`PING_INTERVAL_S` x `MAX_OUTSTANDING_PINGS` without an answer.

What the caller does about an outage (log it, answer 503, wait) is its own
business: pass `report`. This module does not log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NatsClient

from events.errors import describe

# Between two rounds of attempts over the whole list of nodes.
RECONNECT_WAIT_S = 1
# A one-shot command gives up after this many rounds: an operator who ran it against a
# server that is away hears so in seconds (nats.py's default, 60, kept them waiting
# silently for a minute).
COMMAND_RECONNECTS = 5
PING_INTERVAL_S = 20
MAX_OUTSTANDING_PINGS = 3
CONNECT_TIMEOUT_S = 5
WAITING_REPORT_S = 10.0

C = TypeVar("C", bound=NatsClient)


class BrokerRefused(Exception):
    """Every server named refused the connection's credentials before it ever connected.

    A wrong user, password or token in the URL is configuration, not an outage:
    waiting for it, as for a broker that is away, would wait for ever.
    """


def _is_authorization_violation(err: Exception) -> bool:
    # During the first connection nats.py raises the server's -ERR as a plain Error
    # ("nats: 'Authorization Violation'"); once connected, as AuthorizationError.
    return isinstance(err, nats.errors.AuthorizationError) or (
        isinstance(err, nats.errors.Error) and "authorization violation" in str(err).lower()
    )


# (level, message, structured fields): the caller's logger, e.g.
# `lambda level, message, fields: log.log(level, message, extra=fields)`
Report = Callable[[int, str, dict[str, str]], None]


def server_list(url: str) -> list[str]:
    """The nodes named in a `PARLEY_NATS_URL`, in order; blanks and spaces ignored."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def connect(
    url: str, *, name: str, report: Report | None = None, reconnect_forever: bool = True
) -> NatsClient:
    """A connection to the server(s) of `url`; the first connection must succeed.

    Roles (edge, worker, projector) reconnect for ever: a broker that is away is
    waited for, never a reason to stop. One-shot commands (`replay`, `audit`)
    pass `reconnect_forever=False` and fail after the client's usual attempts.
    """
    return await connect_client(
        DirectClient(), url, name=name, report=report, reconnect_forever=reconnect_forever
    )


async def connect_client(
    client: C,
    url: str,
    *,
    name: str,
    report: Report | None = None,
    reconnect_forever: bool = True,
) -> C:
    """`connect`, for a client of a class of the caller's (the projectors' `EntryClient`,
    projections/feed.py): the same nodes in the same order, the same reconnects.

    `report` hears of the connection's changes: lost and back (warnings, so an
    operator sees the outage and its end), and other client errors. Failed
    reconnect attempts are reported at debug level: one a second while a broker
    is down says nothing the first line did not.
    """
    fields = {"client": name}
    # Until the first connection, a failed attempt is a warning (at most one per
    # WAITING_REPORT_S): a process that waits for a broker that is not there says so.
    waiting_reported = -WAITING_REPORT_S
    ever_connected = False
    servers = server_list(url)
    refusals = 0  # authorization violations before the first connection

    async def disconnected() -> None:
        if report is not None and not (client.is_closed or client.is_draining):
            report(logging.WARNING, "NATS connection lost; reconnecting", fields)

    async def reconnected() -> None:
        if report is not None:
            report(logging.WARNING, "NATS connection back", fields)

    async def error(err: Exception) -> None:
        nonlocal waiting_reported, refusals
        if not ever_connected and _is_authorization_violation(err):
            refusals += 1
            if refusals >= len(servers):
                # raised out of the client's first connect, which awaits this callback
                raise BrokerRefused(
                    "NATS refused the credentials of PARLEY_NATS_URL (Authorization "
                    "Violation): give each URL the user and password the servers know, "
                    "nats://user:password@host:4222, or a token, nats://token@host:4222"
                )
        if report is None:
            return
        attempt = isinstance(err, OSError | nats.errors.StaleConnectionError)
        now = time.monotonic()
        if attempt and not ever_connected:
            if now - waiting_reported >= WAITING_REPORT_S:
                waiting_reported = now
                report(
                    logging.WARNING,
                    "NATS not reachable yet; still trying",
                    {**fields, "error": describe(err)},
                )
            return
        level = logging.DEBUG if attempt else logging.WARNING
        report(level, "NATS client error", {**fields, "error": describe(err)})

    try:
        await client.connect(
            servers=servers,
            name=name,
            # The order of the list is the operator's preference, not a suggestion.
            dont_randomize=True,
            reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=-1 if reconnect_forever else COMMAND_RECONNECTS,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            connect_timeout=CONNECT_TIMEOUT_S,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
    except BrokerRefused:
        await client.close()
        raise
    ever_connected = True
    return client


# (subject, reply, payload, raw headers) of one message, straight from the client's
# read loop; the headers unparsed ("NATS/1.0 204 EOB\r\n...", b"" for none)
DirectHandler = Callable[[bytes, bytes, bytes, bytes], None]


class DirectClient(NatsClient):
    """A NATS client that can hand a subscription's messages straight to a function.

    nats.py delivers each message of a callback subscription by building a
    `Msg`, putting it on the subscription's queue and waking the subscription's
    task to await the callback. Two kinds of message arrive by the thousand per
    second: the entries an edge's followers receive (events.follow) and the
    acks of a worker's appends (events.publisher). For those,
    `deliver_directly` calls a plain function from the client's read loop: no
    object, no queue, no task switch (py-spy put nats.py's delivery path at
    12-14% of the edge's samples under `parley bench capacity`). Messages with
    a status line (no responders, heartbeats) still take the usual way to the
    subscription's callback, which the subscription must therefore have,
    unless it asks for them too (`statuses=True`: a plain inbox that reads its
    own answers, events.replies). Should a nats.py upgrade rename the hook,
    messages only take the slower way, never a wrong one
    (tests/test_broker_delivery.py checks it applies).
    """

    def __init__(self) -> None:
        super().__init__()
        # sid -> (handler, whether status messages go to it too)
        self._direct: dict[int, tuple[DirectHandler, bool]] = {}

    def deliver_directly(self, sub: Any, handler: DirectHandler, *, statuses: bool = False) -> None:
        self._direct[sub._id] = (handler, statuses)

    def deliver_as_usual(self, sub: Any) -> None:
        self._direct.pop(sub._id, None)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        # `headers` is None for a message without any, whatever nats.py's annotation says
        direct = self._direct.get(sid)
        if direct is not None and (direct[1] or not _is_status(headers)):
            direct[0](subject, reply, data, headers or b"")
            return
        await super()._process_msg(sid, subject, reply, data, headers)


class EntryClient(DirectClient):
    """A NATS client for connections that read log entries and nothing else: the
    projectors' pulls (projections/feed.py) and the edge's followers (api/hub.py;
    their entries come through `deliver_directly`, which parses no headers at all).

    Every entry an append wrote carries three headers, which nats.py would parse
    into a dict for every message; these readers never look at them. Headers of
    ordinary messages are left unparsed (`msg.headers` is None); status lines
    (`NATS/1.0 408 ...`: the server ending a pull request, no responders,
    heartbeats) are parsed as usual, which is all the pull protocol and the
    JetStream API calls on such a connection need. Not for direct gets, whose
    answers carry their position in headers. Should a nats.py upgrade rename
    the hook, this client only gets slower, never wrong (tests/test_feed.py
    checks that it still applies).
    """

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        if _is_status(headers):
            parsed: dict[str, str] | None = await super()._process_headers(headers)
            return parsed
        return None


def _is_status(headers: bytes | None) -> bool:
    # "NATS/1.0 408 Request Timeout\r\n..." is a status; "NATS/1.0\r\n..." headers
    return headers is not None and headers[_STATUS_AT : _STATUS_AT + 1] == b" "


_STATUS_AT = len(b"NATS/1.0")
