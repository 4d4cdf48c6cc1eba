"""HTTP routes of DESIGN section 5, declared once in `ROUTES`: conversations, messages,
events, log, projects, credits, and the operational routes (health, readiness,
metrics, the OpenAPI document, the page).

A route is one `Operation` line in `ROUTES`, naming the types it reads and
answers with; `add_routes` registers the table and serves it as
`/openapi.json` (api/openapi.py). A route added elsewhere (api/project_routes.py)
is added here as one more line.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import logging
import re
import time
from collections.abc import Awaitable
from importlib import metadata, resources
from typing import Annotated, Literal, TypeVar

import msgspec
from aiohttp import web

from api import ai_sdk
from api.access import owned_conversation, project_of_member
from api.context import (
    CONFIG,
    HEADERS,
    JS,
    LOG,
    METRICS,
    NATS,
    OPENAPI,
    READINESS,
    REDIS,
    STORE,
    TURNS,
    claims_of,
)
from api.errors import POSTGRES_AWAY, UNAVAILABLE, bad_request, begin_stream
from api.hub import read_range
from api.openapi import (
    AI_SDK_STREAM,
    HTML,
    NDJSON,
    PROMETHEUS,
    SSE,
    Answer,
    Operation,
    document,
    register,
)
from api.project_routes import (
    AccountKind,
    AddMember,
    CreateProject,
    GrantCredits,
    LedgerQuery,
    add_member,
    create_project,
    get_account,
    get_ledger,
    grant_credits,
    list_models,
    list_projects,
)
from api.responses import (
    AccountView,
    ActiveTurn,
    CancelAnswer,
    Checks,
    ConversationDetail,
    ConversationInfo,
    ConversationList,
    CreditsGrant,
    Deleted,
    Health,
    Ledger,
    MessageList,
    MessageView,
    ModelList,
    ProjectInfo,
    ProjectList,
    Readiness,
    Renamed,
    TurnAccepted,
    answer,
    instant,
)
from api.sse import Position
from api.streaming import cut, open_sse, running_turn, stream_log
from api.turn_routes import (
    EditBody,
    PostMessage,
    RegenerateBody,
    RenameBody,
    cancel_turn,
    delete_conversation,
    edit_message,
    post_message,
    read_json,
    read_params,
    regenerate,
    rename_conversation,
    resume_position,
    shown_within,
)
from api.validation import MAX_POSITION, Id, ModelName, refused
from events.codec import encode_stored
from events.errors import EventLogError, EventLogUnavailable, describe
from events.ids import new_id
from events.subjects import EVT_STREAM, valid_id
from events.turns import TurnRecord
from events.vocabulary import TITLE_LIMIT, ConversationCreated
from projections.poison import log_behind_reason
from projections.store import ConversationRow, ReadStore, bounded

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------- request types


class CreateConversation(msgspec.Struct, frozen=True):
    project_id: Id | None = None
    # null as absent, as for the other two
    title: (
        Annotated[
            str,
            refused(f"title longer than {TITLE_LIMIT} characters", max_length=TITLE_LIMIT),
        ]
        | None
    ) = None
    model: ModelName | None = None


class ConversationsQuery(msgspec.Struct, frozen=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100, description="at most this many")] = 100
    before: Annotated[
        str | None,
        msgspec.Meta(
            description="the `next` of the page before: where this one goes on",
            extra_json_schema={"minLength": 1},
        ),
    ] = None


MESSAGES_PAGE = 500  # messages at most per page of GET /v1/conversations/{id}/messages


class MessagesQuery(msgspec.Struct, frozen=True):
    versions: Literal["latest", "all"] = "latest"
    # UNSET, not None: the parameter is absent or a number, never null
    limit: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=MESSAGES_PAGE,
                description="only the last this many (of those before `before`), and a `next`;"
                " without it, every one",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    before: Annotated[
        str | None,
        msgspec.Meta(
            description="the `next` of the page read before: the messages before that page",
            extra_json_schema={"minLength": 1},
        ),
    ] = None


class ResumeQuery(msgspec.Struct, frozen=True):
    # an SSE id to resume after (the Last-Event-ID header wins when both are sent)
    after: str | None = None


class ResumeHeaders(msgspec.Struct, frozen=True):
    last_event_id: Annotated[
        str | None,
        msgspec.Meta(
            description="the id of the last event seen: the stream goes on after it (a"
            " message, edit or regeneration: sent again with its idempotency_key)"
        ),
    ] = msgspec.field(default=None, name="Last-Event-ID")


class LogQuery(msgspec.Struct, frozen=True):
    after: Annotated[
        int, msgspec.Meta(ge=0, le=MAX_POSITION, description="log entries after this position")
    ] = 0


# ---------------------------------------------------------------- helpers


def _row_info(row: ConversationRow) -> ConversationInfo:
    return ConversationInfo(
        id=row.id,
        user_id=row.user_id,
        project_id=row.project_id,
        title=row.title,
        model=row.model,
        message_count=row.message_count,
        token_usage_total=row.token_usage_total,
        created_at=instant(row.created_at),
        updated_at=instant(row.updated_at),
    )


def _unprojected_info(header: ConversationCreated) -> ConversationInfo:
    """A conversation the projection has not reached yet: what its first event says."""
    return ConversationInfo(
        id=header.conversation_id,
        user_id=header.user_id,
        project_id=header.project_id,
        title=header.title,
        model=header.model,
        message_count=0,
        token_usage_total=0,
        created_at=instant(header.at),
        updated_at=instant(header.at),
    )


async def conversation_detail(
    request: web.Request, header: ConversationCreated, *, fresh: bool = False
) -> ConversationDetail:
    """The conversation as the API shows it. A `fresh` one has no turn yet, so its
    answer depends neither on Redis nor on Postgres (its header is enough): a create
    that succeeded never reports 503, which would only invite a second create."""
    try:
        row: ConversationRow | None = await request.app[STORE].conversation(header.conversation_id)
    except POSTGRES_AWAY:
        if not fresh:
            raise
        row = None
    active = None if fresh else await request.app[TURNS].get(header.conversation_id)
    info = _row_info(row) if row is not None else _unprojected_info(header)
    return _with_turn(info, active)


def _with_turn(info: ConversationInfo, active: TurnRecord | None) -> ConversationDetail:
    return ConversationDetail(
        **msgspec.structs.asdict(info),
        active_turn=ActiveTurn(turn_id=active.turn_id or None, started_at=instant(active.at))
        if active
        else None,
    )


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
    # a title of spaces is none: the first message names the conversation
    title = (body.title or "").strip()
    header = ConversationCreated(
        conversation_id=new_id(),
        at=time.time_ns(),
        event_id=new_id(),
        user_id=claims_of(request).sub,
        project_id=body.project_id,
        title=title,
        model=body.model,
    )
    # expected sequence 0: the id is fresh, and nothing may precede the header
    seq = await request.app[LOG].append(header.conversation_id, [header], expected_seq=0)
    request.app[HEADERS].put(header, made_at=seq)

    async def projected(store: ReadStore) -> bool:
        return await store.position() >= seq

    if await shown_within(request, projected):
        return answer(await conversation_detail(request, header, fresh=True), status=201)
    # not projected yet (or Postgres does not answer): the header is the answer
    return answer(_with_turn(_unprojected_info(header), None), status=201)


async def list_conversations(request: web.Request) -> web.Response:
    query = read_params(request.query, ConversationsQuery)
    before = None if query.before is None else _read_cursor(query.before)
    # one row more than the page: whether another page follows
    found = await request.app[STORE].conversations_of(
        claims_of(request).sub, limit=query.limit + 1, before=before
    )
    rows = found[: query.limit]
    active = await request.app[TURNS].get_many([row.id for row in rows])
    return answer(
        ConversationList(
            conversations=[
                _with_turn(_row_info(row), turn) for row, turn in zip(rows, active, strict=True)
            ],
            next=_cursor(rows[-1]) if len(found) > query.limit else None,
        )
    )


def _packed(first: str, second: str) -> str:
    """A cursor of two parts, opaque to clients: base64url of `first|second`."""
    return base64.urlsafe_b64encode(f"{first}|{second}".encode()).decode().rstrip("=")


def _unpacked(cursor: str) -> tuple[str, str]:
    """The two parts of a `_packed` cursor; ValueError when it is not base64url of text
    (binascii.Error and UnicodeDecodeError are ValueErrors)."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    first, _, second = raw.partition("|")
    return first, second


