"""A user names a conversation: `PATCH /v1/conversations/{id}` with `{"title"}`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from events.codec import encode
from events.ids import new_id
from events.log import EventLog
from events.subjects import command_subject
from events.vocabulary import Done, RenameConversation, Title
from tests.conftest import token_for
from tests.sse import SseClient, SseEvent, read_sse


async def _projected_title(api: SseClient, cid: str, title: str) -> None:
    async with asyncio.timeout(10):
        while (await api.request("GET", f"/v1/conversations/{cid}"))[1]["title"] != title:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _titles_seen(api: SseClient, cid: str, count: int) -> list[SseEvent]:
    """The conversation's events from its start until `count` titles came."""
    seen: list[SseEvent] = []
    async with api.http.get(
        api.url(f"/v1/conversations/{cid}/events"), headers=api.headers(), params={"after": "0"}
    ) as response:
        async with asyncio.timeout(10):
            async for item in read_sse(response):
                if isinstance(item, SseEvent):
                    seen.append(item)
                    if sum(e.event == "title" for e in seen) >= count:
                        return seen
    return seen


async def test_a_rename_reaches_viewers_and_the_read_models_and_the_next_turn_keeps_it(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    status, body = await api.request(
        "PATCH", f"/v1/conversations/{cid}", json={"title": "  Quarterly roadmap \n"}
    )
    assert (status, body) == (202, {"id": cid, "title": "Quarterly roadmap"}), body
    seen = await _titles_seen(api, cid, 1)
    assert [e.data for e in seen if e.event == "title"] == [{"title": "Quarterly roadmap"}]
    await _projected_title(api, cid, "Quarterly roadmap")
    # the first message would have named it; the name the user gave stays
    events = await api.send_stream(cid, "Plan the review of the roadmap please [[tokens=3]]")
    assert [e.data for e in events if e.event == "title"] == [{"title": "Quarterly roadmap"}]
    titles = [s.event for s in await event_log.read(cid) if isinstance(s.event, Title)]
    assert [(t.title, t.source) for t in titles] == [
        ("Quarterly roadmap", "user"),
        ("Quarterly roadmap", "existing"),
    ]


async def test_a_rename_while_a_turn_runs_lands_beside_it_and_the_turn_goes_on(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "a long answer [[tokens=40]] [[rate=100]]")
    async with asyncio.timeout(10):
        while not any(isinstance(s.event, Title) for s in await event_log.read(cid)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    status, _ = await api.request("PATCH", f"/v1/conversations/{cid}", json={"title": "Renamed"})
    assert status == 202
    await _projected_title(api, cid, "Renamed")
    async with asyncio.timeout(20):
        while not any(isinstance(s.event, Done) for s in await event_log.read(cid)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    log = [s.event for s in await event_log.read(cid)]
    (done,) = [e for e in log if isinstance(e, Done)]
    assert done.stop_reason == "stop", done
    renamed = next(i for i, e in enumerate(log) if isinstance(e, Title) and e.source == "user")
    assert renamed < log.index(done), "the rename did not wait for the turn's end"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"title": ""}, "title must be"),
        ({"title": "   "}, "title must be"),
        ({"title": "x" * 201}, "title must be"),
        ({"title": 5}, "title"),
        ({}, "title"),
    ],
)
async def test_a_title_that_is_blank_too_long_or_missing_is_a_400(
    api: SseClient, event_log: EventLog, body: dict[str, Any], says: str
) -> None:
    cid = (await api.create_conversation())["id"]
    status, answer = await api.request("PATCH", f"/v1/conversations/{cid}", json=body)
    assert status == 400 and says in answer["error"]["message"], answer
    assert not any(isinstance(s.event, Title) for s in await event_log.read(cid))


async def test_only_who_may_write_the_conversation_may_rename_it(
    api: SseClient, http: aiohttp.ClientSession
) -> None:
    cid = (await api.create_conversation())["id"]
    stranger = SseClient(http, api.base_url, token_for("rename-stranger"))
    for who, path in [(stranger, f"/v1/conversations/{cid}"), (api, "/v1/conversations/nope")]:
        status, answer = await who.request("PATCH", path, json={"title": "Mine now"})
        assert status == 404 and answer["error"]["code"] == "not_found", answer


async def test_a_frontend_that_renames_then_reads_the_list_back_sees_the_new_name(
    api: SseClient,
) -> None:
    """As a create waits for its row: a rename answered before the read models showed
    it made the list a frontend fetches next show the old name, every time."""
    cid = (await api.create_conversation())["id"]
    for name in ["Budget 2027", "Budget 2027 (final)"]:
        status, _ = await api.request("PATCH", f"/v1/conversations/{cid}", json={"title": name})
        assert status == 202
        status, one = await api.request("GET", f"/v1/conversations/{cid}")
        assert (status, one["title"]) == (200, name), one
        status, listed = await api.request("GET", "/v1/conversations")
        assert status == 200
        assert [c["title"] for c in listed["conversations"] if c["id"] == cid] == [name]


async def test_a_rename_delivered_again_after_a_later_one_leaves_the_later_name(
    api: SseClient, event_log: EventLog, nc: NatsClient
) -> None:
    """JetStream delivers a command again when its acknowledgement was lost: a rename
    that comes again after a later one must not bring its old name back (exactly
    once in effect). The second delivery is sent here as a copy of the command."""
    cid = (await api.create_conversation())["id"]
    for title in ("Roadmap", "Q3 plan"):
        status, _ = await api.request("PATCH", f"/v1/conversations/{cid}", json={"title": title})
        assert status == 202
    await _projected_title(api, cid, "Q3 plan")
    first = next(s.event for s in await event_log.read(cid) if isinstance(s.event, Title))
    again = RenameConversation(
        conversation_id=cid,
        command_id=first.command_id,
        user_id="someone",
        at=time.time_ns(),
        title="Roadmap",
    )
    await nc.jetstream().publish(
        command_subject(cid), encode(again), headers={"Nats-Msg-Id": new_id()}
    )
    # a rename after it is decided after it: once its title is in, the copy was decided
    status, _ = await api.request("PATCH", f"/v1/conversations/{cid}", json={"title": "Final"})
    assert status == 202
    await _projected_title(api, cid, "Final")
    titles = [s.event.title for s in await event_log.read(cid) if isinstance(s.event, Title)]
    assert titles == ["Roadmap", "Q3 plan", "Final"], titles


async def test_a_rename_while_a_turn_runs_reaches_that_turns_own_stream(api: SseClient) -> None:
    """The sender's stream of a turn is the one stream its client reads (`parley chat`,
    the original frontend during an answer); a rename made meanwhile (another tab) is
    shown there, as the turn's auto title is."""
    cid = (await api.create_conversation())["id"]
    seen: list[SseEvent] = []
    async with api.http.post(
        api.url(f"/v1/conversations/{cid}/messages"),
        json={"content": "a long answer [[tokens=40]] [[rate=40]]"},
        headers=api.headers(Accept="text/event-stream"),
    ) as turn:
        async for item in read_sse(turn):
            if not isinstance(item, SseEvent):
                continue
            seen.append(item)
            if item.event == "token" and sum(e.event == "token" for e in seen) == 1:
                status, _ = await api.request(
                    "PATCH", f"/v1/conversations/{cid}", json={"title": "Renamed meanwhile"}
                )
                assert status == 202
    assert seen[-1].event == "done" and seen[-1].data == "ok", seen[-3:]
    titles = [e.data["title"] for e in seen if e.event == "title"]
    assert "Renamed meanwhile" in titles, titles
