"""What the edge needs to know, handed in by the wiring (no environment reads here)."""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from events.broker import NatsSecurity

# Connections the kernel holds for a listener before it accepts them. aiohttp's
# default of 128 overflowed when 1,000 viewers connected at once to a busy edge
# (bench capacity: "connection reset by peer"); the kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024

# PARLEY_CORS_ORIGINS: every origin may call the edge from a browser
ANY_ORIGIN = "*"
# The longest message an edge takes unless configured otherwise (`max_message_chars`).
MAX_MESSAGE_CHARS = 100_000


class EdgeLimits(msgspec.Struct, frozen=True):
    """The limits of README "Limits", from PARLEY_* variables (parley/config.py)."""

    # A viewer whose connection does not drain for this long is disconnected (it
    # resumes from its last id); every awaited write of a response is bounded by it.
    write_timeout_s: float = 30.0
    # ... and so is one with more than this many bytes unsent on its socket,
    max_buffer_bytes: int = 4 * 1024 * 1024
    # The kernel's send buffer of a stream's socket (0 = the kernel's own, up to
    # megabytes): what a stuck viewer can hold before the edge sees it stuck.
    socket_send_buffer_bytes: int = 256 * 1024
    # or with more than this many events queued for it while it catches up.
    max_pending: int = 4096
    # How long a request body may take to arrive.
    body_timeout_s: float = 30.0
    # A connection with no request under way (none yet, its headers not all in, or
    # idle between requests) is closed after this long: idle sockets cannot pile up
    # until the process runs out of file descriptors.
    idle_timeout_s: float = 30.0
    # Per user: requests per second (token bucket: `rate_per_s` sustained, bursts of
    # `rate_burst`), open SSE streams, and messages whose turn has not ended. 0 = no limit.
    rate_per_s: float = 20.0
    rate_burst: int = 100
    max_streams_per_user: int = 32
    max_turns_per_user: int = 8
    # Leases behind the two caps: an edge that dies frees its slots within this time.
    lease_s: float = 60.0


class EdgeConfig(msgspec.Struct, frozen=True):
    nats_url: str  # one server, or the nodes of a cluster, comma-separated
    database_url: str
    redis_url: str
    # Tokens (api/auth.py): HS256 with this secret, and/or RS256/ES256 from an
    # identity provider's JWKS, whose issuer and audience are checked.
    jwt_secret: str | None = None
    # TLS and credentials files for NATS beyond the URL (events/broker.py)
    nats_security: NatsSecurity = NatsSecurity()
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    db_schema: str = "parley"
    # Origins whose pages may call the edge from a browser (api/cors.py): "*" for
    # any; empty, no CORS headers at all.
    cors_origins: frozenset[str] = frozenset()
    models: list[str] = []  # model names clients may ask for
    default_model: str = "demo"
    max_body_bytes: int = 256 * 1024
    # POST /v1/ai-sdk/chat: useChat sends the whole chat with every message
    ai_sdk_max_body_bytes: int = 16 * 1024 * 1024
    max_message_chars: int = MAX_MESSAGE_CHARS
    ping_interval_s: float = 15.0
    limits: EdgeLimits = EdgeLimits()
    # A conversation's hub stays this long after its last viewer left.
    hub_linger_s: float = 5.0
    # POST /v1/conversations waits this long for the projection, so a GET right
    # after the 201 finds the row.
    create_wait_s: float = 2.0
    # How long a stream may see nothing before it checks that it can still end
    # (its turn still runs, its command still waits): api.hub.Hub._on_silence.
    stall_check_s: float = 2.0
    # How long a stream waits for the end of a turn that stopped running before it
    # ends with an error: a dead worker's turn is ended by the partition's next
    # owner once its lease lapses (15 s), then redelivered (api.hub.Subscription).
    orphan_grace_s: float = 45.0
    # How long a POST waits for the actor to accept or refuse its request before
    # answering anyway (no worker running yet: the request waits in CHAT_CMD).
    decision_wait_s: float = 5.0
    # Replicas of the streams if this edge is the first to start (events.streams).
    stream_replicas: int = 1
    idempotency_ttl_s: int = 24 * 3600
    # /readyz is not ready while the read-model projection is more than this many
    # log entries behind the log's head (0: report the lag, never unready for it).
    max_projection_lag: int = 10_000
    # /readyz gives each of NATS, Postgres and Redis this long to answer: a server
    # that hangs makes the edge unready, not the probe time out.
    ready_timeout_s: float = 1.0
    # An edge told to stop (SIGTERM) lets the streams of running turns reach their
    # turn's end for this long, and ends every other stream at once (api.hub.Hubs.drain).
    stop_grace_s: float = 12.0
    # Every other read of Postgres waits this long before its request answers 503: a
    # server that hangs breaks no connection (projections.store.bounded).
    postgres_timeout_s: float = 5.0


def parse_cors_origins(raw: str) -> frozenset[str]:
    """`PARLEY_CORS_ORIGINS`: `*`, or origins (`https://app.example.com`), comma-separated.

    Raises ValueError naming what is not an origin: a path, a query or a trailing
    slash would never equal a browser's `Origin` header, and a silent mismatch is
    a frontend that fails with no word from the edge."""
    origins = {part.strip() for part in raw.split(",") if part.strip()}
    if ANY_ORIGIN in origins:
        if len(origins) > 1:
            raise ValueError("'*' allows every origin: list no others beside it")
        return frozenset(origins)
    for origin in origins:
        parts = urlsplit(origin)
        exact = f"{parts.scheme}://{parts.netloc}"
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or origin.lower() != exact.lower()
        ):
            raise ValueError(
                f"{origin!r} is not an origin (scheme://host[:port], no path, no trailing /)"
            )
    return frozenset(origin.lower() for origin in origins)
