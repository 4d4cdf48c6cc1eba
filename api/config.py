"""What the edge needs to know, handed in by the wiring (no environment reads here)."""

from __future__ import annotations

import msgspec


class EdgeConfig(msgspec.Struct, frozen=True):
    nats_url: str
    database_url: str
    redis_url: str
    jwt_secret: str
    db_schema: str = "parley"
    models: list[str] = []  # model names clients may ask for
    default_model: str = "demo"
    max_body_bytes: int = 256 * 1024
    max_message_chars: int = 100_000
    ping_interval_s: float = 15.0
    # A viewer whose connection does not take events for this long is disconnected;
    # it resumes from its last id.
    slow_viewer_timeout_s: float = 30.0
    # POST /v1/conversations waits this long for the projection, so a GET right
    # after the 201 finds the row.
    create_wait_s: float = 2.0
    # How long a stream may see nothing before it checks that it can still end
    # (its turn still runs, its command still waits): api.streaming._Progress.
    stall_check_s: float = 2.0
    idempotency_ttl_s: int = 24 * 3600
    # /readyz is not ready while the read-model projection is more than this many
    # log entries behind the log's head (0: report the lag, never unready for it).
    max_projection_lag: int = 10_000