def _cursor(row: ConversationRow) -> str:
    """Where the list goes on after `row` (its sort key)."""
    return _packed(row.updated_at.isoformat(), row.id)


def _read_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        at, conversation_id = _unpacked(cursor)
        when = dt.datetime.fromisoformat(at)
        # in UTC here, where a time at the calendar's edge fails, not in the driver
        utc = when.astimezone(dt.UTC) if when.tzinfo is not None else None
    except (ValueError, OverflowError):  # binascii.Error, UnicodeDecodeError: ValueErrors
        raise bad_request(f"not a cursor of this list: {cursor[:60]!r}", "bad_cursor") from None
    if utc is None or not valid_id(conversation_id):
        raise bad_request(f"not a cursor of this list: {cursor[:60]!r}", "bad_cursor")
    return utc, conversation_id


async def get_conversation(request: web.Request) -> web.Response:
    header = await owned_conversation(request, request.match_info["id"])
    return answer(await conversation_detail(request, header))


# ---------------------------------------------------------------- messages


async def list_messages(request: web.Request) -> web.Response:
    """The conversation's messages in the log's order; with `limit`, the last page of
    them, and in `next` where the page before it ends (the seq of this page's first
    row: rows are only ever added after the last one, so a cursor stays where it is
    while turns and versions are added)."""
    header = await owned_conversation(request, request.match_info["id"])
    conversation_id = header.conversation_id
    query = read_params(request.query, MessagesQuery)
    before = None if query.before is None else _read_message_cursor(query.before, conversation_id)
    limit = query.limit if isinstance(query.limit, int) else None
    # one row more than the page: whether another page comes before it
    found = await request.app[STORE].messages(
        conversation_id,
        all_versions=query.versions == "all",
        last=None if limit is None else limit + 1,
        before=before,
    )
    rows = found if limit is None else found[-limit:]
    more = limit is not None and len(found) > limit
    return answer(
        MessageList(
            messages=[MessageView.of(row) for row in rows],
            next=_message_cursor(conversation_id, rows[0].seq) if more else None,
        )
    )


