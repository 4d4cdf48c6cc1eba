"""HTTP routes of DESIGN section 5: conversations, messages, events, log."""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib import resources
from typing import Any, Literal, TypeVar

import msgspec
from aiohttp import web

from api.app import CONFIG, HEADERS, JS, LOG, NATS, REDIS, STORE, TURNS, claims_of
from api.errors import UNAVAILABLE, ApiError, bad_request, not_found
from api.sse import Position, parse_position
from api.streaming import PendingCommand, TurnFilter, open_sse, running_turn, stream_log
from api.validation import InvalidBody, decode_body
from events.codec import encode, encode_stored
from events.ids import new_id
from events.subjects import CMD_STREAM, EVT_STREAM, command_subject, valid_id
from events.vocabulary import ConversationCreated, OnBusy, SendMessage
from projections.store import ConversationRow

# ---------------------------------------------------------------- request bodies


class CreateConversation(msgspec.Struct, frozen=True):
    project_id: str | None = None
    title: str = ""
    model: str | None = None


class PostMessage(msgspec.Struct, frozen=True):
    content: str
    model: str | None = None
    idempotency_key: str | None = None
    on_busy: OnBusy = "enqueue"


class IdempotencyRecord(msgspec.Struct, frozen=True):
    message_id: str
    command_id: str
    after: int
    digest: str


T = TypeVar("T")
_RESERVE_S = 60


async def read_json(request: web.Request, kind: type[T]) -> T:
    body = await request.read()
    try:
        return decode_body(body, kind)
    except InvalidBody as err:
        raise ApiError(err.status, err.code, err.message) from err


# ---------------------------------------------------------------- helpers


async def owned_conversation(request: web.Request, conversation_id: str) -> ConversationCreated:
    """The conversation's header if the caller may see it; 404 otherwise (no existence leak)."""
    if not valid_id(conversation_id):
        raise not_found("conversation")
    cache = request.app[HEADERS]
    header = cache.get(conversation_id)
    if header is None:
        first = await request.app[LOG].first(conversation_id)
        if first is not None and isinstance(first.event, ConversationCreated):
            header = first.event
            cache.put(header)
    if header is None or header.user_id != claims_of(request).sub:
        raise not_found("conversation")
    return header


def _iso(ns: int) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9))
        + f".{ns % 1_000_000_000 // 1_000_000:03d}Z"
    )


