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

Beyond the URL, a connection may need TLS with the team's own certificate
authority, a client certificate (mutual TLS), and NATS decentralised auth (a
user's `.creds` file, or an NKey seed): `NatsSecurity`, file paths only, read
when a connection is made. What no wait mends stops the first connection with
`BrokerRefused`: credentials every server refuses, a server certificate that
does not verify, a client certificate the server wants and was not given or
does not accept, a server that offers no TLS where TLS was asked for (the
credentials are never sent to it in the clear).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nkeys
from nats.aio.client import DEFAULT_BUFFER_SIZE
from nats.aio.client import Client as NatsClient
from nats.aio.transport import TcpTransport

from events.errors import SettingFileUnreadable, describe, read_setting_file

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
CLOSE_TIMEOUT_S = 0.25
# How long a connection may drain when its process stops (`finish`).
FINISH_WITHIN_S = 2.0

C = TypeVar("C", bound="DirectClient")


class BrokerRefused(Exception):
    """Every server named refused the connection's credentials or its TLS before it ever
    connected.

    A wrong user, password or token in the URL, a `.creds` file of an account the
    servers do not know, a certificate that does not verify: configuration, not an
    outage. Waiting for it, as for a broker that is away, would wait for ever.
    """


class NatsSecurity(msgspec.Struct, frozen=True, kw_only=True):
    """How a connection proves whom it talks to and who it is, beyond the URL.

    Paths of files, never their contents, so that nothing secret is in a setting
    that may be printed: `tls_ca` (PARLEY_NATS_TLS_CA) the PEM bundle of the
    certificate authorities the servers' certificates are checked against (unset:
    the system's); `tls_cert` and `tls_key` (PARLEY_NATS_TLS_CERT,
    PARLEY_NATS_TLS_KEY) a client certificate for mutual TLS; `creds`
    (PARLEY_NATS_CREDS) a user's JWT and NKey seed as `nsc` writes them; `nkey`
    (PARLEY_NATS_NKEY) a file holding a user's NKey seed alone.
    """

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    creds: str | None = None
    nkey: str | None = None

    @property
    def tls(self) -> bool:
        """TLS was asked for by a setting (a `tls://` URL asks for it too)."""
        return self.tls_ca is not None or self.tls_cert is not None


def tls_context(security: NatsSecurity) -> ssl.SSLContext | None:
    """The context of `security`'s TLS settings, or None (none given: nats.py's default,
    the system's authorities). Raises OSError or ssl.SSLError for a bad file."""
    if not security.tls:
        return None
    context = ssl.create_default_context(cafile=security.tls_ca)
    if security.tls_cert is not None:
        context.load_cert_chain(security.tls_cert, security.tls_key)
    return context


def security_problem(security: NatsSecurity) -> str | None:
    """What is wrong with `security`'s settings and files, in one line, or None.

    Checked at start, so that a file that is missing, unreadable or not what it
    should be is named before any connection is tried. Never quotes a file's content.
    """
    if security.creds is not None and security.nkey is not None:
        return "PARLEY_NATS_CREDS and PARLEY_NATS_NKEY are two ways to sign in: set one"
    if (security.tls_cert is None) != (security.tls_key is None):
        return (
            "PARLEY_NATS_TLS_CERT and PARLEY_NATS_TLS_KEY go together: the client "
            "certificate and its private key"
        )
    files = {
        "PARLEY_NATS_TLS_CA": security.tls_ca,
        "PARLEY_NATS_TLS_CERT": security.tls_cert,
        "PARLEY_NATS_TLS_KEY": security.tls_key,
        "PARLEY_NATS_CREDS": security.creds,
        "PARLEY_NATS_NKEY": security.nkey,
    }
    contents: dict[str, bytes] = {}
    for name, path in files.items():
        if path is None:
            continue
        try:
            contents[name] = read_setting_file(name, path)
        except SettingFileUnreadable as err:
            return str(err)
    try:
        ssl.create_default_context(cafile=security.tls_ca)
    except (ssl.SSLError, OSError) as err:
        return f"PARLEY_NATS_TLS_CA: {security.tls_ca} holds no PEM certificate ({describe(err)})"
    try:
        tls_context(security)
    except (ssl.SSLError, OSError) as err:
        if "KEY_VALUES_MISMATCH" in str(err):
            return "PARLEY_NATS_TLS_KEY is not the private key of PARLEY_NATS_TLS_CERT"
        return (
            "PARLEY_NATS_TLS_CERT and PARLEY_NATS_TLS_KEY cannot be loaded as a PEM "
            f"certificate and its unencrypted key ({describe(err)})"
        )
    if security.creds is not None and not _is_creds(contents["PARLEY_NATS_CREDS"]):
        return (
            f"PARLEY_NATS_CREDS: {security.creds} is not a NATS credentials file (a user "
            "JWT and an NKey seed between -----BEGIN ...----- lines, as `nsc` writes them)"
        )
    if security.nkey is not None and not _is_user_seed(contents["PARLEY_NATS_NKEY"].strip()):
        return (
            f"PARLEY_NATS_NKEY: {security.nkey} does not hold a user's NKey seed "
            "(one line starting with SU)"
        )
    return None


def _is_creds(content: bytes) -> bool:
    lines = content.splitlines()
    try:
        jwt = lines[lines.index(b"-----BEGIN NATS USER JWT-----") + 1].strip()
        seed = lines[lines.index(b"-----BEGIN USER NKEY SEED-----") + 1].strip()
    except (ValueError, IndexError):
        return False
    return jwt.count(b".") == 2 and _is_user_seed(seed)


def _is_user_seed(seed: bytes) -> bool:
    if not seed.startswith(b"SU"):
        return False
    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except (nkeys.NkeysError, ValueError):
        return False
    return True


def _refused_hint(security: NatsSecurity) -> str:
    if security.creds is not None:
        return (
            "NATS refused the user of PARLEY_NATS_CREDS (Authorization Violation): is its "
            "account known to the servers (the operator's resolver), and the file current?"
        )
    if security.nkey is not None:
        return (
            "NATS refused the NKey of PARLEY_NATS_NKEY (Authorization Violation): give the "
            "servers its public key among their users"
        )
    return (
        "NATS refused the credentials of PARLEY_NATS_URL (Authorization "
        "Violation): give each URL the user and password the servers know, "
        "nats://user:password@host:4222, or a token, nats://token@host:4222"
    )


def _tls_refusal(err: Exception, client: DirectClient, security: NatsSecurity) -> str | None:
    """Why a TLS failure of a first connection is configuration, or None (an outage)."""
    if isinstance(err, TlsNotOffered):
        return str(err)
    if isinstance(err, ssl.SSLCertVerificationError):
        against = (
            "PARLEY_NATS_TLS_CA" if security.tls_ca is not None else "the system's authorities"
        )
        return (
            f"the NATS server's certificate did not verify against {against} "
            f"({err.verify_message}): set PARLEY_NATS_TLS_CA to the PEM file of the "
            "authority that signed it, and name the server as its certificate does"
        )
    info = client.server_info
    wants_cert = bool(info.get("tls_verify")) and bool(info.get("tls_required"))
    if wants_cert and security.tls_cert is None:
        return (
            "the NATS server requires a client certificate (mutual TLS): set "
            "PARLEY_NATS_TLS_CERT and PARLEY_NATS_TLS_KEY"
        )
    if isinstance(err, ssl.SSLError) and "ALERT" in (err.reason or "") and wants_cert:
        return (
            "the NATS server did not accept the client certificate of PARLEY_NATS_TLS_CERT "
            f"({err.reason}): it must be signed by an authority the server trusts"
        )
    return None


class TlsNotOffered(nats.errors.Error):
    """TLS was asked for, and the server answered without it: nothing was sent."""

    def __str__(self) -> str:
        return (
            "the NATS server offers no TLS, and a tls:// URL or PARLEY_NATS_TLS_* asks for "
            "it: the connection was dropped before any credentials went out in the clear "
            "(give the server a `tls` block, or connect with nats:// and no TLS settings)"
        )


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
    url: str,
    *,
    name: str,
    report: Report | None = None,
    reconnect_forever: bool = True,
    security: NatsSecurity | None = None,
) -> DirectClient:
    """A connection to the server(s) of `url`; the first connection must succeed.

    Roles (edge, worker, projector) reconnect for ever: a broker that is away is
    waited for, never a reason to stop. One-shot commands (`replay`, `audit`)
    pass `reconnect_forever=False` and fail after the client's usual attempts.
    """
    return await connect_client(
        DirectClient(),
        url,
        name=name,
        report=report,
        reconnect_forever=reconnect_forever,
        security=security,
    )


