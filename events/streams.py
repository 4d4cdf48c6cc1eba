"""The two streams parley needs, made if absent and never weakened if present.

CHAT_EVT holds the event log (limits retention: kept until the operator's
limits remove it), CHAT_CMD the commands (work queue: each is consumed once).

Every process calls `ensure_streams` at start. The rules:

- absent: created with parley's configuration, at `replicas` (R3 in production,
  on file storage);
- present: left as the operator made it (replicas, storage, limits, placement,
  everything parley does not need); only what parley cannot work without is
  added if missing: its subjects, direct gets on CHAT_EVT (every read uses
  them), CHAT_EVT's republish of every stored entry to `chat.live.>` (what
  edges follow live), and a duplicate window long enough for an append to be
  retried safely (events.log);
- present but unusable (CHAT_CMD not a work queue, CHAT_EVT not kept by
  limits or republishing elsewhere): nothing is changed and start fails with `StreamMisconfigured`,
  naming what to fix. Changing the retention of a live stream is the
  operator's decision, not a side effect of starting a process.

The stream's configuration is read and written as the server's JSON, not
through nats.py's dataclasses, so a setting this client does not know (a
newer server's) goes back unchanged instead of being dropped.

How often a server fsyncs (`sync_interval`) is server configuration, not
stream configuration: production sets `always` (README "Production").
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext

from events.errors import EventLogUnavailable, StreamMisconfigured
from events.subjects import CMD_STREAM, CMD_SUBJECTS, EVT_STREAM, EVT_SUBJECTS, LIVE_SUBJECTS

# Appends are retried for up to EventLog's retry time (30 s) with the same
# Nats-Msg-Id; the window must outlast that with room to spare.
DUPLICATE_WINDOW_S = 120.0
_NS = 1_000_000_000
_STREAM_NOT_FOUND = 10059
_STREAM_NAME_IN_USE = 10058
# The server answers, but the account of the connection's user has no JetStream:
# configuration, not an outage, so waiting for it would wait for ever.
_JETSTREAM_NOT_ENABLED_FOR_ACCOUNT = 10039
_API_TIMEOUT_S = 10.0
# Readers that take an ephemeral consumer of CHAT_EVT (projectors, and edges
# before they followed the republished entries) need room for one each. A stream
# that leaves the limit unset gets nats-server's own default, 1,000 (2.15): the
# 1,001st conversation watched failed with "maximum consumers limit reached"
# under bench capacity while each was a consumer.
EVT_MAX_CONSUMERS = 100_000


class StreamSpec(msgspec.Struct, frozen=True):
    """What parley needs of one stream, and why (the why goes into the error)."""

    name: str
    subjects: str
    retention: str  # the server's spelling: "limits", "workqueue", "interest"
    why_retention: str
    direct: bool = False
    max_consumers: int = 0  # 0: the server's default is enough
    # (source, destination): every stored entry republished, with its position
    republish: tuple[str, str] | None = None


EVT = StreamSpec(
    name=EVT_STREAM,
    subjects=EVT_SUBJECTS,
    retention="limits",
    why_retention="the event log is the truth: events stay until the limits remove them",
    direct=True,
    max_consumers=EVT_MAX_CONSUMERS,
    republish=(EVT_SUBJECTS, LIVE_SUBJECTS),
)
CMD = StreamSpec(
    name=CMD_STREAM,
    subjects=CMD_SUBJECTS,
    retention="workqueue",
    why_retention="each command is consumed once, by the worker that owns its partition",
)


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> list[str]:
    """Create CHAT_EVT and CHAT_CMD if absent; add what parley needs to existing ones.

    Returns a note for each stream created or changed and for each setting that
    differs from what parley would have made but was left as it is (replicas,
    storage); the caller logs them. Raises `StreamMisconfigured` for a stream
    parley cannot use, `EventLogUnavailable` if JetStream does not answer.
    Safe to call from every process at once.
    """
    notes: list[str] = []
    for spec in (EVT, CMD):
        notes += await _ensure(js, spec, replicas)
    return notes


async def _ensure(js: JetStreamContext, spec: StreamSpec, replicas: int) -> list[str]:
    config = await stream_config(js, spec.name)
    if config is None:
        created = _request_body(spec, replicas)
        answer = await _api(js, f"STREAM.CREATE.{spec.name}", created)
        error = answer.get("error")
        if error is None:
            return [f"stream {spec.name} created: {replicas} replica(s), file storage"]
        if error.get("err_code") != _STREAM_NAME_IN_USE:
            raise StreamMisconfigured(f"creating stream {spec.name}: {error.get('description')}")
        config = await stream_config(js, spec.name)  # another process made it meanwhile
        if config is None:
            raise StreamMisconfigured(f"stream {spec.name} exists and does not; try again")
    return await _reconcile(js, spec, config, replicas)


def _request_body(spec: StreamSpec, replicas: int) -> dict[str, Any]:
    return {
        "name": spec.name,
        "subjects": [spec.subjects],
        "retention": spec.retention,
        "storage": "file",
        "num_replicas": replicas,
        "duplicate_window": int(DUPLICATE_WINDOW_S * _NS),
        "allow_direct": spec.direct,
        **({"max_consumers": spec.max_consumers} if spec.max_consumers else {}),
        **({"republish": _republish(spec.republish)} if spec.republish else {}),
    }


def _republish(source_destination: tuple[str, str]) -> dict[str, Any]:
    source, destination = source_destination
    return {"src": source, "dest": destination}


def missing(spec: StreamSpec, config: dict[str, Any]) -> dict[str, Any]:
    """What must be added to an existing stream's configuration (empty: nothing).

    Raises StreamMisconfigured for what cannot be added without changing the
    stream's meaning. Pure: tested without a server.
    """
    retention = config.get("retention", "limits")
    if retention != spec.retention:
        raise StreamMisconfigured(
            f"stream {spec.name} has retention {retention!r}; parley needs {spec.retention!r} "
            f"({spec.why_retention}). Change the stream's retention, or delete it and let "
            f"parley create it; parley changes neither on its own"
        )
    changes: dict[str, Any] = {}
    if spec.republish:
        have = config.get("republish")
        if not have:
            changes["republish"] = _republish(spec.republish)
        elif (have.get("src") or ">", have.get("dest")) != spec.republish or have.get(
            "headers_only"
        ):
            raise StreamMisconfigured(
                f"stream {spec.name} republishes {have.get('src') or '>'} to "
                f"{have.get('dest')}{' (headers only)' if have.get('headers_only') else ''}; "
                f"parley's edges follow its entries live as republished from "
                f"{spec.republish[0]} to {spec.republish[1]}, whole. A stream republishes "
                "to one place: remove that republish and let parley add its own"
            )
    subjects = list(config.get("subjects") or [])
    if spec.subjects not in subjects and ">" not in subjects:
        changes["subjects"] = [*subjects, spec.subjects]
    if spec.direct and not config.get("allow_direct"):
        changes["allow_direct"] = True
    if int(config.get("duplicate_window") or 0) < DUPLICATE_WINDOW_S * _NS:
        changes["duplicate_window"] = int(DUPLICATE_WINDOW_S * _NS)
    if spec.max_consumers and int(config.get("max_consumers") or -1) <= 0:
        # unset means the server's default, which is lower than parley needs
        changes["max_consumers"] = spec.max_consumers
    return changes


def differences(spec: StreamSpec, config: dict[str, Any], replicas: int) -> list[str]:
    """What differs from what parley would have created, left as the operator set it."""
    out = []
    have = int(config.get("num_replicas") or 1)
    if have != replicas:
        out.append(
            f"stream {spec.name} has {have} replica(s), PARLEY_STREAM_REPLICAS is {replicas}; "
            "left as configured"
        )
    if config.get("storage", "file") != "file":
        out.append(
            f"stream {spec.name} is on {config.get('storage')} storage: "
            "it does not survive a restart of its servers; left as configured"
        )
    allowed = int(config.get("max_consumers") or -1)
    if spec.max_consumers and 0 < allowed < spec.max_consumers:
        out.append(
            f"stream {spec.name} allows {allowed} consumers: conversations watched at once, "
            "over all edges, beyond that are refused (503); left as configured"
        )
    return out


async def _reconcile(
    js: JetStreamContext, spec: StreamSpec, config: dict[str, Any], replicas: int
) -> list[str]:
    notes = differences(spec, config, replicas)
    changes = missing(spec, config)
    if not changes:
        return notes
    answer = await _api(js, f"STREAM.UPDATE.{spec.name}", {**config, **changes})
    error = answer.get("error")
    if error is not None:
        raise StreamMisconfigured(
            f"stream {spec.name} lacks {', '.join(sorted(changes))}, which parley needs, "
            f"and adding it failed: {error.get('description')}"
        )
    return [*notes, f"stream {spec.name}: added {', '.join(sorted(changes))}"]


async def require_jetstream(js: JetStreamContext) -> None:
    """For one-shot commands, before they read: the event log's stream answers.

    Raises StreamMisconfigured when the connection's account has no JetStream, or
    has no CHAT_EVT (a read of either would only say "no responders", status 503,
    as if JetStream were electing a leader), EventLogUnavailable when JetStream
    does not answer.
    """
    if await stream_config(js, EVT.name) is None:
        raise StreamMisconfigured(
            f"no parley event log on this NATS: the account of PARLEY_NATS_URL has "
            f"JetStream but no stream {EVT.name}. Is it the NATS (and the user) parley "
            "runs on? A deployment's first `parley serve` or `parley dev` makes the stream"
        )


async def stream_config(js: JetStreamContext, name: str) -> dict[str, Any] | None:
    """The stream's configuration as the server holds it, every field; None if absent."""
    answer = await _api(js, f"STREAM.INFO.{name}", None)
    error = answer.get("error")
    if error is None:
        config: dict[str, Any] = answer["config"]
        return config
    if error.get("err_code") == _STREAM_NOT_FOUND:
        return None
    if error.get("err_code") == _JETSTREAM_NOT_ENABLED_FOR_ACCOUNT:
        raise StreamMisconfigured(
            f"stream {name}: the NATS account of the user in PARLEY_NATS_URL has no JetStream "
            f"({error.get('description')}); enable it for that account in the server's "
            "configuration (`jetstream: enabled` in the account's block), or connect as a "
            "user of an account that has it"
        )
    raise EventLogUnavailable(f"stream {name}: {error.get('description')}")


async def _api(js: JetStreamContext, what: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """One JetStream API request, raw JSON both ways."""
    nc: Any = js._nc
    prefix: str = js._prefix
    payload = b"" if body is None else msgspec.json.encode(body)
    try:
        msg = await nc.request(f"{prefix}.{what}", payload, timeout=_API_TIMEOUT_S)
    except (nats.errors.Error, TimeoutError) as err:  # no answer, no responders
        raise EventLogUnavailable(f"JetStream did not answer {what}: {err!r}") from err
    answer: dict[str, Any] = msgspec.json.decode(msg.data)
    return answer
