"""Projects and credits: creating a project, adding members, granting credits.

A project and an account are subjects of the log like conversations, so these
routes append events (`project_created`, `member_added`, `credits_granted`)
with the single-writer check; what they show back (lists, balances, the
ledger) is read from the projections.

Who may do what: any user creates projects; a member adds members; only an
admin token grants credits (and an admin token gives no other power: it reads
no one else's conversations or projects).
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Literal, get_args

import msgspec
from aiohttp import web

from api.access import owned_conversation, project_of_member
from api.context import CONFIG, LOG, PROJECTS, REDIS, STORE, claims_of
from api.errors import ApiError, bad_request, not_found
from api.responses import (
    AccountView,
    CreditsGrant,
    Ledger,
    LedgerEntry,
    ModelList,
    ProjectInfo,
    ProjectList,
    ProjectSummary,
    answer,
    instant,
)
from api.turn_routes import read_json, read_params
from api.validation import ID_RULE, MAX_POSITION, Id, IdempotencyKey, refused
from events.errors import EventLogConflict
from events.ids import new_id
from events.subjects import account_subject, project_subject, valid_id
from events.vocabulary import CreditsGranted, MemberAdded, ProjectCreated
from projections.models import list_models as models_of
from projections.store import LedgerFilter, ProjectRow

_NAME_MAX = 200
_GRANT_MAX = 10**15  # a billion credits: anything above is a typo
_NOTE_MAX = 500
_ATTEMPTS = 5
_LEDGER_PAGE = 500  # entries at most per GET /v1/billing/ledger
# Redis keys: a keyed grant's position in the log, for as long as message keys last.
_GRANT_KEYS = "parley:grant:"


# the `kind` of an account's path
AccountKind = Literal["user", "project"]


class CreateProject(msgspec.Struct, frozen=True):
    # runs of whitespace become one space
    name: Annotated[
        str,
        refused(
            f"name must be 1-{_NAME_MAX} characters",
            min_length=1,
            max_length=_NAME_MAX,
            pattern=r"\S",
        ),
    ]


class AddMember(msgspec.Struct, frozen=True):
    user_id: Id


class LedgerQuery(msgspec.Struct, frozen=True):
    """GET /v1/billing/ledger: none of them, the caller's own turns."""

    project: Id | None = None
    user: Id | None = None  # who asked for the turn
    conversation: Id | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=_LEDGER_PAGE, description="at most this many")] = (
        _LEDGER_PAGE
    )
    after: Annotated[
        int,
        msgspec.Meta(
            ge=0, le=MAX_POSITION, description="the `next` of the page before: entries after it"
        ),
    ] = 0


class GrantCredits(msgspec.Struct, frozen=True):
    micro_credits: Annotated[
        int,
        refused(f"micro_credits must be between 1 and {_GRANT_MAX}", ge=1, le=_GRANT_MAX),
    ]
    note: Annotated[
        str, refused(f"note longer than {_NOTE_MAX} characters", max_length=_NOTE_MAX)
    ] = ""
    idempotency_key: IdempotencyKey | None = None


async def create_project(request: web.Request) -> web.Response:
    body = await read_json(request, CreateProject)
    name = " ".join(body.name.split())  # not blank, and no longer than it came
    creator = claims_of(request).sub
    project_id = new_id()
    event = ProjectCreated(
        conversation_id="",
        at=time.time_ns(),
        event_id=new_id(),
        project_id=project_id,
        name=name,
        created_by=creator,
    )
    await request.app[LOG].append_to(project_subject(project_id), [event], 0)
    return answer(ProjectInfo(id=project_id, name=name, members=[creator]), status=201)


