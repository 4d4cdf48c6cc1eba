"""HTTP routes of DESIGN section 5: conversations, messages, events, log."""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any, Literal

import msgspec
from aiohttp import web

from api import ai_sdk
from api.access import owned_conversation, project_of_member
from api.context import CONFIG, HEADERS, JS, LOG, NATS, REDIS, STORE, TURNS, claims_of
from api.errors import UNAVAILABLE, bad_request
from api.hub import read_range
from api.project_routes import (
    add_member,
    create_project,
    get_account,
    get_ledger,
    grant_credits,
    list_models,
    list_projects,
)
from api.sse import Position, parse_position
from api.streaming import cut, open_sse, running_turn, stream_log
from api.turn_routes import cancel_turn, edit_message, post_message, read_json, regenerate
from events.codec import encode_stored
from events.ids import new_id
from events.subjects import EVT_STREAM
from events.vocabulary import ConversationCreated
from projections.store import ConversationRow

# ---------------------------------------------------------------- request bodies


class CreateConversation(msgspec.Struct, frozen=True):
    project_id: str | None = None
    title: str = ""
    model: str | None = None


# ---------------------------------------------------------------- helpers


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
        {"turn_id": active.turn_id or None, "started_at": _iso(active.at)} if active else None
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
    if body.project_id is not None:
        # only a member starts a project conversation (a project's tools and its bill)
        await project_of_member(request, body.project_id)
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
    """The raw log as JSON lines, streamed: one entry at a time from the log up to its
    end as it was when the request came, never the whole conversation in memory."""
    header = await owned_conversation(request, request.match_info["id"])
    raw = request.query.get("after", "0")
    if not raw.isdigit():
        raise bad_request("after must be a non-negative integer")
    app = request.app
    conversation_id = header.conversation_id
    end = await app[LOG].last_seq(conversation_id)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    timeout = app[CONFIG].limits.write_timeout_s
    try:
        async for stored in read_range(app[JS], app[LOG], conversation_id, int(raw), end):
            async with asyncio.timeout(timeout):  # a reader that stops reading is let go
                await response.write(encode_stored(stored.seq, stored.event) + b"\n")
        async with asyncio.timeout(timeout):
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            cut(request.transport)
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
    app.router.add_patch("/v1/conversations/{id}/messages/{mid}", edit_message)
    app.router.add_post("/v1/conversations/{id}/messages/{mid}/regenerate", regenerate)
    app.router.add_post("/v1/conversations/{id}/cancel", cancel_turn)
    app.router.add_post("/v1/projects", create_project)
    app.router.add_get("/v1/projects", list_projects)
    app.router.add_get("/v1/billing/accounts/{kind}/{id}", get_account)
    app.router.add_get("/v1/billing/ledger", get_ledger)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/ai-sdk/chat", ai_sdk.chat)
    app.router.add_get("/v1/ai-sdk/chat/{id}/stream", ai_sdk.resume)
    app.router.add_post("/v1/projects/{id}/members", add_member)
    app.router.add_post("/v1/billing/accounts/{kind}/{id}/credits", grant_credits)
    app.router.add_get("/v1/conversations/{id}/events", conversation_events)
    app.router.add_get("/v1/conversations/{id}/log", conversation_log)
