"""GET /v1/conversations/{id}/messages a page at a time (`?limit=`, `?before=`), on the
live stack: the pages of a conversation are its whole list, each message once and in
order, while turns and versions are added between two pages; a cursor is its own
conversation's only."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest

from parley.services import Services
from tests.conftest import Projected, token_for
from tests.sse import SseClient

Versions = str  # "latest" or "all"


async def turn(api: SseClient, cid: str, text: str) -> None:
    events = await api.send_stream(cid, f"{text} [[tokens=2]] [[rate=0]]")
    assert events[-1].data == "ok", events


async def regenerate(api: SseClient, cid: str, answer_id: str) -> None:
    path = f"/v1/conversations/{cid}/messages/{answer_id}/regenerate"
    events = await api.send_stream_to(path, {})
    assert events[-1].data == "ok", events


async def edit(api: SseClient, cid: str, message_id: str, text: str) -> None:
    path = f"/v1/conversations/{cid}/messages/{message_id}"
    events = await api.send_stream_to(path, {"content": f"{text} [[tokens=2]]"}, method="PATCH")
    assert events[-1].data == "ok", events


async def whole(api: SseClient, cid: str, versions: Versions) -> list[dict[str, Any]]:
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages?versions={versions}")
    assert status == 200, body
    assert body["next"] is None, body  # no limit: every message, nothing before them
    rows: list[dict[str, Any]] = body["messages"]
    return rows


async def page(
    api: SseClient, cid: str, versions: Versions, limit: int, before: str | None = None
) -> tuple[list[str], str | None]:
    """The ids of one page and its `next`."""
    params = f"versions={versions}&limit={limit}" + (f"&before={before}" if before else "")
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages?{params}")
    assert status == 200, body
    assert len(body["messages"]) <= limit, body
    return [m["id"] for m in body["messages"]], body["next"]


async def paged(
    api: SseClient, cid: str, versions: Versions, limit: int, before: str | None = None
) -> list[str]:
    """Every page from the last (or from `before`) back to the first, as one list."""
    ids: list[str] = []
    for _ in range(1000):
        found, before = await page(api, cid, versions, limit, before)
        assert found, "a page with a `next` before it is never empty"
        ids = found + ids
        if before is None:
            return ids
    raise AssertionError("the pages never ended")


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["id"] for row in rows]


async def test_a_long_conversation_with_versions_comes_whole_a_page_at_a_time(
    api: SseClient, projected: Projected
) -> None:
    cid = (await api.create_conversation())["id"]
    for n in range(12):
        await turn(api, cid, f"question {n}")
    await projected(cid)
    answers = [r for r in await whole(api, cid, "latest") if r["role"] == "assistant"]
    await regenerate(api, cid, answers[4]["id"])  # the answers after it leave the branch
    for n in range(4):
        await turn(api, cid, f"after the regeneration {n}")
    await projected(cid)
    questions = [r for r in await whole(api, cid, "latest") if r["role"] == "user"]
    await edit(api, cid, questions[2]["id"], "edited")
    for n in range(3):
        await turn(api, cid, f"after the edit {n}")
    await projected(cid)

    everything, latest = await whole(api, cid, "all"), await whole(api, cid, "latest")
    # 12 turns, an answer again, 4 turns, an edit and its answer, 3 turns
    assert len(everything) == 24 + 1 + 8 + 2 + 6 and len(latest) == 4 + 2 + 6
    assert [r["seq"] for r in everything] == sorted(r["seq"] for r in everything)
    for versions, rows in (("all", everything), ("latest", latest)):
        for limit in (1, 3, 7, len(rows) - 1):
            assert await paged(api, cid, versions, limit) == ids(rows), (versions, limit)
        # a page that holds exactly what is left says it is the first
        assert await page(api, cid, versions, len(rows)) == (ids(rows), None)
        assert await page(api, cid, versions, 500) == (ids(rows), None)
        # the last page is the list's end, in the list's order
        last, cursor = await page(api, cid, versions, 5)
        assert last == ids(rows)[-5:] and cursor is not None


@pytest.mark.parametrize("versions", ["all", "latest"])
async def test_pages_stay_in_place_while_turns_and_versions_are_added_between_them(
    api: SseClient, projected: Projected, versions: Versions
) -> None:
    cid = (await api.create_conversation())["id"]
    for n in range(10):
        await turn(api, cid, f"question {n}")
    await projected(cid)
    before = ids(await whole(api, cid, versions))
    first, cursor = await page(api, cid, versions, 4)
    assert first == before[-4:] and cursor is not None

    # A new version of the last answer and of the last question, and new turns: each
    # made after what the first page holds, between the reads of the pages after it.
    last_answer, last_question = before[-1], before[-2]
    changes = [
        lambda: regenerate(api, cid, last_answer),
        lambda: turn(api, cid, "a new turn"),
        lambda: edit(api, cid, last_question, "edited"),
        lambda: turn(api, cid, "another new turn"),
    ]
    read = list(first)
    for n in range(10):
        if n < len(changes):
            await changes[n]()
            await projected(cid)
        found, cursor = await page(api, cid, versions, 3, cursor)
        read = found + read
        if cursor is None:
            break
    assert read == before  # every message once, in order, though the list grew meanwhile

    # and the conversation as it is now, a page at a time, is its whole list now
    now = ids(await whole(api, cid, versions))
    assert len(now) > len(before)
    assert await paged(api, cid, versions, 3) == now


async def test_a_bad_cursor_or_limit_is_refused_and_another_conversations_cursor_tells_nothing(
    api: SseClient, services: Services, http: aiohttp.ClientSession, projected: Projected
) -> None:
    cid = (await api.create_conversation())["id"]
    other = (await api.create_conversation())["id"]
    for conversation in (cid, other):
        for n in range(3):
            await turn(api, conversation, f"question {n}")
        await projected(conversation)
    _, cursor = await page(api, cid, "all", 2)
    _, foreign = await page(api, other, "all", 2)
    assert cursor is not None and foreign is not None

    stranger = SseClient(http, services.edge_url, token_for("u-stranger-" + cid))
    theirs = (await stranger.create_conversation())["id"]
    for n in range(3):
        await turn(stranger, theirs, f"their question {n}")
    await projected(theirs)
    _, their_cursor = await page(stranger, theirs, "all", 2)
    assert their_cursor is not None

    def encoded(key: bytes) -> str:
        return base64.urlsafe_b64encode(key).decode().rstrip("=")

    refusals = []
    for bad in (
        foreign,  # the same user's other conversation
        their_cursor,  # another user's conversation
        "not-a-cursor",
        "x" * 40,
        "é",
        encoded(f"{cid}|0".encode()),
        encoded(f"{cid}|-5".encode()),
        encoded(f"{cid}|1e3".encode()),
        encoded(f"{cid}|{2**63}".encode()),
        encoded(f"{cid}|١٢".encode()),  # digits, but not ASCII ones
        encoded(cid.encode()),
        cursor + "A",
    ):
        for query in (f"limit=2&before={bad}", f"before={bad}"):
            status, body = await api.request(
                "GET",
                f"/v1/conversations/{cid}/messages",
                params=_params(query),
                headers={"X-Request-Id": "bad-cursor"},  # the one thing each may differ in
            )
            assert status == 400, (bad, status, body)
            assert body["error"]["code"] == "bad_cursor", body
            refusals.append(body)
    # the same answer whoever's cursor it was: nothing of the other conversation in it
    assert all(refusal == refusals[0] for refusal in refusals), refusals
    assert other not in str(refusals) and theirs not in str(refusals)
    # a cursor does not open another's conversation: that stays not found
    status, body = await api.request(
        "GET", f"/v1/conversations/{theirs}/messages?limit=2&before={their_cursor}"
    )
    assert status == 404, body

    for out_of_range in ("0", "501", "-1", "1.5", "many", ""):
        status, body = await api.request(
            "GET", f"/v1/conversations/{cid}/messages", params={"limit": out_of_range}
        )
        assert status == 400 and body["error"]["code"] == "invalid_request", (out_of_range, body)
    for limit in (1, 500):
        status, body = await api.request("GET", f"/v1/conversations/{cid}/messages?limit={limit}")
        assert status == 200 and len(body["messages"]) == min(limit, 6), body

    # the cursor of a page before `before` alone: every message before it
    rows = await whole(api, cid, "all")
    status, body = await api.request(
        "GET", f"/v1/conversations/{cid}/messages?versions=all&before={cursor}"
    )
    assert status == 200 and body["next"] is None, body
    assert [m["id"] for m in body["messages"]] == ids(rows)[:-2]


def _params(query: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in query.split("&"))