async def add_member(request: web.Request) -> web.Response:
    project = await project_of_member(request, request.match_info["id"])
    body = await read_json(request, AddMember)
    if not valid_id(body.user_id):  # a trailing newline passes the pattern
        raise bad_request(ID_RULE.format(field="user_id"))
    event_log = request.app[LOG]
    subject = project_subject(project.project_id)
    added = False
    for _ in range(_ATTEMPTS):
        current = await request.app[PROJECTS].get(event_log, project.project_id, fresh=True)
        if body.user_id in current.members:
            break
        event = MemberAdded(
            conversation_id="",
            at=time.time_ns(),
            event_id=new_id(),
            project_id=project.project_id,
            user_id=body.user_id,
            added_by=claims_of(request).sub,
        )
        try:
            await event_log.append_to(subject, [event], await event_log.last_seq_of(subject))
            added = True
            break
        except EventLogConflict:
            continue  # another member was added meanwhile: look again
    current = await request.app[PROJECTS].get(event_log, project.project_id, fresh=True)
    return answer(
        ProjectInfo(id=current.project_id, name=current.name, members=sorted(current.members)),
        status=201 if added else 200,  # 200: a member already, nothing added
    )


async def grant_credits(request: web.Request) -> web.Response:
    claims = claims_of(request)
    if not claims.adm:
        raise ApiError(403, "forbidden", "granting credits needs an admin token")
    kind, owner = _account_path(request)
    body = await read_json(request, GrantCredits)
    event_log = request.app[LOG]
    if kind == "project":
        await _existing_project(request, owner)
    account = f"{kind}:{owner}"
    key = body.idempotency_key
    # With a key, the event's id is derived from it: a grant sent twice within the
    # stream's duplicate window is one event, and its ack names the first copy.
    keyed = (
        hashlib.sha256(f"{account}\x00{key}".encode()).hexdigest()[:32] if key is not None else None
    )
    event = CreditsGranted(
        conversation_id="",
        at=time.time_ns(),
        event_id=f"grant-{keyed}" if keyed else new_id(),
        account=account,
        amount=body.micro_credits,
        note=body.note,
        granted_by=claims.sub,
    )
    redis = request.app[REDIS]
    kept = await redis.get(f"{_GRANT_KEYS}{keyed}") if keyed else None
    remembered = None if kept is None else int(kept)
    if remembered is None and keyed:
        # Not in Redis (lost: a flush, an eviction, a restart without its data; or
        # kept longer than Redis keeps it): the read model knows every grant by its
        # id, which the key makes. Granting again would add the amount twice.
        remembered = await request.app[STORE].grant_seq(event.event_id)
    if remembered is not None:  # after the duplicate window: the log says what it granted
        return await _granted_once(request, event, remembered)
    subject = account_subject(account)
    for _ in range(_ATTEMPTS):
        try:
            seq = await event_log.append_to(subject, [event], await event_log.last_seq_of(subject))
            break
        except EventLogConflict:
            continue  # a turn reserved or was charged meanwhile: append after it
    else:
        raise ApiError(503, "unavailable", "the account is busy; try again")
    if not keyed:
        return answer(CreditsGrant(account=account, granted=event.amount, seq=seq), status=201)
    await redis.set(f"{_GRANT_KEYS}{keyed}", seq, ex=request.app[CONFIG].idempotency_ttl_s)
    return await _granted_once(request, event, seq)


async def _granted_once(request: web.Request, event: CreditsGranted, seq: int) -> web.Response:
    """The answer to a keyed grant: the grant at `seq`, if it is this same grant.

    A key used before for another amount or note is refused (422), never
    answered as if this grant had been made."""
    stored = await request.app[LOG].at(seq)
    first = stored.event if stored is not None else None
    if not isinstance(first, CreditsGranted) or first.event_id != event.event_id:
        raise ApiError(503, "unavailable", "the grant for this idempotency_key is not in the log")
    if (first.amount, first.note) != (event.amount, event.note):
        raise ApiError(
            422, "idempotency_mismatch", "idempotency_key was already used with a different grant"
        )
    return answer(CreditsGrant(account=first.account, granted=first.amount, seq=seq), status=201)


# ---------------------------------------------------------------- reads (the projections)


async def list_projects(request: web.Request) -> web.Response:
    rows = await request.app[STORE].projects_of(claims_of(request).sub)
    return answer(ProjectList(projects=[_project(row) for row in rows]))