def _row_json(row: ConversationRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "user_id": row.user_id,
        "project_id": row.project_id,
        "title": row.title,
        "model": row.model,
        "message_count": row.message_count,
        "token_usage_total": row.token_usage_total,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


def _unprojected_json(header: ConversationCreated) -> dict[str, Any]:
    """A conversation the projection has not reached yet: what its first event says."""
    return {
        "id": header.conversation_id,
        "user_id": header.user_id,
        "project_id": header.project_id,
        "title": header.title,
        "model": header.model,
        "message_count": 0,
        "token_usage_total": 0,
        "created_at": _iso(header.at),
        "updated_at": _iso(header.at),
    }


async def conversation_json(
    request: web.Request, header: ConversationCreated, *, fresh: bool = False
) -> dict[str, Any]:
    """The conversation as the API shows it. A `fresh` one has no turn yet, so its
    answer does not depend on Redis: a create that succeeded never reports 503."""
    row: ConversationRow | None = await request.app[STORE].conversation(header.conversation_id)
    active = None if fresh else await request.app[TURNS].get(header.conversation_id)
    out = _row_json(row) if row is not None else _unprojected_json(header)
    out["active_turn"] = (
        {"turn_id": active.turn_id, "started_at": _iso(active.at)} if active else None
    )
    return out


# ---------------------------------------------------------------- conversations


async def create_conversation(request: web.Request) -> web.Response:
    body = await read_json(request, CreateConversation)
    config = request.app[CONFIG]
    if body.model is not None and body.model not in config.models:
        raise bad_request(
            f"unknown model {body.model!r}; known: {', '.join(config.models)}", "unknown_model"
        )
    if body.project_id is not None and not valid_id(body.project_id):
        raise bad_request("project_id must be 1-128 characters of A-Z a-z 0-9 _ -")
    if len(body.title) > 200:
        raise bad_request("title longer than 200 characters")
    header = ConversationCreated(
        conversation_id=new_id(),
        at=time.time_ns(),
        event_id=new_id(),
        user_id=claims_of(request).sub,
        project_id=body.project_id,
        title=body.title,
        model=body.model,
    )
    # expected sequence 0: the id is fresh, and nothing may precede the header
    seq = await request.app[LOG].append(header.conversation_id, [header], expected_seq=0)
    request.app[HEADERS].put(header)
    await _wait_for_projection(request, seq)
    return web.json_response(await conversation_json(request, header, fresh=True), status=201)


async def _wait_for_projection(request: web.Request, seq: int) -> None:
    """Read-your-writes for the common case: wait briefly until the row exists."""
    deadline = time.monotonic() + request.app[CONFIG].create_wait_s
    store = request.app[STORE]
    while time.monotonic() < deadline:
        if await store.position() >= seq:
            return
        await asyncio.sleep(0.01)


async def list_conversations(request: web.Request) -> web.Response:
    rows = await request.app[STORE].conversations_of(claims_of(request).sub)
    return web.json_response({"conversations": [_row_json(row) for row in rows]})


async def get_conversation(request: web.Request) -> web.Response:
    header = await owned_conversation(request, request.match_info["id"])
    return web.json_response(await conversation_json(request, header))


# ---------------------------------------------------------------- messages


async def post_message(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    body = await read_json(request, PostMessage)
    config = request.app[CONFIG]
    if not body.content.strip():
        raise bad_request("content is empty")
    if len(body.content) > config.max_message_chars:
        raise bad_request(
            f"content longer than {config.max_message_chars} characters", "content_too_long"
        )
    if body.model is not None and body.model not in config.models:
        raise bad_request(
            f"unknown model {body.model!r}; known: {', '.join(config.models)}", "unknown_model"
        )
    if body.idempotency_key is not None and not (0 < len(body.idempotency_key) <= 200):
        raise bad_request("idempotency_key must be 1-200 characters")
    conversation_id = header.conversation_id
    claims = claims_of(request)

    record, fresh = await _idempotency(request, conversation_id, body)
    if fresh:
        active = await request.app[TURNS].get(conversation_id)
        if active is not None and body.on_busy != "enqueue":
            await _forget_idempotency(request, conversation_id, body)
            if body.on_busy == "interrupt":
                # Needs the cancel path, which does not exist yet: refuse openly
                # rather than quietly queue behind the turn.
                raise ApiError(
                    501,
                    "not_implemented",
                    "on_busy=interrupt is not supported yet; use enqueue or reject",
                )
            raise ApiError(
                409, "busy", f"conversation {conversation_id} is answering; on_busy=reject"
            )
    command = SendMessage(
        conversation_id=conversation_id,
        command_id=record.command_id,
        user_id=claims.sub,
        at=time.time_ns(),
        message_id=record.message_id,
        content=body.content,
        model=body.model,
        on_busy=body.on_busy,
    )
    # Published again for a repeated key too: whether or not the first request
    # got as far as publishing, the message is sent exactly once in effect.
    # Nats-Msg-Id drops a copy within the duplicate window, and the actor drops
    # a later one by its command_id in the log.
    try:
        ack = await request.app[JS].publish(
            command_subject(conversation_id),
            encode(command),
            stream=CMD_STREAM,
            headers={"Nats-Msg-Id": record.command_id},
        )
    except BaseException:
        if fresh:  # not sent: a retry with the same key must be free to send it
            await _forget_idempotency(request, conversation_id, body)
        raise
    # published: keep the key for its full time (also when a retry did the publishing)
    await _keep_idempotency(request, conversation_id, body, record)

    if _wants_json(request):
        return web.json_response(
            {
                "message_id": record.message_id,
                "conversation_id": conversation_id,
                "after": record.after,
            },
            status=202,
        )
    response = await open_sse(request)
    return await stream_log(
        request,
        response,
        conversation_id,
        Position(seq=record.after),
        turn=TurnFilter(record.message_id),
        command=PendingCommand(stream_seq=int(ack.seq)),
    )


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/event-stream" not in accept


def _idem_key(conversation_id: str, key: str) -> str:
    return f"parley:idem:{conversation_id}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


async def _idempotency(
    request: web.Request, conversation_id: str, body: PostMessage
) -> tuple[IdempotencyRecord, bool]:
    """The message's ids and start position; the same ones again for a repeated key."""
    after = await request.app[LOG].last_seq(conversation_id)
    digest = hashlib.sha256(f"{body.content}\x00{body.model}".encode()).hexdigest()
    if body.idempotency_key is None:
        return IdempotencyRecord(
            message_id=new_id(), command_id=new_id(), after=after, digest=digest
        ), True
    record = IdempotencyRecord(message_id=new_id(), command_id=new_id(), after=after, digest=digest)
    redis = request.app[REDIS]
    key = _idem_key(conversation_id, body.idempotency_key)
    # Reserved briefly until the command is published (then kept for the full
    # TTL): a crash in between frees the key within a minute, not a day.
    if await redis.set(key, msgspec.json.encode(record), nx=True, ex=_RESERVE_S):
        return record, True
    raw = await redis.get(key)
    if raw is None:  # expired between the two calls: treat as new
        return record, True
    previous = msgspec.json.decode(raw, type=IdempotencyRecord)
    if previous.digest != digest:
        raise ApiError(
            422, "idempotency_mismatch", "idempotency_key was already used with a different message"
        )
    return previous, False


async def _keep_idempotency(
    request: web.Request, conversation_id: str, body: PostMessage, record: IdempotencyRecord
) -> None:
    if body.idempotency_key is not None:
        await request.app[REDIS].set(
            _idem_key(conversation_id, body.idempotency_key),
            msgspec.json.encode(record),
            ex=request.app[CONFIG].idempotency_ttl_s,
        )


async def _forget_idempotency(
    request: web.Request, conversation_id: str, body: PostMessage
) -> None:
    if body.idempotency_key is not None:
        await request.app[REDIS].delete(_idem_key(conversation_id, body.idempotency_key))


async def list_messages(request: web.Request) -> web.Response:
    header = await owned_conversation(request, request.match_info["id"])
    versions = request.query.get("versions", "latest")
    if versions not in ("latest", "all"):
        raise bad_request("versions must be 'latest' or 'all'")
    rows = await request.app[STORE].messages(header.conversation_id, all_versions=versions == "all")
    return web.json_response(
        {"messages": msgspec.to_builtins(rows)},
    )


# ---------------------------------------------------------------- events and log


async def conversation_events(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    conversation_id = header.conversation_id
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw:
        position = parse_position(raw)
        if position is None:
            raise bad_request(f"not an event id: {raw!r}", "bad_position")
        last = await request.app[LOG].last_seq(conversation_id)
        if position.seq > last:
            raise bad_request(
                f"event id {raw} is beyond the end of this conversation ({last})", "bad_position"
            )
    else:
        position = Position(seq=await _start_of_active_turn(request, conversation_id))
    response = await open_sse(request)
    return await stream_log(request, response, conversation_id, position)


async def _start_of_active_turn(request: web.Request, conversation_id: str) -> int:
    """Where a viewer without a position starts: the active turn's start, else the log's end."""
    end, active = await running_turn(request.app, conversation_id)
    return active.after if active is not None else end


async def conversation_log(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    raw = request.query.get("after", "0")
    if not raw.isdigit():
        raise bad_request("after must be a non-negative integer")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for stored in await request.app[LOG].read(header.conversation_id, after=int(raw)):
        await response.write(encode_stored(stored.seq, stored.event) + b"\n")
    await response.write_eof()
    return response


# ---------------------------------------------------------------- health, page


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when NATS, Postgres and Redis answer and the read models are not too far
    behind the log (`projection_lag`: CHAT_EVT's last sequence minus the projection's
    position; unready above `max_projection_lag`). Events the projection could not
    apply as written do not make the edge unready (the rest is served), but are
    counted here so an operator sees them (`parley projections errors` lists them)."""
    app = request.app
    checks: dict[str, Literal["ok", "down"]] = {}
    checks["nats"] = "ok" if app[NATS].is_connected else "down"
    projection_errors: int | None = None
    position: int | None = None
    try:
        projection_errors = await app[STORE].projection_error_count()
        position = await app[STORE].position()
        checks["postgres"] = "ok"
    except UNAVAILABLE:
        checks["postgres"] = "down"
    try:
        await app[REDIS].ping()
        checks["redis"] = "ok"
    except UNAVAILABLE:
        checks["redis"] = "down"
    reasons = [f"{name} is down" for name, state in checks.items() if state == "down"]
    lag: int | None = None
    if position is not None and checks["nats"] == "ok":
        try:
            head = int((await app[JS].stream_info(EVT_STREAM)).state.last_seq)
        except UNAVAILABLE:
            reasons.append("the event log does not answer")
        else:
            lag = max(0, head - position)
            bound = app[CONFIG].max_projection_lag
            if bound and lag > bound:
                reasons.append(f"the read models are {lag} events behind the log (bound {bound})")
    ready = not reasons
    return web.json_response(
        {
            "status": "ready" if ready else "not_ready",
            "checks": checks,
            "projection_errors": projection_errors,
            "projection_lag": lag,
            "reasons": reasons,
        },
        status=200 if ready else 503,
    )


async def index(request: web.Request) -> web.Response:
    page = resources.files("api").joinpath("static/index.html").read_text()
    return web.Response(text=page, content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations", list_conversations)
    app.router.add_get("/v1/conversations/{id}", get_conversation)
    app.router.add_post("/v1/conversations/{id}/messages", post_message)
    app.router.add_get("/v1/conversations/{id}/messages", list_messages)
    app.router.add_get("/v1/conversations/{id}/events", conversation_events)
    app.router.add_get("/v1/conversations/{id}/log", conversation_log)
