"""What the edge answers with: the JSON bodies of DESIGN section 5, as msgspec Structs.

Handlers build these and `answer` encodes them, and the route table
(`api.routes.ROUTES`) names the same types, so `/openapi.json` describes what is
really sent (api/openapi.py). A shape is changed here, once.

Rules: new fields get defaults or are additive (clients ignore keys they do not
know, and the schemas do not forbid extra keys); the `data` of SSE events is
not here, it is fixed by DESIGN section 6 (api/sse.py). What may not enter:
I/O, request parsing.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from events.codec import timestamp
from projections.store import MessageFields, MessageRow

# Every time the edge answers with is in this one form (`instant`).
Timestamp = Annotated[
    str,
    msgspec.Meta(
        description="RFC 3339, UTC, to the microsecond: `2026-11-30T12:38:16.305707Z`",
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
    ),
]


def instant(at: dt.datetime | int) -> str:
    """A time as the edge says it (`Timestamp`): a row's datetime, or an event's `at`
    (ns) as its row will hold it, so an answer given before the row exists is the
    answer given after."""
    when = timestamp(at) if isinstance(at, int) else at
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def answer(body: msgspec.Struct, status: int = 200) -> web.Response:
    """A JSON response with `body` as the client will read it."""
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


class ErrorDetail(msgspec.Struct, frozen=True):
    code: Annotated[str, msgspec.Meta(description="stable, for programs: `not_found`, `busy`, ...")]
    message: Annotated[str, msgspec.Meta(description="for people")]
    # UNSET, not None: absent (an answer of the listener itself, before any request), never null
    request_id: (
        Annotated[
            str, msgspec.Meta(description="the request's `X-Request-Id`, to quote in a report")
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error (api/errors.py). The error object may carry more keys (a busy turn's `turn_id`)."""

    error: ErrorDetail


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok"] = "ok"


CheckState = Literal["ok", "down"]


class Checks(msgspec.Struct, frozen=True):
    nats: CheckState
    postgres: CheckState
    redis: CheckState


class Readiness(msgspec.Struct, frozen=True):
    """GET /readyz: flat, so each check adds its own keys beside the others."""

    status: Literal["ready", "not_ready"]
    checks: Checks
    # why not ready, one sentence per cause; empty when ready
    reasons: list[str]
    # events the projection recorded as skipped or sanitised (None: Postgres did not answer)
    projection_errors: int | None
    # events the read models are behind the log (None: NATS or Postgres did not answer)
    projection_lag: int | None = None


class ActiveTurn(msgspec.Struct, frozen=True):
    # None: a request accepted, its turn about to start
    turn_id: str | None
    started_at: Timestamp


class ConversationInfo(msgspec.Struct, frozen=True):
    id: str
    user_id: str
    project_id: str | None
    title: str
    model: str | None
    message_count: int
    token_usage_total: int
    created_at: Timestamp
    updated_at: Timestamp


class ConversationDetail(ConversationInfo, frozen=True):
    active_turn: ActiveTurn | None


class ConversationList(msgspec.Struct, frozen=True):
    conversations: list[ConversationDetail]
    # the next page's `?before=`; None: this is the last page
    next: str | None = None


class MessageView(MessageFields, frozen=True):
    """A message as the API shows it: its row (projections.store.MessageRow), times as
    `Timestamp`s."""

    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, row: MessageRow) -> MessageView:
        fields = msgspec.structs.asdict(row)
        fields.update(created_at=instant(row.created_at), updated_at=instant(row.updated_at))
        return cls(**fields)


class MessageList(msgspec.Struct, frozen=True):
    messages: list[MessageView]
    # with `?limit=`: the `?before=` of the page before this one; None: no messages
    # before these (and always None without `?limit=`: every message is here)
    next: str | None = None


class TurnAccepted(msgspec.Struct, frozen=True):
    """A message, edit or regeneration asked for with `Accept: application/json`."""

    # the new message's id (None for a regeneration: its answer gets its id when it starts)
    message_id: str | None
    command_id: str
    conversation_id: str
    # the log position the turn's events follow: resume the stream from here
    after: int
    # the actor accepted it already (False: no answer yet; the request waits its turn)
    accepted: bool


class Renamed(msgspec.Struct, frozen=True):
    """The new name, accepted: the `title` event follows on the conversation's stream."""

    id: str
    title: str


class Deleted(msgspec.Struct, frozen=True):
    """The conversation is deleted: its turns stopped, its content erased from the log."""

    id: str
    deleted: bool


class CancelAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    cancelled: bool
    turn_id: str | None
    message: str = ""


class ProjectInfo(msgspec.Struct, frozen=True):
    id: str
    name: str
    members: list[str]


class ProjectSummary(msgspec.Struct, frozen=True):
    id: str
    name: str
    created_by: str
    created_at: Timestamp
    members: list[str]


class ProjectList(msgspec.Struct, frozen=True):
    projects: list[ProjectSummary]


class AccountView(msgspec.Struct, frozen=True):
    """An account's money, in micro-credits (1 credit = 1,000,000)."""

    account: str
    kind: Literal["user", "project"]
    id: str
    balance_micro_credits: Annotated[
        int, msgspec.Meta(description="granted - charged; negative is debt")
    ]
    available_micro_credits: Annotated[int, msgspec.Meta(description="balance - reserved")]
    reserved_micro_credits: int
    granted_micro_credits: int
    charged_micro_credits: int
    debt_micro_credits: int


class LedgerEntry(msgspec.Struct, frozen=True):
    """One billed turn's charge, at the prices its `started` recorded."""

    turn_id: str
    account: str
    conversation_id: str
    project_id: str | None
    user_id: str
    input_tokens: int
    output_tokens: int
    input_price: float
    output_price: float
    tokens_estimated: bool
    cost: int
    reserved: int
    debt: int
    turn_end: str
    charged_at: Timestamp
    seq: int


class Ledger(msgspec.Struct, frozen=True):
    entries: list[LedgerEntry]
    # the next page's `?after=`; None: this is the last page
    next: int | None = None


class ModelVersionInfo(msgspec.Struct, frozen=True):
    version: str
    status: str
    is_default: bool
    release_date: str | None
    input_price: float
    output_price: float


class ModelInfo(msgspec.Struct, frozen=True):
    name: str
    is_default: bool
    max_output_tokens: int | None
    active_version: str | None
    input_price: float | None
    output_price: float | None
    versions: list[ModelVersionInfo]


class ModelList(msgspec.Struct, frozen=True):
    models: list[ModelInfo]


class CreditsGrant(msgspec.Struct, frozen=True):
    account: Annotated[str, msgspec.Meta(description="`user:<id>` or `project:<id>`")]
    granted: Annotated[int, msgspec.Meta(description="micro-credits")]
    seq: Annotated[int, msgspec.Meta(description="the grant's position in the log")]
