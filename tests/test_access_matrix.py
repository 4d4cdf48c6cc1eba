"""Who may use which route, for every route of `api.routes.ROUTES` (README "Tokens",
"Projects and billing"; DESIGN section 5): each route is named in `MATRIX` with what
its path names, so a route added without a place here fails
`test_every_route_has_a_place_in_the_matrix` until someone says who may use it.

The callers: the conversation's owner; a member of its project added after the
conversation was made; a stranger; an admin token (which reads no one's
conversations). What may not be seen answers 404 byte for byte as a thing that never
existed does (no existence leak); a missing or refused token is 401 on every
route that is not public; 403 only for a grant without an admin token.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import pytest

from api.routes import ROUTES
from events.ids import new_id
from parley.services import Services
from tests.conftest import token_for
from tests.sse import SseClient, until_done

# What the `{id}` of a route's path names, or what the route is scoped to.
Scope = Literal["public", "caller", "conversation", "chat", "project", "account"]

MATRIX: dict[tuple[str, str], Scope] = {
    ("GET", "/"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/metrics"): "public",
    ("GET", "/openapi.json"): "public",
    ("POST", "/v1/conversations"): "caller",
    ("GET", "/v1/conversations"): "caller",
    ("GET", "/v1/conversations/{id}"): "conversation",
    ("PATCH", "/v1/conversations/{id}"): "conversation",
    ("DELETE", "/v1/conversations/{id}"): "conversation",
    ("POST", "/v1/conversations/{id}/messages"): "conversation",
    ("GET", "/v1/conversations/{id}/messages"): "conversation",
    ("PATCH", "/v1/conversations/{id}/messages/{mid}"): "conversation",
    ("POST", "/v1/conversations/{id}/messages/{mid}/regenerate"): "conversation",
    ("POST", "/v1/conversations/{id}/cancel"): "conversation",
    ("GET", "/v1/conversations/{id}/events"): "conversation",
    ("GET", "/v1/conversations/{id}/log"): "conversation",
    ("POST", "/v1/projects"): "caller",
    ("POST", "/v1/projects/{id}/members"): "project",
    ("GET", "/v1/projects"): "caller",
    ("POST", "/v1/billing/accounts/{kind}/{id}/credits"): "account",
    ("GET", "/v1/billing/accounts/{kind}/{id}"): "account",
    ("GET", "/v1/billing/ledger"): "caller",
    ("GET", "/v1/models"): "caller",
    ("POST", "/v1/ai-sdk/chat"): "chat",
    # as its POST, it tells an id in use from one never used (`useChat`'s `resume` asks
    # on a new chat's page too: nothing runs there, 204); another's chat is 404
    ("GET", "/v1/ai-sdk/chat/{id}/stream"): "chat",
}

NEVER = "01NEVERMADE0000000000000000"  # an id nothing ever had


@dataclass(frozen=True)
class World:
    """One owner's personal conversation and project conversation (each with a turn
    run), a member added to the project after that, a stranger with a conversation of
    their own, and an admin."""

    owner: SseClient
    member: SseClient
    stranger: SseClient
    admin: SseClient
    owner_id: str
    project: str
    personal: str  # the owner's
    shared: str  # in the project
    theirs: str  # the stranger's
    asked: dict[str, str]  # conversation -> its user message
    answered: dict[str, str]  # conversation -> its answer


async def _turn(client: SseClient, conversation_id: str) -> tuple[str, str]:
    events = await client.send_stream(conversation_id, "hello [[tokens=2]]")
    assert events[-1].data == "ok", events
    started = next(e.data for e in events if e.event == "started")
    return started["user_message_id"], started["message_id"]


@pytest.fixture(scope="module")
async def world(services: Services, http: aiohttp.ClientSession) -> World:
    owner_id = f"owner-{new_id()}"

    def client(user: str, *, admin: bool = False) -> SseClient:
        return SseClient(http, services.edge_url, token_for(user, admin=admin))

    owner = client(owner_id)
    member, stranger = client(f"member-{owner_id}"), client(f"stranger-{owner_id}")
    status, body = await owner.request("POST", "/v1/projects", json={"name": "matrix"})
    assert status == 201, body
    project = body["id"]
    personal = (await owner.create_conversation())["id"]
    shared = (await owner.create_conversation(project_id=project))["id"]
    theirs = (await stranger.create_conversation())["id"]
    admin = client(f"admin-{owner_id}", admin=True)
    status, body = await admin.request(
        "POST", f"/v1/billing/accounts/project/{project}/credits", json={"micro_credits": 10**9}
    )
    assert status == 201, body  # the project's turns are paid for
    turns = await asyncio.gather(
        _turn(owner, personal), _turn(owner, shared), _turn(stranger, theirs)
    )
    # the member joins after the conversation was made and answered
    status, body = await owner.request(
        "POST", f"/v1/projects/{project}/members", json={"user_id": f"member-{owner_id}"}
    )
    assert status == 201, body
    ids = (personal, shared, theirs)
    return World(
        owner=owner,
        member=member,
        stranger=stranger,
        admin=admin,
        owner_id=owner_id,
        project=project,
        personal=personal,
        shared=shared,
        theirs=theirs,
        asked={cid: turn[0] for cid, turn in zip(ids, turns, strict=True)},
        answered={cid: turn[1] for cid, turn in zip(ids, turns, strict=True)},
    )


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()


_JSON = (("Accept", "application/json"),)


def _chat(chat_id: str, **more: Any) -> dict[str, Any]:
    said = {"id": f"m-{new_id()}", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    return {"id": chat_id, "messages": [said], **more}


def conversation_call(method: str, path: str, cid: str, asked: str, answered: str) -> list[Call]:
    """The requests one conversation route is tried with, for conversation `cid`."""
    at = path.replace("{id}", cid)
    if "{mid}" in path:
        mid = asked if method == "PATCH" else answered
        at = at.replace("{mid}", mid)
    match method, path:
        case "POST", "/v1/conversations/{id}/messages":
            return [Call(method, at, {"content": "hi"}, _JSON)]
        case "PATCH", "/v1/conversations/{id}":
            return [Call(method, at, {"title": "renamed"})]
        case "PATCH", _:
            return [Call(method, at, {"content": "edited"}, _JSON)]
        case "POST", "/v1/conversations/{id}/messages/{mid}/regenerate":
            return [Call(method, at, {}, _JSON)]
        case "GET", "/v1/conversations/{id}/messages":
            return [Call(method, at), Call(method, at + "?versions=all")]
        case "GET", "/v1/conversations/{id}/events":
            return [
                Call(method, at + "?after=0"),
                Call(method, at, None, (("Last-Event-ID", "1"),)),
            ]
        case _:
            return [Call(method, at)]


async def send(
    client: SseClient | None, call: Call, http: aiohttp.ClientSession, base: str
) -> tuple[int, bytes]:
    # one request id for every call: answers are compared byte for byte, and each
    # error names its request
    headers = {"X-Request-Id": "access-matrix", **dict(call.headers)}
    if client is not None:
        headers["Authorization"] = f"Bearer {client.token}"
    data = None if call.body is None else json.dumps(call.body).encode()
    async with http.request(call.method, base + call.path, data=data, headers=headers) as response:
        if response.content_type == "text/event-stream":
            return response.status, b""  # an open stream: its status is the answer here
        return response.status, await response.read()


def _unsigned_token(user: str) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': user, 'exp': 4102444800})}."


# ---------------------------------------------------------------- the tests


def test_every_route_has_a_place_in_the_matrix() -> None:
    routes = {(op.method, op.path) for op in ROUTES}
    assert routes == set(MATRIX), (
        f"routes with no place in MATRIX: {sorted(routes - set(MATRIX))}; "
        f"in MATRIX but served by no route: {sorted(set(MATRIX) - routes)}"
    )
    assert {(op.method, op.path) for op in ROUTES if op.public} == {
        key for key, scope in MATRIX.items() if scope == "public"
    }


PRIVATE = sorted(key for key, scope in MATRIX.items() if scope != "public")


@pytest.mark.parametrize("route", PRIVATE, ids=[f"{m} {p}" for m, p in PRIVATE])
async def test_every_private_route_is_401_without_a_token_or_with_a_refused_one(
    world: World, services: Services, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    method, path = route
    at = (
        path.replace("{kind}", "user")
        .replace("{id}", world.personal)
        .replace("{mid}", world.asked[world.personal])
    )
    body: dict[str, Any] | None = {} if method != "GET" else None
    for token, challenge in (
        (None, "Bearer"),
        (_unsigned_token(world.owner_id), 'Bearer error="invalid_token"'),
    ):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with http.request(
            method, services.edge_url + at, json=body, headers=headers
        ) as response:
            answer = await response.json()
            assert response.status == 401, (route, token is not None, response.status, answer)
            assert answer["error"]["code"] == "unauthorized", answer
            assert response.headers.get("WWW-Authenticate") == challenge, response.headers


CONVERSATION = sorted(key for key, scope in MATRIX.items() if scope == "conversation")
OUTSIDERS = ("stranger", "admin")


@pytest.mark.parametrize("route", CONVERSATION, ids=[f"{m} {p}" for m, p in CONVERSATION])
async def test_a_conversation_one_may_not_see_answers_as_one_that_never_was(
    world: World, services: Services, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """The stranger and the admin, on the owner's personal and project conversations,
    get what a conversation that never existed gets, byte for byte."""
    method, path = route
    for who in OUTSIDERS:
        caller: SseClient = getattr(world, who)
        for cid in (world.personal, world.shared):
            asked, answered = world.asked[cid], world.answered[cid]
            foreign = conversation_call(method, path, cid, asked, answered)
            never = conversation_call(method, path, NEVER, asked, answered)
            for seen, unseen in zip(foreign, never, strict=True):
                answer = await send(caller, seen, http, services.edge_url)
                status, body = await send(caller, unseen, http, services.edge_url)
                assert answer[0] == 404, (who, seen, answer)
                assert answer == (status, body.replace(NEVER.encode(), cid.encode())), (who, seen)


@pytest.mark.parametrize("route", CONVERSATION, ids=[f"{m} {p}" for m, p in CONVERSATION])
async def test_the_owner_and_a_member_added_later_are_let_in(
    world: World, services: Services, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """Not refused: the owner on both conversations, the member on the project's.
    A write is the later member's, on a project conversation of its own (an edit or
    a regeneration would take the others' messages off the branch in force)."""
    method, path = route
    if method == "GET":
        callers = [(world.owner, world.personal), (world.owner, world.shared)]
        callers.append((world.member, world.shared))
        asked, answered = world.asked, world.answered
    else:
        cid = (await world.owner.create_conversation(project_id=world.project))["id"]
        asked, answered = dict(world.asked), dict(world.answered)
        asked[cid], answered[cid] = await _turn(world.owner, cid)
        callers = [(world.member, cid)]
    for caller, cid in callers:
        for call in conversation_call(method, path, cid, asked[cid], answered[cid]):
            status, body = await send(caller, call, http, services.edge_url)
            assert status in (200, 202, 204), (call, status, body)


