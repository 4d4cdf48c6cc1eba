"""Projects, membership and billing on the live stack: who may see what, the pre-flight,
reservations that cannot race, and one charge per billed turn at the price it started with.

Balances here are recomputed from the account's own subject in the log (the
truth); the projected ledger and balances have tests of their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient
from redis.asyncio import Redis

from events.billing import AccountState, evolve_account, preflight_estimate, turn_cost
from events.ids import new_id
from events.log import EventLog
from events.subjects import EVT_STREAM, account_subject
from events.vocabulary import (
    BillingRejected,
    Cancelled,
    Chunk,
    CreditsGranted,
    CreditsReserved,
    Done,
    Failed,
    Prices,
    Started,
    TurnCharged,
)
from parley.services import Servers, Services
from tests.conftest import Projected, caught_up, token_for
from tests.sse import SseClient
from tests.test_metrics import scrape, until_scraped, value
from tests.test_poison import publish_raw

DEMO = Prices(input_price=3.0, output_price=15.0)
ESTIMATE = preflight_estimate(DEMO)  # 500 x 3 + 250 x 15 = 5,250 micro-credits


@pytest.fixture
def admin(services: Services, http: aiohttp.ClientSession) -> SseClient:
    return SseClient(http, services.edge_url, token_for("admin", admin=True))


async def new_project(api: SseClient, name: str = "Rollout") -> str:
    status, body = await api.request("POST", "/v1/projects", json={"name": name})
    assert status == 201, body
    project_id: str = body["id"]
    return project_id


async def grant(admin: SseClient, kind: str, owner: str, amount: int) -> None:
    status, body = await admin.request(
        "POST", f"/v1/billing/accounts/{kind}/{owner}/credits", json={"micro_credits": amount}
    )
    assert status == 201, body


async def account(event_log: EventLog, name: str) -> tuple[AccountState, list[Any]]:
    events = [s.event for s in await event_log.read_subject(account_subject(name))]
    state = AccountState(account=name)
    for event in events:
        state = evolve_account(state, event)
    return state, events


async def ended(event_log: EventLog, cid: str) -> list[Any]:
    async with asyncio.timeout(30):
        while True:
            log = [s.event for s in await event_log.read(cid)]
            if any(isinstance(e, Done | Cancelled | Failed | BillingRejected) for e in log):
                return log
            await asyncio.sleep(0.05)


async def charged(event_log: EventLog, name: str, turns: int) -> tuple[AccountState, list[Any]]:
    """The account once `turns` turns were charged (the charge follows the turn's end)."""
    async with asyncio.timeout(30):
        while True:
            state, events = await account(event_log, name)
            if len(state.charged_turns) >= turns:
                return state, events
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------- projects and membership


async def test_members_see_and_write_a_projects_conversations_and_no_one_else_does(
    api: SseClient, services: Services, http: aiohttp.ClientSession, admin: SseClient
) -> None:
    project = await new_project(api)
    await grant(admin, "project", project, 1_000_000)
    member = SseClient(http, services.edge_url, token_for(f"member-{project}"))
    stranger = SseClient(http, services.edge_url, token_for(f"stranger-{project}"))

    # a stranger cannot start a conversation in it, nor add themself
    status, body = await stranger.request("POST", "/v1/conversations", json={"project_id": project})
    assert status == 404 and body["error"]["code"] == "not_found", body
    status, _ = await stranger.request(
        "POST", f"/v1/projects/{project}/members", json={"user_id": "someone"}
    )
    assert status == 404

    cid = (await api.create_conversation(project_id=project))["id"]
    status, body = await api.request(
        "POST", f"/v1/projects/{project}/members", json={"user_id": f"member-{project}"}
    )
    assert status == 201 and f"member-{project}" in body["members"], body
    again = await api.request(
        "POST", f"/v1/projects/{project}/members", json={"user_id": f"member-{project}"}
    )
    assert again == (200, body), "a member added again: nothing added, 200"

    for client, allowed in ((member, True), (stranger, False), (admin, False)):
        for method, path in (
            ("GET", f"/v1/conversations/{cid}"),
            ("GET", f"/v1/conversations/{cid}/messages"),
            ("GET", f"/v1/conversations/{cid}/log"),
            ("POST", f"/v1/conversations/{cid}/cancel"),
        ):
            status, body = await client.request(method, path)
            assert (status < 400) == allowed, (client.token[-8:], method, path, status, body)
            if not allowed:
                assert status == 404 and body["error"]["code"] == "not_found", body
    # the member writes in it, and the turn is the project's
    events = await member.send_stream(cid, "hello from a member [[tokens=3]]")
    assert events[-1].data == "ok", events


async def test_an_admin_token_grants_credits_and_nothing_else_does(
    api: SseClient, admin: SseClient
) -> None:
    project = await new_project(api)
    status, body = await api.request(
        "POST", f"/v1/billing/accounts/project/{project}/credits", json={"micro_credits": 5}
    )
    assert status == 403 and body["error"]["code"] == "forbidden", body
    status, body = await admin.request(
        "POST",
        "/v1/billing/accounts/project/01NOSUCHPROJECT0000000000/credits",
        json={"micro_credits": 5},
    )
    assert status == 404, body
    status, body = await admin.request(
        "POST", f"/v1/billing/accounts/project/{project}/credits", json={"micro_credits": 0}
    )
    assert status == 400, body


async def test_an_admin_reads_a_project_account_only_of_a_project_that_exists(
    api: SseClient, admin: SseClient
) -> None:
    """A grant to a project that does not exist is a 404; reading its account once
    answered 200 with zeros, as if it were there."""
    missing = f"NOPE{new_id()}"
    for method, path, body in (
        ("GET", f"/v1/billing/accounts/project/{missing}", None),
        ("POST", f"/v1/billing/accounts/project/{missing}/credits", {"micro_credits": 5}),
    ):
        status, answer = await admin.request(method, path, json=body)
        assert status == 404, (method, status, answer)
        assert answer["error"]["code"] == "not_found", answer
    project = await new_project(api)
    status, account = await admin.request("GET", f"/v1/billing/accounts/project/{project}")
    assert status == 200 and account["balance_micro_credits"] == 0, account
    # a user's account exists before their first credit: anyone a token names
    status, account = await admin.request("GET", f"/v1/billing/accounts/user/{missing}")
    assert status == 200 and account["balance_micro_credits"] == 0, account


# ---------------------------------------------------------------- the pre-flight and the charge


async def test_a_project_turn_the_account_cannot_afford_is_refused_before_the_model_is_called(
    api: SseClient, event_log: EventLog
) -> None:
    project = await new_project(api)
    cid = (await api.create_conversation(project_id=project))["id"]
    events = await api.send_stream(cid, "hello [[tokens=3]]")
    assert [e.event for e in events] == ["started", "title", "billing_error", "done"], events
    assert events[-1].data == "billing_error"
    assert isinstance(events[-2].data, str) and "5250" in events[-2].data
    log = await ended(event_log, cid)
    (refusal,) = [e for e in log if isinstance(e, BillingRejected)]
    # an unfunded project: the member who asked would pay, and cannot
    assert refusal.account.startswith("user:") and refusal.needed == ESTIMATE
    assert refusal.available == 0


async def test_a_funded_project_pays_exactly_once_at_the_price_the_turn_started_with(
    api: SseClient, admin: SseClient, event_log: EventLog
) -> None:
    project = await new_project(api)
    await grant(admin, "project", project, 1_000_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    events = await api.send_stream(cid, "a priced answer [[tokens=40]]")
    assert events[-1].data == "ok"
    log = await ended(event_log, cid)
    (started,) = [e for e in log if isinstance(e, Started)]
    (done,) = [e for e in log if isinstance(e, Done)]
    assert started.payer == f"project:{project}" and started.prices == DEMO
    state, account_events = await charged(event_log, f"project:{project}", 1)
    reservations = [e for e in account_events if isinstance(e, CreditsReserved)]
    charges = [e for e in account_events if isinstance(e, TurnCharged)]
    assert [r.amount for r in reservations] == [ESTIMATE]
    assert len(charges) == 1 and charges[0].turn_id == done.turn_id
    expected = turn_cost(done.input_tokens, done.output_tokens, DEMO)
    assert charges[0].cost == expected > 0
    assert state.balance == 1_000_000 - expected and state.reserved == 0


async def test_many_turns_against_credits_for_three_cannot_all_pass(
    api: SseClient, admin: SseClient, event_log: EventLog
) -> None:
    project = await new_project(api)
    await grant(admin, "project", project, 3 * ESTIMATE)
    conversations = [(await api.create_conversation(project_id=project))["id"] for _ in range(8)]

    async def start(cid: str) -> list[Any]:
        await api.send_json(cid, "a long one [[tokens=1500]]")
        return await ended(event_log, cid)

    # all at once: reservations race for the same account
    logs = await asyncio.wait_for(asyncio.gather(*(start(cid) for cid in conversations)), 60)
    refused = [log for log in logs if any(isinstance(e, BillingRejected) for e in log)]
    assert len(refused) == 5, f"expected 3 turns to pass, saw {8 - len(refused)}"
    for log in refused:
        (refusal,) = [e for e in log if isinstance(e, BillingRejected)]
        assert refusal.available < ESTIMATE

    # and turns finishing at once lose no update: every charge is in the balance
    state, events = await charged(event_log, f"project:{project}", 3)
    charges = [e for e in events if isinstance(e, TurnCharged)]
    assert len(charges) == len({c.turn_id for c in charges}) == 3
    assert state.balance == 3 * ESTIMATE - sum(c.cost for c in charges)
    assert state.reserved == 0


async def test_a_cancelled_turn_is_charged_for_what_it_consumed(
    api: SseClient, admin: SseClient, event_log: EventLog
) -> None:
    project = await new_project(api)
    await grant(admin, "project", project, 1_000_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    await api.send_json(cid, "count slowly [[tokens=4000]]")
    async with asyncio.timeout(20):
        streaming = False
        while not streaming:
            streaming = any(type(s.event).__name__ == "Chunk" for s in await event_log.read(cid))
            await asyncio.sleep(0.05)
    status, _ = await api.request("POST", f"/v1/conversations/{cid}/cancel")
    assert status == 202
    log = await ended(event_log, cid)
    (cancelled,) = [e for e in log if isinstance(e, Cancelled)]
    _, events = await charged(event_log, f"project:{project}", 1)
    (charge,) = [e for e in events if isinstance(e, TurnCharged)]
    assert charge.end == "cancelled" and charge.tokens_estimated
    assert charge.cost == turn_cost(cancelled.input_tokens, cancelled.output_tokens, DEMO) > 0


async def test_a_personal_conversation_is_not_billed(
    api: SseClient, user: str, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "free of charge [[tokens=3]]")
    assert events[-1].data == "ok"
    log = await ended(event_log, cid)
    assert [e.payer for e in log if isinstance(e, Started)] == [None]
    assert (await account(event_log, f"user:{user}"))[1] == []


async def test_a_model_without_an_active_version_cannot_run_a_billed_turn(
    api: SseClient, admin: SseClient, event_log: EventLog
) -> None:
    project = await new_project(api)
    await grant(admin, "project", project, 1_000_000)
    cid = (await api.create_conversation(project_id=project, model="unpriced-model"))["id"]
    events = await api.send_stream(cid, "hello [[tokens=3]]")
    assert [e.event for e in events[-2:]] == ["error", "done"], events
    assert events[-2].raw["code"] == "model_not_priced"
    log = await ended(event_log, cid)
    assert not any(type(e).__name__ == "Chunk" for e in log), "the model was called"
    _, account_events = await account(event_log, f"project:{project}")
    assert not any(isinstance(e, CreditsReserved | TurnCharged) for e in account_events)


# ---------------------------------------------------------------- what the projection shows


async def test_balances_the_ledger_and_projects_are_projected_from_the_log(
    user: str,
    api: SseClient,
    admin: SseClient,
    event_log: EventLog,
    services: Services,
    http: aiohttp.ClientSession,
    projected: Projected,
) -> None:
    project = await new_project(api, "Ledger checks")
    await grant(admin, "project", project, 2_000_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    for text in ("one [[tokens=10]]", "two [[tokens=30]]"):
        assert (await api.send_stream(cid, text))[-1].data == "ok"
    state, events = await charged(event_log, f"project:{project}", 2)
    await projected(cid)
    billing = services.projectors["billing"]
    head = max(s.seq for s in await event_log.read_subject(account_subject(f"project:{project}")))
    async with asyncio.timeout(30), billing.applied:
        await billing.applied.wait_for(lambda: billing.position >= head)

    status, account_view = await api.request("GET", f"/v1/billing/accounts/project/{project}")
    assert status == 200, account_view
    assert account_view["balance_micro_credits"] == state.balance == 2_000_000 - state.charged
    assert account_view["reserved_micro_credits"] == 0 and account_view["debt_micro_credits"] == 0

    status, ledger = await api.request("GET", f"/v1/billing/ledger?project={project}")
    assert status == 200, ledger
    charges = {e.turn_id: e for e in events if isinstance(e, TurnCharged)}
    assert {row["turn_id"]: row["cost"] for row in ledger["entries"]} == {
        t: c.cost for t, c in charges.items()
    }
    assert all(row["account"] == f"project:{project}" for row in ledger["entries"])
    assert ledger["next"] is None, ledger
    status, by_conversation = await api.request("GET", f"/v1/billing/ledger?conversation={cid}")
    assert status == 200 and len(by_conversation["entries"]) == 2
    # a page at a time, in the log's order; the full last page says it is the last
    status, first = await api.request("GET", f"/v1/billing/ledger?conversation={cid}&limit=1")
    assert status == 200 and first["next"] == first["entries"][0]["seq"], first
    status, second = await api.request(
        "GET", f"/v1/billing/ledger?conversation={cid}&limit=1&after={first['next']}"
    )
    assert status == 200 and second["next"] is None, second
    assert first["entries"] + second["entries"] == by_conversation["entries"]
    for bad in ("limit=0", "limit=501", "after=-1", "after=x", f"after={2**63}"):
        status, body = await api.request("GET", f"/v1/billing/ledger?{bad}")
        assert status == 400, (bad, status, body)

    status, projects = await api.request("GET", "/v1/projects")
    assert status == 200
    (mine,) = [p for p in projects["projects"] if p["id"] == project]
    assert mine["name"] == "Ledger checks" and mine["members"] == [mine["created_by"]]
    status, listed = await api.request("GET", "/v1/conversations")
    assert cid in [c["id"] for c in listed["conversations"]]

    # someone else sees none of it
    stranger = SseClient(http, services.edge_url, token_for(f"nosy-{project}"))
    for path in (
        f"/v1/billing/accounts/project/{project}",
        f"/v1/billing/ledger?project={project}",
        f"/v1/billing/ledger?conversation={cid}",
    ):
        status, body = await stranger.request("GET", path)
        assert status == 404, (path, body)
    status, theirs = await stranger.request("GET", "/v1/billing/ledger")
    assert status == 200 and theirs["entries"] == []
    status, body = await stranger.request("GET", f"/v1/billing/ledger?user={user}")
    assert status == 404, body

    # a member narrows the project's (or a conversation's) rows to who asked
    member = f"member-{project}"
    status, _ = await api.request(
        "POST", f"/v1/projects/{project}/members", json={"user_id": member}
    )
    assert status == 201
    colleague = SseClient(http, services.edge_url, token_for(member))
    for where in (f"project={project}", f"conversation={cid}"):
        status, narrowed = await colleague.request("GET", f"/v1/billing/ledger?{where}&user={user}")
        assert status == 200 and len(narrowed["entries"]) == 2, (where, narrowed)
        status, none = await colleague.request("GET", f"/v1/billing/ledger?{where}&user={member}")
        assert status == 200 and none["entries"] == [], (where, none)
        status, body = await stranger.request("GET", f"/v1/billing/ledger?{where}&user={user}")
        assert status == 404, (where, body)


async def test_models_list_their_version_in_force_and_its_prices(api: SseClient) -> None:
    status, body = await api.request("GET", "/v1/models")
    assert status == 200, body
    models = {m["name"]: m for m in body["models"]}
    demo = models["demo"]
    assert demo["is_default"] and demo["active_version"] == "2026-01"
    assert (demo["input_price"], demo["output_price"]) == (3.0, 15.0)
    unpriced = models["unpriced-model"]
    assert unpriced["active_version"] is None and unpriced["input_price"] is None
    assert [v["status"] for v in unpriced["versions"]] == ["deprecated"]


async def test_a_turn_that_costs_more_than_the_balance_is_recorded_as_debt(
    api: SseClient,
    admin: SseClient,
    event_log: EventLog,
    services: Services,
    projected: Projected,
) -> None:
    project = await new_project(api, "Overspent")
    await grant(admin, "project", project, ESTIMATE)  # just enough to start one turn
    cid = (await api.create_conversation(project_id=project))["id"]
    events = await api.send_stream(cid, "a long answer [[tokens=600]]")  # > 5,250 in output alone
    assert events[-1].data == "ok"
    state, account_events = await charged(event_log, f"project:{project}", 1)
    (charge,) = [e for e in account_events if isinstance(e, TurnCharged)]
    assert charge.cost > ESTIMATE and state.balance == ESTIMATE - charge.cost < 0
    await projected(cid)
    head = max(s.seq for s in await event_log.read_subject(account_subject(f"project:{project}")))
    await caught_up(services.projectors["billing"], head)
    status, view = await api.request("GET", f"/v1/billing/accounts/project/{project}")
    assert status == 200 and view["debt_micro_credits"] == charge.cost - ESTIMATE, view
    _, ledger = await api.request("GET", f"/v1/billing/ledger?project={project}")
    assert [row["debt"] for row in ledger["entries"]] == [charge.cost - ESTIMATE]
    # in debt, the next turn is refused by the pre-flight
    refused = await api.send_stream(cid, "one more?")
    assert refused[-1].data == "billing_error"


async def test_a_keyed_grant_is_made_once_and_its_key_is_not_reused_for_another(
    admin: SseClient, event_log: EventLog, stack: Servers
) -> None:
    owner = f"granted-{new_id()}"
    path = f"/v1/billing/accounts/user/{owner}/credits"
    body = {"micro_credits": 1000, "note": "welcome", "idempotency_key": "k1"}
    answers = [await admin.request("POST", path, json=body) for _ in range(2)]
    assert answers[0] == answers[1] and answers[0][0] == 201, answers
    first_seq = answers[0][1]["seq"]
    mismatch = {**body, "micro_credits": 2000}
    status, error = await admin.request("POST", path, json=mismatch)
    assert (status, error["error"]["code"]) == (422, "idempotency_mismatch"), error
    # Without the edge's record (as after Redis lost it) the stream's duplicate
    # window still makes the repeat the same event, and still refuses the other.
    redis = Redis.from_url(stack.redis_url)
    try:
        assert await redis.delete(*[k async for k in redis.scan_iter("parley:grant:*")])
    finally:
        await redis.aclose()
    assert await admin.request("POST", path, json=body) == answers[0]
    status, error = await admin.request("POST", path, json=mismatch)
    assert (status, error["error"]["code"]) == (422, "idempotency_mismatch"), error
    grants = [
        (s.seq, s.event.amount)
        for s in await event_log.read_subject(account_subject(f"user:{owner}"))
        if isinstance(s.event, CreditsGranted)
    ]
    assert grants == [(first_seq, 1000)], grants


async def test_a_keyed_grant_is_made_once_after_its_key_left_redis_and_the_window(
    admin: SseClient, event_log: EventLog, stack: Servers, nc: NatsClient
) -> None:
    """Past the stream's duplicate window, a grant sent again whose key Redis no longer
    had (lost, or kept longer than Redis keeps keys) was appended a second time under
    the same event id: the account got the amount twice. The read model knows every
    grant by that id, and the edge asks it before granting."""
    owner = f"granted-{new_id()}"
    path = f"/v1/billing/accounts/user/{owner}/credits"
    body = {"micro_credits": 1000, "note": "welcome", "idempotency_key": "late-1"}
    status, first = await admin.request("POST", path, json=body)
    assert status == 201, first
    subject = account_subject(f"user:{owner}")
    async with asyncio.timeout(10):
        while True:  # the read model has the grant
            status, view = await admin.request("GET", f"/v1/billing/accounts/user/{owner}")
            if view["granted_micro_credits"] == 1000:
                break
            await asyncio.sleep(0.05)
    js = nc.jetstream()
    config = (await js.stream_info(EVT_STREAM)).config
    window = config.duplicate_window
    redis = Redis.from_url(stack.redis_url)
    try:
        assert await redis.delete(*[k async for k in redis.scan_iter("parley:grant:*")])
        config.duplicate_window = 0.2  # seconds: the window passes at once
        await js.update_stream(config)
        await asyncio.sleep(0.4)  # past it: the server forgets the grant's id
        assert await admin.request("POST", path, json=body) == (201, first)
        status, error = await admin.request("POST", path, json={**body, "micro_credits": 5})
        assert (status, error["error"]["code"]) == (422, "idempotency_mismatch"), error
    finally:
        config.duplicate_window = window
        await js.update_stream(config)
        await redis.aclose()
    amounts = [
        s.event.amount
        for s in await event_log.read_subject(subject)
        if isinstance(s.event, CreditsGranted)
    ]
    assert amounts == [1000], amounts


@pytest.mark.parametrize("key", ["", "k" * 100_000])
async def test_a_grant_refuses_an_empty_or_overlong_idempotency_key_as_a_message_does(
    admin: SseClient, api: SseClient, event_log: EventLog, key: str
) -> None:
    """An empty key once turned idempotency off (sent twice, granted twice), and any
    length was taken: the rule is the messages' one, with its words."""
    owner = f"granted-{new_id()}"
    path = f"/v1/billing/accounts/user/{owner}/credits"
    body = {"micro_credits": 1000, "idempotency_key": key}
    for _ in range(2):
        status, error = await admin.request("POST", path, json=body)
        assert status == 400, f"granted with the key {key[:20]!r}: {status} {error}"
        assert error["error"]["code"] == "bad_request", error
        assert error["error"]["message"] == "idempotency_key must be 1-200 characters", error
    cid = (await api.create_conversation())["id"]
    status, refused = await api.request(
        "POST", f"/v1/conversations/{cid}/messages", json={"content": "hi", "idempotency_key": key}
    )
    same = ("code", "message")  # (each names its own request)
    assert status == 400, refused
    assert [refused["error"][k] for k in same] == [error["error"][k] for k in same], refused
    grants = await event_log.read_subject(account_subject(f"user:{owner}"))
    assert grants == [], grants


@pytest.mark.parametrize(
    ("entry", "cause"),
    [
        # damaged: the conversation takes no new work, but its turn still ends billed
        (b"\xff\xfe not an event", "log_unreadable"),
        # from a newer version: skipped by readers, yet it broke the single-writer check
        (b'{"type": "future_thing", "x": 1}', "log_conflict"),
    ],
)
async def test_an_entry_landing_in_a_running_turn_ends_it_with_what_it_used_billed(
    api: SseClient,
    admin: SseClient,
    event_log: EventLog,
    nc: NatsClient,
    entry: bytes,
    cause: str,
) -> None:
    project = await new_project(api, f"Poisoned {cause}")
    await grant(admin, "project", project, 10_000_000)
    cid = (await api.create_conversation(project_id=project))["id"]
    await api.send_json(cid, "a long answer [[tokens=200]]")
    async with asyncio.timeout(30):
        while True:  # a few chunks in: the turn is running
            if sum(isinstance(s.event, Chunk) for s in await event_log.read(cid)) >= 3:
                break
            await asyncio.sleep(0.02)
    before = await scrape(api.http, api.base_url)
    await publish_raw(nc, cid, entry)
    async with asyncio.timeout(30):
        while True:  # redelivered, its command finds the turn open and ends it
            ends = [s.event for s in await event_log.read(cid) if isinstance(s.event, Failed)]
            if ends:
                break
            await asyncio.sleep(0.05)
    (failed,) = ends
    assert failed.code == cause, failed
    # counted once, as the log ended it (it was counted as `interrupted`, tokens none)
    demo = {"model": "demo"}
    after = await until_scraped(
        api.http,
        api.base_url,
        lambda now: (
            value(now, "parley_turns_total", **demo, outcome="failed")
            > value(before, "parley_turns_total", **demo, outcome="failed")
        ),
    )
    moved = {
        key: after.get(key, 0.0) - before.get(key, 0.0)
        for key in before.keys() | after.keys()
        if key[0] in ("parley_turns_total", "parley_tokens_total")
        and after.get(key, 0.0) != before.get(key, 0.0)
    }
    tokens = "parley_tokens_total"
    expected = {
        ("parley_turns_total", frozenset({**demo, "outcome": "failed"}.items())): 1.0,
        (tokens, frozenset({**demo, "direction": "input"}.items())): failed.input_tokens,
        (tokens, frozenset({**demo, "direction": "output"}.items())): failed.output_tokens,
    }
    assert moved == expected, moved
    assert failed.tokens_estimated and failed.input_tokens > 0 and failed.output_tokens > 0, failed
    assert failed.content and failed.content[-1].content.startswith("0 1 2"), failed.content
    state, _ = await charged(event_log, f"project:{project}", 1)
    assert state.reserved == 0, "the turn's reservation is released by its charge"
    assert state.charged == turn_cost(failed.input_tokens, failed.output_tokens, DEMO)
    status, body = await api.request(
        "POST", f"/v1/conversations/{cid}/messages", json={"content": "and now? [[tokens=2]]"}
    )
    if cause == "log_unreadable":
        assert status == 409 and body["error"]["code"] == "conversation_unreadable", body
    else:
        assert status == 200, body