def _message_cursor(conversation_id: str, seq: int) -> str:
    """Where the page before goes on: the conversation and the seq of this page's
    first row."""
    return _packed(conversation_id, str(seq))


def _read_message_cursor(cursor: str, conversation_id: str) -> int:
    """The position a cursor of this conversation's messages names, else 400 as the
    other lists answer a bad cursor (a cursor
    of another conversation too: refused, whatever that conversation is, saying nothing
    of it)."""
    try:
        of, seq = _unpacked(cursor)
        position = int(seq) if seq.isdigit() and seq.isascii() else 0
    except ValueError:
        position = 0
        of = ""
    if of != conversation_id or not 0 < position <= MAX_POSITION:
        raise bad_request(
            "not a cursor of this conversation's messages (a `next` it gave)", "bad_cursor"
        )
    return position


# ---------------------------------------------------------------- events and log


async def conversation_events(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    conversation_id = header.conversation_id
    resume = read_params(request.headers, ResumeHeaders).last_event_id
    raw = resume or read_params(request.query, ResumeQuery).after
    if raw:
        position = await resume_position(request, conversation_id, raw)
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
    after = read_params(request.query, LogQuery).after
    app = request.app
    conversation_id = header.conversation_id
    end = await app[LOG].last_seq(conversation_id)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await begin_stream(request, response)
    timeout = app[CONFIG].limits.write_timeout_s
    try:
        async for stored in read_range(app[LOG], conversation_id, after, end):
            async with asyncio.timeout(timeout):  # a reader that stops reading is let go
                await response.write(encode_stored(stored.seq, stored.event) + b"\n")
        async with asyncio.timeout(timeout):
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            cut(request.transport)
    return response


# ---------------------------------------------------------------- operations


async def healthz(request: web.Request) -> web.Response:
    return answer(Health())


async def readyz(request: web.Request) -> web.Response:
    """Ready when NATS (JetStream), Postgres and Redis each answer within
    `ready_timeout_s`, and the read models are not too far behind the log
    (`projection_lag`: CHAT_EVT's last sequence minus the projection's position;
    unready above `max_projection_lag`); else 503 with the reasons. Events the
    projection could not apply as written do not make the edge unready (the rest
    is served), but are counted here (`parley projections errors` lists them).
    The probe is public and not rate-limited: requests that come together share one
    check, and its answer stands for a second (a flood of probes once made the
    edge look unready: Postgres took longer than the probe allows to answer them)."""
    body, status = await request.app[READINESS].answer(lambda: _readiness(request.app))
    headers = {"Retry-After": str(READY_RETRY_AFTER_S)} if status == 503 else None
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


# Seconds a 503 from /readyz tells a load balancer or a client to wait before it
# looks again. One answer stands for a second after its check, and a check takes
# up to `ready_timeout_s` (1 s): asked again sooner, it could only say the same.
# What makes an edge unready (a server restarting, a NATS leader election, the
# read models catching up) mostly passes within seconds, so not much longer:
# a client that waits for the edge finds it ready soon after it is.
READY_RETRY_AFTER_S = 2


async def _readiness(app: web.Application) -> tuple[bytes, int]:
    timeout = app[CONFIG].ready_timeout_s
    projection_errors: int | None = None
    positions: dict[str, int] | None = None
    stopped: dict[str, str] = {}
    head: int | None = None

    async def nats() -> None:
        nonlocal head
        if not app[NATS].is_connected:
            raise EventLogUnavailable("not connected (the client is reconnecting)")
        head = int((await app[JS].stream_info(EVT_STREAM)).state.last_seq)

    async def postgres() -> None:
        nonlocal projection_errors, positions, stopped
        projection_errors = await app[STORE].projection_error_count()
        positions = dict(await app[STORE].positions())
        stopped = await app[STORE].stopped_projections()

    async def redis() -> None:
        # a write, not a PING: a Redis at its maxmemory, or a read-only replica,
        # answers PING and refuses what parley writes on every keyed request
        await app[REDIS].set(_READY_KEY, b"1", px=10_000)

    # concurrently: a hanging server costs the probe `timeout`, not three of them
    on_nats, on_postgres, on_redis = await asyncio.gather(
        _probe("nats", nats(), timeout),
        _probe("postgres", postgres(), timeout),
        _probe("redis", redis(), timeout),
    )
    reasons = [reason for reason in (on_nats, on_postgres, on_redis) if reason is not None]
    if head is not None and any(at > head for at in (positions or {}).values()):
        # The log's end was read beside the checkpoints, not after them: a projector
        # that applied what was appended meanwhile is past it, and a busy log would
        # pass for one restored from an older copy. Read it again, after them: a
        # checkpoint only moves to positions read from the log, so one still past
        # its end is of another log.
        head = None  # unknown, unless it answers again: no lag, no log that ends before
        await _probe("nats", nats(), timeout)
    lag = _lag(head, app[STORE].last_position)
    bound = app[CONFIG].max_projection_lag
    if lag is not None and bound and lag > bound:
        reasons.append(f"the read models are {lag} events behind the log (bound {bound})")
    # A checkpoint past the log's end: the log was restored or made again (README
    # "Restoring or recreating the log"); the projector refuses it and says why.
    # One reason a projection: the one its projector recorded when it stopped, else
    # (no projector has run since) the one seen here.
    reasons.extend(stopped.values())
    if head is not None:
        reasons.extend(
            log_behind_reason(n, at, head)
            for n, at in (positions or {}).items()
            if at > head and n not in stopped
        )
    body = Readiness(
        status="not_ready" if reasons else "ready",
        checks=Checks(
            nats="down" if on_nats else "ok",
            postgres="down" if on_postgres else "ok",
            redis="down" if on_redis else "ok",
        ),
        reasons=reasons,
        projection_errors=projection_errors,
        projection_lag=lag,
    )
    return msgspec.json.encode(body), 503 if reasons else 200


_READY_KEY = "parley:ready"


def _lag(head: int | None, position: int | None) -> int | None:
    """Log entries the read models have not applied; None when either side is unknown."""
    return max(0, head - position) if head is not None and position is not None else None


async def _probe(name: str, check: Awaitable[None], within_s: float) -> str | None:
    """None when `check` succeeds in time, else why not, in one line. The probe is
    public: what a client library says (an internal host and port, often) goes to
    the log, and the answer names only the kind of failure, or parley's own words."""
    try:
        # not asyncio.timeout: a query cancelled at a hung Postgres would hold the probe
        await bounded(check, within_s)
    except TimeoutError:
        return f"{name}: no answer within {within_s:g} s"
    except UNAVAILABLE as err:
        log.info("readiness check failed", extra={"server": name, "error": describe(err)})
        return _reason(name, err)
    except Exception as err:
        # A server in an odd state (Postgres recovering, a client whose connection broke
        # mid-query) is not ready either; the probe must answer, never fail the request.
        log.warning("readiness check failed", exc_info=err, extra={"server": name})
        return _reason(name, err)
    return None


def _reason(name: str, err: BaseException) -> str:
    if isinstance(err, EventLogError):  # parley's own message: no address in it
        return f"{name}: {type(err).__name__}: {err}"[:300]
    return f"{name}: {type(err).__name__}"


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's registry (parley/metrics.py). Each
    projection's lag and the error count are read now, from the log and Postgres, so
    they are right even when the projectors run elsewhere, or not at all."""
    app = request.app
    timeout = app[CONFIG].ready_timeout_s
    errors = head = None

    async def postgres() -> None:
        nonlocal errors
        errors = await app[STORE].projection_error_count()
        await app[STORE].positions()

    async def nats() -> None:
        nonlocal head
        head = int((await app[JS].stream_info(EVT_STREAM)).state.last_seq)

    # Each left out of this scrape when its server does not answer: an absent sample,
    # not a wrong one. With Postgres away the lag is still known (the position last read
    # cannot have moved), and grows with the log.
    await asyncio.gather(_probe("postgres", postgres(), timeout), _probe("nats", nats(), timeout))
    positions = app[STORE].last_positions
    lags = None if head is None else {name: max(0, head - at) for name, at in positions.items()}
    sink = app[METRICS]
    sink.projection(lags=lags, errors=errors)
    body, content_type = sink.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def index(request: web.Request) -> web.Response:
    page, policy = _page()
    headers = {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
        "Referrer-Policy": "no-referrer",
    }
    return web.Response(text=page, content_type="text/html", headers=headers)


@functools.cache
def _page() -> tuple[str, str]:
    """The web page, and the Content-Security-Policy it is served with: its own inline
    script and style only (by their SHA-256), requests to this edge only, no frames
    of it elsewhere. Text a user or a model wrote that slipped into the page as markup
    could run nothing."""
    page = resources.files("api").joinpath("static/index.html").read_text()

    def hashes(tag: str) -> str:
        found = re.findall(f"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        if not found:
            raise RuntimeError(f"the web page has no inline <{tag}>")  # a policy for nothing
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
            for text in found
        )

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')};"
        " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
    return page, policy


# ---------------------------------------------------------------- the table

# 204: the same request again (its idempotency_key) with a Last-Event-ID at its turn's done
_TURN_ANSWERS: dict[int, Answer] = {200: SSE, 202: TurnAccepted, 204: None}
_CONVERSATION = {"id": "the conversation"}
_MESSAGE = {"id": "the conversation", "mid": "the message"}

# Every route of the edge, once: registered by add_routes and described in /openapi.json.
# `errors`: the statuses a route sends that api.openapi cannot infer from what it takes
# (404 for a project or chat named in the body, 422 for a key used before, 504 for a
# command NATS did not confirm); tests/test_openapi.py checks every status answered.
# fmt: off
ROUTES: tuple[Operation, ...] = (
    Operation("GET", "/", index, "the web page", {200: HTML}, public=True, tag="operations"),
    Operation("GET", "/healthz", healthz, "the process is alive", {200: Health}, public=True, tag="operations"),
    Operation("GET", "/readyz", readyz, "NATS, Postgres and Redis answer (503 with the reasons when not)", {200: Readiness, 503: Readiness}, public=True, tag="operations"),
    Operation("GET", "/metrics", metrics, "Prometheus metrics", {200: PROMETHEUS}, public=True, tag="operations"),
    Operation("GET", "/openapi.json", openapi_json, "this document", {200: dict}, public=True, tag="operations"),
    Operation("POST", "/v1/conversations", create_conversation, "start a conversation", {201: ConversationDetail}, body=CreateConversation, errors=(404,)),
    Operation("GET", "/v1/conversations", list_conversations, "my conversations, latest first, a page at a time", {200: ConversationList}, query=ConversationsQuery),
    Operation("GET", "/v1/conversations/{id}", get_conversation, "a conversation and its active turn", {200: ConversationDetail}, path_params=_CONVERSATION),
    Operation("PATCH", "/v1/conversations/{id}", rename_conversation, "name the conversation (a `title` event, source `user`)", {202: Renamed}, body=RenameBody, errors=(504,), path_params=_CONVERSATION),
    Operation("DELETE", "/v1/conversations/{id}", delete_conversation, "delete the conversation: its turns stopped (billed), its content erased from the log and the read models; 404 from then on", {202: Deleted}, errors=(504,), path_params=_CONVERSATION),
    Operation("POST", "/v1/conversations/{id}/messages", post_message, "send a message: its turn's SSE stream, or 202 with Accept: application/json", _TURN_ANSWERS, body=PostMessage, errors=(409, 422, 504), headers=ResumeHeaders, path_params=_CONVERSATION),
    Operation("GET", "/v1/conversations/{id}/messages", list_messages, "the projected messages (latest versions, or all): every one, or the last page of them", {200: MessageList}, query=MessagesQuery, path_params=_CONVERSATION),
    Operation("PATCH", "/v1/conversations/{id}/messages/{mid}", edit_message, "edit a user message: a new version and a new turn", _TURN_ANSWERS, body=EditBody, errors=(409, 422, 504), headers=ResumeHeaders, path_params=_MESSAGE),
    Operation("POST", "/v1/conversations/{id}/messages/{mid}/regenerate", regenerate, "a new version of an answer", _TURN_ANSWERS, body=RegenerateBody, body_required=False, errors=(409, 422, 504), headers=ResumeHeaders, path_params=_MESSAGE),
    Operation("POST", "/v1/conversations/{id}/cancel", cancel_turn, "stop the active turn", {200: CancelAnswer, 202: CancelAnswer}, errors=(504,), path_params=_CONVERSATION),
    Operation("GET", "/v1/conversations/{id}/events", conversation_events, "the conversation's events: catch-up, then live", {200: SSE}, query=ResumeQuery, headers=ResumeHeaders, path_params=_CONVERSATION),
    Operation("GET", "/v1/conversations/{id}/log", conversation_log, "the raw event log as JSON lines", {200: NDJSON}, query=LogQuery, path_params=_CONVERSATION),
    Operation("POST", "/v1/projects", create_project, "create a project; the creator is a member", {201: ProjectInfo}, body=CreateProject, tag="projects"),
    Operation("POST", "/v1/projects/{id}/members", add_member, "add a member (members only; 200: a member already)", {200: ProjectInfo, 201: ProjectInfo}, body=AddMember, path_params={"id": "the project"}, tag="projects"),
    Operation("GET", "/v1/projects", list_projects, "the projects I belong to", {200: ProjectList}, tag="projects"),
    Operation("POST", "/v1/billing/accounts/{kind}/{id}/credits", grant_credits, "grant credits (admin token)", {201: CreditsGrant}, body=GrantCredits, errors=(403, 422), path_params={"kind": "`user` or `project`", "id": "the user or project"}, path_types={"kind": AccountKind}, tag="billing"),
    Operation("GET", "/v1/billing/accounts/{kind}/{id}", get_account, "an account's balance (mine, my project's; any with an admin token)", {200: AccountView}, path_params={"kind": "`user` or `project`", "id": "the user or project"}, path_types={"kind": AccountKind}, tag="billing"),
    Operation("GET", "/v1/billing/ledger", get_ledger, "ledger entries, one per billed turn", {200: Ledger}, query=LedgerQuery, errors=(404,), tag="billing"),
    Operation("GET", "/v1/models", list_models, "the configured models, their version in force and prices", {200: ModelList}, tag="models"),
    Operation("POST", "/v1/ai-sdk/chat", ai_sdk.chat, "useChat's request: the turn as an AI SDK UI message stream", {200: AI_SDK_STREAM}, body=ai_sdk.ChatRequest, errors=(404, 409, 422, 504), tag="ai-sdk"),
    Operation("GET", "/v1/ai-sdk/chat/{id}/stream", ai_sdk.resume, "useChat's resume: the active turn from its start (204: none)", {200: AI_SDK_STREAM, 204: None}, path_params={"id": "the chat (conversation)"}, tag="ai-sdk"),
)
# fmt: on


def add_routes(app: web.Application) -> None:
    register(app, ROUTES)
    try:
        version = metadata.version("parley")
    except metadata.PackageNotFoundError:
        version = "0"
    doc = document(ROUTES, title="parley", version=version)
    app[OPENAPI] = msgspec.json.encode(doc)