def _project(row: ProjectRow) -> ProjectSummary:
    return ProjectSummary(
        id=row.id,
        name=row.name,
        created_by=row.created_by,
        created_at=instant(row.created_at),
        members=row.members,
    )


async def get_account(request: web.Request) -> web.Response:
    """An account's balance (who may see it: the user themself, a project's members, an
    admin). Micro-credits; the balance is negative when turns ran into debt."""
    kind, owner = _account_path(request)
    await _may_see_account(request, kind, owner)
    account = f"{kind}:{owner}"
    row = await request.app[STORE].account(account)
    granted, charged, reserved = (row.granted, row.charged, row.reserved) if row else (0, 0, 0)
    balance = granted - charged
    return answer(
        AccountView(
            account=account,
            kind=kind,
            id=owner,
            balance_micro_credits=balance,
            available_micro_credits=balance - reserved,
            reserved_micro_credits=reserved,
            granted_micro_credits=granted,
            charged_micro_credits=charged,
            debt_micro_credits=max(0, -balance),
        )
    )


async def get_ledger(request: web.Request) -> web.Response:
    """Ledger entries, one per billed turn: `?project=`, `?user=` (who asked),
    `?conversation=`; with none, the caller's own turns. Another user's rows only
    within a project or conversation the caller may see."""
    claims = claims_of(request)
    query = read_params(request.query, LedgerQuery)
    where = LedgerFilter(project=query.project, user=query.user, conversation=query.conversation)
    for name, value in (
        ("project", where.project),
        ("user", where.user),
        ("conversation", where.conversation),
    ):
        if value is not None and not valid_id(value):  # a trailing newline passes the pattern
            raise bad_request(ID_RULE.format(field=name))
    if not claims.adm:
        if where.project is not None:
            await project_of_member(request, where.project)
        within = where.project is not None or where.conversation is not None
        if where.user not in (None, claims.sub) and not within:
            raise not_found("user")  # another's rows only within what the caller may see
        if where.conversation is not None:
            await owned_conversation(request, where.conversation)
        if where == LedgerFilter():
            where = LedgerFilter(user=claims.sub)
    # one row more than the page: whether another page follows
    rows = await request.app[STORE].ledger(where, limit=query.limit + 1, after=query.after)
    page = rows[: query.limit]
    entries = [{**msgspec.to_builtins(row), "charged_at": instant(row.charged_at)} for row in page]
    return answer(
        Ledger(
            entries=msgspec.convert(entries, list[LedgerEntry]),
            next=page[-1].seq if len(rows) > query.limit else None,
        )
    )


async def list_models(request: web.Request) -> web.Response:
    """The configured models, each with its version in force and its prices."""
    listings = await models_of(request.app[STORE].queries)
    return answer(msgspec.convert(msgspec.to_builtins({"models": listings}), ModelList))


async def _may_see_account(request: web.Request, kind: str, owner: str) -> None:
    claims = claims_of(request)
    if claims.adm:
        # any account, but only of a project that exists, as a grant to it (a user
        # is anyone a token names: their account exists before their first credit)
        if kind == "project":
            await _existing_project(request, owner)
        return
    if kind == "user" and owner != claims.sub:
        raise not_found("account")
    if kind == "project":
        try:
            await project_of_member(request, owner)
        except ApiError:
            raise not_found("account") from None


async def _existing_project(request: web.Request, project_id: str) -> None:
    """404 unless the project exists (whoever asks; a member's own check is
    api.access.project_of_member). Read from the log when the cache does not know
    it: a project created a moment ago, through another edge, exists."""
    cache, event_log = request.app[PROJECTS], request.app[LOG]
    project = await cache.get(event_log, project_id)
    if not project.exists:
        project = await cache.get(event_log, project_id, fresh=True)
    if not project.exists:
        raise not_found("project")


def _account_path(request: web.Request) -> tuple[AccountKind, str]:
    kind, owner = request.match_info["kind"], request.match_info["id"]
    if kind not in get_args(AccountKind) or not valid_id(owner):
        raise not_found("account")
    return ("user" if kind == "user" else "project"), owner