async def test_the_ai_sdk_chat_of_someone_else_is_404_and_a_new_id_is_the_callers(
    world: World, services: Services, http: aiohttp.ClientSession
) -> None:
    for who in OUTSIDERS:
        caller: SseClient = getattr(world, who)
        for cid in (world.personal, world.shared):
            status, body = await send(
                caller, Call("POST", "/v1/ai-sdk/chat", _chat(cid)), http, services.edge_url
            )
            assert status == 404, (who, status, body)
            regenerate = _chat(cid, trigger="regenerate-message", messageId=world.answered[cid])
            status, body = await send(
                caller, Call("POST", "/v1/ai-sdk/chat", regenerate), http, services.edge_url
            )
            never = _chat(NEVER, trigger="regenerate-message", messageId=world.answered[cid])
            status_never, body_never = await send(
                caller, Call("POST", "/v1/ai-sdk/chat", never), http, services.edge_url
            )
            assert status == status_never == 404, (who, status, body)
            assert body.replace(cid.encode(), b"ID") == body_never.replace(NEVER.encode(), b"ID")
            resume = Call("GET", f"/v1/ai-sdk/chat/{cid}/stream")
            status, body = await send(caller, resume, http, services.edge_url)
            assert status == 404, (who, status, body)
    # resuming: nothing runs in a chat not begun, nor in the owner's now
    for caller, cid in ((world.stranger, NEVER), (world.owner, world.personal)):
        resume = Call("GET", f"/v1/ai-sdk/chat/{cid}/stream")
        assert (await send(caller, resume, http, services.edge_url))[0] == 204
    # an id no conversation has makes one, the caller's alone
    fresh = new_id()
    status, _ = await send(
        world.stranger, Call("POST", "/v1/ai-sdk/chat", _chat(fresh)), http, services.edge_url
    )
    assert status == 200
    assert (await world.stranger.request("GET", f"/v1/conversations/{fresh}"))[0] == 200
    assert (await world.owner.request("GET", f"/v1/conversations/{fresh}"))[0] == 404