async def connect_client(
    client: C,
    url: str,
    *,
    name: str,
    report: Report | None = None,
    reconnect_forever: bool = True,
    security: NatsSecurity | None = None,
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
    security = security or NatsSecurity()
    refusals = 0  # authorization violations before the first connection
    # Asked for TLS: a server that offers none gets no CONNECT (DirectClient._connect_command)
    client.require_tls = security.tls or any(s.lower().startswith("tls://") for s in servers)

    # Once connected: when the connection was lost (None while connected), when a
    # failed attempt to get it back was last said at warning level, and whether a
    # refusal was said since
    lost_at: float | None = None
    away_reported = 0.0
    refusal_said = False

    async def disconnected() -> None:
        nonlocal lost_at, away_reported, refusal_said
        if lost_at is None:
            lost_at = away_reported = time.monotonic()
            refusal_said = False
        if report is not None and not (client.is_closed or client.is_draining):
            report(logging.WARNING, "NATS connection lost; reconnecting", fields)

    async def reconnected() -> None:
        nonlocal lost_at
        lost_at = None
        if report is not None:
            report(logging.WARNING, "NATS connection back", fields)

    async def error(err: Exception) -> None:
        nonlocal waiting_reported, refusals, away_reported, refusal_said
        refusal = None
        if not ever_connected:
            if _is_authorization_violation(err):
                refusal = _refused_hint(security)
            elif isinstance(err, OSError | nats.errors.Error):
                refusal = _tls_refusal(err, client, security)
        if refusal is not None:
            refusals += 1
            if refusals >= len(servers):
                # raised out of the client's first connect, which awaits this callback
                raise BrokerRefused(refusal)
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
        if lost_at is not None and (attempt or _is_authorization_violation(err)):
            # A failed attempt to get a lost connection back: said at debug level, but
            # every WAITING_REPORT_S at warning, and at once the first time a node
            # refuses (back with a certificate that does not verify, or refusing the
            # credentials): an outage that lasts shows in the log as it lasts, and a
            # refusal says why (both were silent for ever).
            why = _tls_refusal(err, client, security)
            if why is None and _is_authorization_violation(err):
                why = _refused_hint(security)
            if now - away_reported < WAITING_REPORT_S and (why is None or refusal_said):
                report(logging.DEBUG, "NATS client error", {**fields, "error": describe(err)})
                return
            away_reported = now
            refusal_said = refusal_said or why is not None
            report(
                logging.WARNING,
                "NATS still not reachable; still trying",
                {
                    **fields,
                    "away_s": f"{now - lost_at:.1f}",
                    "error": describe(err),
                    **({"reason": why} if why is not None else {}),
                },
            )
            return
        level = logging.DEBUG if attempt else logging.WARNING
        report(level, "NATS client error", {**fields, "error": describe(err)})

    try:
        await client.connect(
            servers=servers,
            tls=tls_context(security),
            user_credentials=security.creds,
            nkeys_seed=security.nkey,
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
        # Bounded still, should a nats.py upgrade bypass _UpgradableTransport (after a
        # failed TLS handshake its close would wait for ever): the process stops anyway.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await client.close()
        raise
    ever_connected = True
    return client


async def finish(
    client: NatsClient, *, report: Report | None = None, within_s: float = FINISH_WITHIN_S
) -> None:
    """End a connection as its process stops: drained (what was published reaches the
    server, messages already received are handled) when the server lets that happen
    within `within_s`, else closed, and `report` told why.

    nats.py's own drain, with the server away, raises at once; with a server that
    stopped answering, it waits up to 30 s for the subscriptions, then 10 s for a
    flush, and raises: a process told to stop during an outage took 40-70 s and
    exited 1 (the kill of a deployment waits 30 s). What was published and never
    acknowledged is lost with the connection either way; parley's appends and
    commands wait for their acknowledgements, so none is taken for sent.
    """
    if client.is_closed:
        return
    why = "the server is not reachable"
    if client.is_connected:
        failure = await _drain(client, within_s)
        if failure is None:
            return
        why = failure
    else:
        # What waits for a reconnect never goes out now; nats.py's close would write
        # it to the socket that died (uvloop raises RuntimeError: the process exited
        # 1 with that traceback), and leave the rest of the close undone.
        client._pending = []
        client._pending_data_size = 0
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await client.close()
    except TimeoutError:
        pass
    except (OSError, RuntimeError, nats.errors.Error) as err:
        why = f"{why}; closing it failed: {describe(err)}"
    if report is not None:
        fields = {"client": str(client.options.get("name") or ""), "reason": why}
        report(logging.WARNING, "NATS connection closed without draining", fields)


async def _drain(client: NatsClient, within_s: float) -> str | None:
    """None once drained, else why not. A server that answers a ping first: one that
    stopped answering would hold nats.py's drain, and a cancel that reaches the drain
    while it waits for its subscriptions is swallowed (so it runs in a task of its
    own, waited for, not wrapped in a timeout)."""
    try:
        await client.flush(timeout=within_s)  # type: ignore[arg-type]  # seconds, any number
    except (nats.errors.TimeoutError, TimeoutError):
        return f"the server did not answer within {within_s:g} s"
    except nats.errors.Error as err:
        return describe(err)
    draining = asyncio.ensure_future(client.drain())
    draining.add_done_callback(_retrieved)
    await asyncio.wait({draining}, timeout=within_s)
    if not draining.done():
        draining.cancel()
        return f"it did not drain within {within_s:g} s"
    if draining.cancelled():
        return "its drain was cancelled"
    failure = draining.exception()
    return None if failure is None else describe(failure)


def _retrieved(task: asyncio.Future[None]) -> None:
    """A drain given up on ends later, often with an error nobody waits for: read."""
    if not task.cancelled():
        task.exception()


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
        self.require_tls = False  # set by connect_client

    @property
    def server_info(self) -> dict[str, Any]:
        """The INFO of the server last answered (empty before any)."""
        info: dict[str, Any] = self._server_info
        return info

    async def _connect_to_server(self, s: Any) -> None:
        # nats.py's own, but every TCP connection, the first and each reconnect, on a
        # transport whose close survives a failed TLS upgrade (_UpgradableTransport)
        if s.uri.scheme in ("ws", "wss"):
            await super()._connect_to_server(s)
            return
        s.last_attempt = time.monotonic()
        if not isinstance(self._transport, _UpgradableTransport):
            self._transport = _UpgradableTransport()
        await self._transport.connect(
            s.uri, buffer_size=DEFAULT_BUFFER_SIZE, connect_timeout=self.options["connect_timeout"]
        )

    def _connect_command(self) -> bytes:
        # nats.py builds the CONNECT (the credentials) once the server's INFO is read
        # and, only where that INFO says `tls_required`, the connection upgraded. A
        # tls:// URL to a server that offers none (or an INFO altered on the way)
        # would send the credentials in the clear: refuse instead.
        if self.require_tls and not self._server_info.get("tls_required"):
            raise TlsNotOffered()
        command: bytes = super()._connect_command()
        return command

    async def _process_pong(self) -> None:
        # nats.py's own, but a pong whose waiter gave up is let be: a flush whose
        # timeout passed (or whose caller was cancelled) cancels its future, and
        # nats.py's `set_result` on it raised InvalidStateError in the read loop,
        # which ended the loop for good: nothing more was read on the connection
        # until unanswered pings made it reconnect, minutes later.
        pongs: list[asyncio.Future[bool]] = self._pongs
        if pongs:
            future = pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

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


class _UpgradableTransport(TcpTransport):
    """nats.py's TCP transport, whose `wait_closed` returns after a failed TLS upgrade.

    When the handshake fails (a certificate that does not verify, a node restarting
    in the middle of it, a timeout), asyncio closes the socket, but the plain stream
    it was upgrading is never told: nats.py's close then waits on it for ever. A
    role whose node came back with a certificate it does not trust, or was
    mid-handshake with one, could never be closed while it kept trying; nor could a
    one-shot command whose server went away under it. The socket is closed already:
    there is nothing to wait for.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._upgrade_failed = False

    async def connect(self, uri: Any, buffer_size: int, connect_timeout: int) -> None:
        self._upgrade_failed = False
        await super().connect(uri, buffer_size, connect_timeout)

    async def connect_tls(
        self, uri: Any, ssl_context: ssl.SSLContext, buffer_size: int, connect_timeout: int
    ) -> None:
        try:
            await super().connect_tls(uri, ssl_context, buffer_size, connect_timeout)
        except BaseException:
            self._upgrade_failed = True
            raise

    async def wait_closed(self) -> None:
        if not self._upgrade_failed:
            await super().wait_closed()  # type: ignore[no-untyped-call]


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
