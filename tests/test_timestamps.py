"""Every time the edge answers with has one form: RFC 3339, UTC, `Z`, microseconds.

There were three (`+00:00` from rows, `Z` from msgspec's encoding of message
rows, milliseconds for a turn's start and a conversation answered from its
header), and a create's answer could say another time than the GET after it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any

import aiohttp
import pytest

from api.responses import instant
from api.routes import _row_info, _unprojected_info
from events.codec import timestamp
from events.ids import new_id
from events.vocabulary import ConversationCreated
from parley.services import Services
from projections.store import ConversationRow
from tests.conftest import Projected, token_for
from tests.sse import SseClient

FORM = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def times_in(value: Any, path: str = "$") -> dict[str, Any]:
    """Every `..._at` value in a JSON answer, by its path."""
    found: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_at") and not isinstance(item, dict | list):
                found[f"{path}.{key}"] = item
            found.update(times_in(item, f"{path}.{key}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.update(times_in(item, f"{path}[{i}]"))
    return found


@pytest.mark.parametrize(
    "at",
    [
        1_795_000_000_000_000_000,  # a whole second: no fraction to drop
        1_795_000_000_305_707_123,
        1_795_000_000_305_707_500,  # half a microsecond
        1_795_000_000_999_999_999,  # rounds up into the next second
    ],
)
def test_a_conversation_says_the_same_times_before_and_after_its_row_exists(at: int) -> None:
    header = ConversationCreated(
        conversation_id="c", at=at, event_id="e", user_id="u", project_id=None, title=""
    )
    # what the projection stores for this header (projections.handlers)
    row = ConversationRow(
        id="c",
        user_id="u",
        project_id=None,
        title="",
        model=None,
        message_count=0,
        token_usage_total=0,
        created_at=timestamp(at),
        updated_at=timestamp(at),
        last_seq=1,
    )
    before, after = _unprojected_info(header), _row_info(row)
    assert (before.created_at, before.updated_at) == (after.created_at, after.updated_at)
    assert FORM.fullmatch(before.created_at), before.created_at


def test_a_time_is_said_in_utc_whatever_zone_it_came_in() -> None:
    moment = dt.datetime(2026, 11, 30, 13, 38, 16, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert instant(moment) == "2026-11-30T12:38:16.000005Z"


async def test_every_time_the_main_routes_answer_has_one_form_and_a_create_says_what_a_get_does(
    services: Services, http: aiohttp.ClientSession, user: str, projected: Projected
) -> None:
    api = SseClient(http, services.edge_url, token_for(user))
    admin = SseClient(http, services.edge_url, token_for(f"admin-{new_id()}", admin=True))
    status, project = await api.request("POST", "/v1/projects", json={"name": "Times"})
    assert status == 201, project
    path = f"/v1/billing/accounts/project/{project['id']}/credits"
    status, granted = await admin.request("POST", path, json={"micro_credits": 10**9})
    assert status == 201, granted
    created = await api.create_conversation(project_id=project["id"])
    cid = created["id"]
    status, read = await api.request("GET", f"/v1/conversations/{cid}")
    assert (status, read) == (200, created)

    assert (await api.send_stream(cid, "one [[tokens=5]]"))[-1].data == "ok"
    # a turn that runs while the conversation is read: its active_turn.started_at
    await api.send_json(cid, "two [[tokens=4000]]")
    answers: dict[str, Any] = {}
    async with asyncio.timeout(10):
        while True:
            status, detail = await api.request("GET", f"/v1/conversations/{cid}")
            if detail["active_turn"] is not None:
                break
            await asyncio.sleep(0.02)
    answers["conversation"] = detail
    status, _ = await api.request("POST", f"/v1/conversations/{cid}/cancel")
    assert status in (200, 202)
    await projected(cid)
    for name, route in (
        ("conversations", "/v1/conversations"),
        ("messages", f"/v1/conversations/{cid}/messages?versions=all"),
        ("projects", "/v1/projects"),
        ("ledger", f"/v1/billing/ledger?conversation={cid}"),
    ):
        status, answers[name] = await api.request("GET", route)
        assert status == 200, (route, answers[name])

    seen = {name: times_in(body) for name, body in answers.items()}
    for name, expected in (
        ("conversation", {"$.created_at", "$.updated_at", "$.active_turn.started_at"}),
        ("conversations", {"$.conversations[0].created_at"}),
        ("messages", {"$.messages[0].created_at", "$.messages[0].updated_at"}),
        ("projects", {"$.projects[0].created_at"}),
        ("ledger", {"$.entries[0].charged_at"}),
    ):
        assert expected <= set(seen[name]), (name, sorted(seen[name]))
    wrong = {
        f"{name} {where}": value
        for name, found in seen.items()
        for where, value in found.items()
        if not (isinstance(value, str) and FORM.fullmatch(value))
    }
    assert not wrong, f"not RFC 3339 UTC `Z` with microseconds: {wrong}"