async def test_a_message_id_of_another_conversation_is_not_found_in_this_one(
    world: World, services: Services, http: aiohttp.ClientSession
) -> None:
    """Another user's message, and the same user's message of another conversation,
    answer under this conversation's path as a message that never existed does."""
    cases = (
        (world.owner, world.personal, world.theirs),  # another user's messages
        (world.owner, world.personal, world.shared),  # the same user's, elsewhere
        (world.stranger, world.theirs, world.personal),
    )
    for caller, here, elsewhere in cases:
        for method, suffix, mid, body in (
            ("PATCH", "", world.asked[elsewhere], {"content": "edited"}),
            ("POST", "/regenerate", world.answered[elsewhere], {}),
        ):
            answers = []
            for message in (mid, NEVER):
                call = Call(
                    method, f"/v1/conversations/{here}/messages/{message}{suffix}", body, _JSON
                )
                status, text = await send(caller, call, http, services.edge_url)
                answers.append((status, text.replace(message.encode(), b"MID")))
            assert answers[0][0] == 404 and answers[0] == answers[1], (here, elsewhere, answers)


async def test_resuming_at_a_position_of_another_conversation_shows_only_this_one(
    world: World, services: Services, http: aiohttp.ClientSession
) -> None:
    """SSE ids are positions in the one log all conversations share: one of another
    conversation's is a place to resume from, and what follows is this one's alone."""

    async def positions(client: SseClient, cid: str) -> list[int]:
        status, log = await client.request("GET", f"/v1/conversations/{cid}/log")
        assert status == 200, log
        return [json.loads(line)["seq"] for line in log.splitlines()]

    mine = await positions(world.owner, world.personal)
    theirs = [seq for seq in await positions(world.stranger, world.theirs) if seq < mine[-1]]
    assert theirs, "the stranger's conversation began before the owner's ended"
    for position in (theirs[0], theirs[len(theirs) // 2]):
        async with world.owner.events(world.personal, last_event_id=str(position)) as response:
            assert response.status == 200
            async with asyncio.timeout(10):
                events = await until_done(response)
        shown = {int((e.id or "0").partition("-")[0]) for e in events}
        assert events and shown <= set(mine), (position, sorted(shown - set(mine)))


async def test_projects_and_accounts_one_may_not_see_answer_as_ones_that_never_were(
    world: World, services: Services, http: aiohttp.ClientSession
) -> None:
    never_user = f"nobody-{new_id()}"
    pairs = [
        (
            Call("POST", f"/v1/projects/{world.project}/members", {"user_id": "x"}),
            Call("POST", f"/v1/projects/{NEVER}/members", {"user_id": "x"}),
        ),
        (
            Call("POST", "/v1/conversations", {"project_id": world.project}),
            Call("POST", "/v1/conversations", {"project_id": NEVER}),
        ),
        (
            Call("POST", "/v1/ai-sdk/chat", _chat(new_id(), project_id=world.project)),
            Call("POST", "/v1/ai-sdk/chat", _chat(new_id(), project_id=NEVER)),
        ),
        (
            Call("GET", f"/v1/billing/ledger?project={world.project}"),
            Call("GET", f"/v1/billing/ledger?project={NEVER}"),
        ),
        (
            Call("GET", f"/v1/billing/ledger?conversation={world.shared}"),
            Call("GET", f"/v1/billing/ledger?conversation={NEVER}"),
        ),
    ]
    for who in OUTSIDERS:
        caller: SseClient = getattr(world, who)
        for seen, unseen in pairs:
            if who == "admin" and "/ledger" in seen.path:
                continue  # the whole ledger is an admin's to read (README)
            status, body = await send(caller, seen, http, services.edge_url)
            for real in (world.project, world.shared):
                body = body.replace(real.encode(), NEVER.encode())
            answer = (status, body)
            assert status == 404, (who, seen, answer)
            assert answer == await send(caller, unseen, http, services.edge_url), (who, seen)
    # accounts: the stranger sees neither the owner's nor the project's, as none at all
    stranger = world.stranger
    for mine, none in (
        (f"user/{world.owner_id}", f"user/{never_user}"),
        (f"project/{world.project}", f"project/{NEVER}"),
        (f"user/{world.project}", f"user/{never_user}"),  # a project's id is no user's
        (f"project/{world.owner_id}", f"project/{NEVER}"),  # nor a user's a project's
    ):
        a = await send(
            stranger, Call("GET", f"/v1/billing/accounts/{mine}"), http, services.edge_url
        )
        b = await send(
            stranger, Call("GET", f"/v1/billing/accounts/{none}"), http, services.edge_url
        )
        assert a[0] == 404 and a == b, (mine, a, b)
    # the stranger's ledger filtered by another user is theirs to see only within
    # something they may see
    status, _ = await send(
        stranger, Call("GET", f"/v1/billing/ledger?user={world.owner_id}"), http, services.edge_url
    )
    assert status == 404
    # kinds other than user and project name no account, for anyone
    for caller in (world.owner, world.admin):
        for kind in ("conversation", "User", "projects", "user.x"):
            for call in (
                Call("GET", f"/v1/billing/accounts/{kind}/{world.owner_id}"),
                Call(
                    "POST",
                    f"/v1/billing/accounts/{kind}/{world.owner_id}/credits",
                    {"micro_credits": 1},
                ),
            ):
                status, body = await send(caller, call, http, services.edge_url)
                expected = 403 if call.method == "POST" and caller is world.owner else 404
                assert status == expected, (kind, call, status, body)
    # granting needs an admin token, whoever's account it is: a user's own included
    for account in (f"user/{world.owner_id}", f"project/{world.project}"):
        call = Call("POST", f"/v1/billing/accounts/{account}/credits", {"micro_credits": 1})
        status, body = await send(world.owner, call, http, services.edge_url)
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden", body
