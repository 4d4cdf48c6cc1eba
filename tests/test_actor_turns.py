"""The conversation actor on the live stack: cancel, busy policies, versions, tools, retries.

The demo model streams at 400 tokens/s here, so `[[tokens=N]]` makes a turn
last N/400 seconds: long enough to cancel, interrupt or queue behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest

from events.log import EventLog
from events.vocabulary import (
    Cancelled,
    CommandRejected,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
)
from parley.services import Services
from tests.conftest import Projected, Recorder, demo_streams, token_for
from tests.sse import SseClient, SseEvent, sse_events, until_done
from tests.test_billing import grant, new_project


async def wait_for_ends(event_log: EventLog, cid: str, count: int) -> list[Any]:
    """The conversation's log once `count` turns have ended."""
    async with asyncio.timeout(30):
        while True:
            log = await event_log.read(cid)
            if sum(isinstance(s.event, Done | Cancelled | Failed) for s in log) >= count:
                return [s.event for s in log]
            await asyncio.sleep(0.05)


async def funded_project(
    api: SseClient, services: Services, http: aiohttp.ClientSession, name: str
) -> str:
    """A new project of `api`'s user, granted credits for many turns: its id."""
    project = await new_project(api, name)
    admin = SseClient(http, services.edge_url, token_for("admin", admin=True))
    await grant(admin, "project", project, 10**9)
    return project


async def first_tokens(response: aiohttp.ClientResponse, n: int) -> list[SseEvent]:
    seen: list[SseEvent] = []
    async for event in sse_events(response):
        seen.append(event)
        if sum(e.event == "token" for e in seen) >= n:
            return seen
    raise AssertionError(f"the stream ended before {n} tokens: {seen}")


# ---------------------------------------------------------------- cancel


async def test_cancel_closes_the_model_stream_keeps_the_partial_answer_and_stops_every_viewer(
    api: SseClient, event_log: EventLog, http: aiohttp.ClientSession, demo_model_url: str
) -> None:
    cid = (await api.create_conversation())["id"]
    before = await demo_streams(http, demo_model_url)
    await api.send_json(cid, "count slowly [[tokens=4000]]")
    async with (
        asyncio.timeout(30),
        api.events(cid) as one,
        api.events(cid) as two,
    ):
        await first_tokens(one, 5)
        await first_tokens(two, 5)
        status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
        assert status == 202 and body["cancelled"] is True and body["turn_id"], body
        ends = [
            [e async for e in sse_events(viewer) if e.event in ("done", "error")][-1]
            for viewer in (one, two)
        ]
    assert [e.data for e in ends] == ["stopped", "stopped"], ends

    log = await wait_for_ends(event_log, cid, 1)
    (cancelled,) = [e for e in log if isinstance(e, Cancelled)]
    assert cancelled.turn_id == body["turn_id"] and cancelled.reason == "user"
    answer = "".join(b.content for b in cancelled.content if b.role == "assistant")
    assert answer.startswith("0 1 2 3 4 ") and len(answer.split()) < 4000, answer[:50]
    # the provider never sent usage: counted from what streamed, and flagged so
    assert cancelled.tokens_estimated and cancelled.output_tokens >= 5, cancelled
    assert cancelled.input_tokens > 0
    after = await demo_streams(http, demo_model_url)
    assert after["went_away"] > before["went_away"], "the model's stream was not closed"

    status, again = await api.request("POST", f"/v1/conversations/{cid}/cancel")
    assert status == 200 and again == {
        "cancelled": False,
        "turn_id": None,
        "message": "no turn is running",
    }


async def test_cancel_on_an_idle_conversation_is_a_plain_answer(api: SseClient) -> None:
    cid = (await api.create_conversation())["id"]
    status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
    assert status == 200 and body["cancelled"] is False, body


# ---------------------------------------------------------------- a message while a turn runs


async def test_enqueued_messages_run_after_the_current_turn_one_at_a_time_in_order(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    first = await api.send_json(cid, "first [[tokens=200]]")
    queued = [
        await api.send_json(cid, f"next {i} [[tokens=5]]", on_busy="enqueue") for i in range(3)
    ]
    assert all(q["accepted"] for q in queued), queued
    # queued messages count as busy for a rejecting sender too (decided by the actor)
    status, body = await api.request(
        "POST", f"/v1/conversations/{cid}/messages", json={"content": "me now", "on_busy": "reject"}
    )
    assert status == 409 and body["error"]["code"] == "busy", body

    log = await wait_for_ends(event_log, cid, 4)
    order = [e.user_message_id for e in log if isinstance(e, Started)]
    assert order == [first["message_id"], *(q["message_id"] for q in queued)], order
    running = None
    for event in log:  # never two turns at once
        if isinstance(event, Started):
            assert running is None, f"turn {event.turn_id} started while {running} ran"
            running = event.turn_id
        elif isinstance(event, Done | Cancelled | Failed):
            assert event.turn_id == running
            running = None
    assert all(isinstance(e, Done) for e in log if isinstance(e, Done | Cancelled | Failed))


async def test_a_key_refused_as_busy_is_free_for_the_retry_the_refusal_asks_for(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "first [[tokens=200]]")
    path = f"/v1/conversations/{cid}/messages"
    retry = {"content": "retry me [[tokens=2]]", "idempotency_key": "rk"}
    status, body = await api.request("POST", path, json=retry)
    assert status == 409 and body["error"]["code"] == "busy", body
    # the same key, as the refusal suggests, with on_busy enqueue: accepted, not 409 again
    queued = await api.send_json(cid, retry["content"], idempotency_key="rk", on_busy="enqueue")
    assert queued["accepted"], queued
    # and from then on the key is that message's
    again = await api.send_json(cid, retry["content"], idempotency_key="rk", on_busy="enqueue")
    assert again["message_id"] == queued["message_id"], (again, queued)
    log = await wait_for_ends(event_log, cid, 2)
    retried = [e for e in log if isinstance(e, UserMessage) and e.content == retry["content"]]
    assert [e.message_id for e in retried] == [queued["message_id"]], retried


async def test_the_same_post_sent_again_with_last_event_id_resumes_its_stream(
    api: SseClient,
) -> None:
    cid = (await api.create_conversation())["id"]
    body = {"content": "resume me [[tokens=30]]", "idempotency_key": "again"}
    path = api.url(f"/v1/conversations/{cid}/messages")
    headers = api.headers(Accept="text/event-stream")
    async with api.http.post(path, json=body, headers=headers) as response:
        before = await first_tokens(response, 5)
    last = before[-1].id
    assert last is not None
    async with api.http.post(path, json=body, headers={**headers, "Last-Event-ID": last}) as again:
        assert again.status == 200, await again.text()
        rest = [e async for e in sse_events(again)]
    assert rest and rest[-1].data == "ok", rest[-3:]
    ids = [e.id for e in before + rest]
    assert len(ids) == len(set(ids)), f"events sent twice: {ids}"
    tokens = "".join(e.data for e in before + rest if e.event == "token")
    assert tokens == "".join(f"{i} " for i in range(30)), tokens
    # once it has seen its turn's done, there is nothing more to stream
    seen_all = {**headers, "Last-Event-ID": rest[-1].id or ""}
    async with api.http.post(path, json=body, headers=seen_all) as finished:
        assert finished.status == 204, await finished.text()
    # a bad id on a repeat is refused as on GET .../events
    bad = {**headers, "Last-Event-ID": "not-an-id"}
    async with api.http.post(path, json=body, headers=bad) as refused:
        assert refused.status == 400, await refused.text()
        assert (await refused.json())["error"]["code"] == "bad_position"


async def test_two_members_sending_the_same_key_in_a_project_conversation_each_get_a_turn(
    api: SseClient,
    services: Services,
    http: aiohttp.ClientSession,
    event_log: EventLog,
    user: str,
) -> None:
    project = await funded_project(api, services, http, "Keys")
    bob = f"bob-{project}"
    status, added = await api.request(
        "POST", f"/v1/projects/{project}/members", json={"user_id": bob}
    )
    assert status == 201, added
    cid = (await api.create_conversation(project_id=project))["id"]
    as_bob = SseClient(http, services.edge_url, token_for(bob))
    mine = await api.send_json(cid, "yes [[tokens=1]]", idempotency_key="1", on_busy="enqueue")
    theirs = await as_bob.send_json(cid, "yes [[tokens=1]]", idempotency_key="1", on_busy="enqueue")
    assert mine["message_id"] != theirs["message_id"], (mine, theirs)
    log = await wait_for_ends(event_log, cid, 2)
    users = [(e.message_id, e.user_id) for e in log if isinstance(e, UserMessage)]
    assert sorted(users) == sorted([(mine["message_id"], user), (theirs["message_id"], bob)])


async def test_a_viewer_of_the_conversation_keeps_its_stream_through_the_queued_turns(
    api: SseClient,
) -> None:
    # A GET viewer's stream ends when the conversation goes idle after a turn's end.
    # With turns queued behind that end it is not idle: the record must say so
    # before the end is in the log, or the stream ends between the turns.
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "first [[tokens=400]]")  # a second: the viewer joins meanwhile
    for i in range(3):
        await api.send_json(cid, f"next {i} [[tokens=5]]", on_busy="enqueue")
    async with asyncio.timeout(30), api.events(cid) as viewer:
        seen = [e async for e in sse_events(viewer)]
    ends = [e.data for e in seen if e.event == "done"]
    assert ends == ["ok"] * 4, [(e.event, e.data) for e in seen if e.event != "token"]


async def test_a_viewer_of_the_conversation_is_not_shown_a_busy_refusal_as_an_end(
    api: SseClient,
) -> None:
    # Someone else's message refused as busy never became a turn: its error and
    # done would end, for the viewer's frontend, the turn it is watching.
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "long [[tokens=400]]")
    async with asyncio.timeout(30), api.events(cid) as viewer:
        await first_tokens(viewer, 3)
        status, body = await api.request(
            "POST", f"/v1/conversations/{cid}/messages", json={"content": "me now"}
        )
        assert status == 409 and body["error"]["code"] == "busy", body
        rest = [e async for e in sse_events(viewer)]
    assert [e.event for e in rest if e.event not in ("token", "thinking")] == ["done"], [
        (e.event, e.data) for e in rest if e.event != "token"
    ]
    assert rest[-1].data == "ok"


async def test_the_conversation_list_shows_which_conversations_have_a_turn_running(
    api: SseClient,
) -> None:
    quiet = (await api.create_conversation())["id"]
    busy = (await api.create_conversation())["id"]
    await api.send_json(busy, "long [[tokens=400]]")
    async with asyncio.timeout(10):
        while True:  # as a client polls its list
            status, listed = await api.request("GET", "/v1/conversations")
            assert status == 200, listed
            turns = {c["id"]: c["active_turn"] for c in listed["conversations"]}
            if turns.get(busy) and turns[busy]["turn_id"]:
                break
            await asyncio.sleep(0.02)
    assert turns[quiet] is None, turns
    status, detail = await api.request("GET", f"/v1/conversations/{busy}")
    assert detail["active_turn"]["turn_id"] == turns[busy]["turn_id"], detail


async def test_interrupt_cancels_the_running_turn_and_answers_the_new_message(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "a long one [[tokens=4000]]")
    async with asyncio.timeout(30), api.events(cid) as viewer:
        await first_tokens(viewer, 3)
        events = await api.send_stream(cid, "never mind [[tokens=4]]", on_busy="interrupt")
    assert events[0].event == "started" and events[-1].data == "ok", events
    log = await wait_for_ends(event_log, cid, 2)
    ends = [e for e in log if isinstance(e, Done | Cancelled | Failed)]
    assert isinstance(ends[0], Cancelled) and ends[0].reason == "superseded", ends[0]
    assert isinstance(ends[1], Done) and ends[1].turn_id == events[0].data["turn_id"]


# ---------------------------------------------------------------- versions


async def test_regenerate_makes_a_new_answer_version_and_streams_it(
    api: SseClient, projected: Projected
) -> None:
    cid = (await api.create_conversation())["id"]
    first = await api.send_stream(cid, "say something [[tokens=6]]")
    answer_id = first[0].data["turn_id"]
    again = await api.send_stream_to(f"/v1/conversations/{cid}/messages/{answer_id}/regenerate", {})
    assert again[0].event == "started" and again[-1].data == "ok", again
    new_id = again[0].data["turn_id"]
    assert new_id != answer_id

    await projected(cid)
    rows = await _messages(api, cid, "all")
    answers = [m for m in rows if m["role"] == "assistant"]
    assert [(m["id"], m["version_number"], m["is_latest"]) for m in answers] == [
        (answer_id, 1, False),
        (new_id, 2, True),
    ], answers
    assert answers[0]["version_group_id"] == answers[1]["version_group_id"]
    assert answers[0]["is_fork_origin"] is True
    latest = await _messages(api, cid, "latest")
    assert [m["id"] for m in latest if m["role"] == "assistant"] == [new_id]


@pytest.mark.parametrize("on_busy", ["interrupt", "enqueue"])
async def test_regenerating_the_answer_being_written_stops_or_follows_it(
    api: SseClient, projected: Projected, on_busy: str
) -> None:
    """Regenerate on an answer still streaming was refused whatever `on_busy` said,
    while a new message with the same word was taken: `interrupt` now stops the
    answer and writes it again (ChatGPT's regenerate mid-answer), `enqueue` writes it
    again once it is done; `reject` stays a 409 busy."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, "count [[tokens=150]] [[rate=50]]")
    async with asyncio.timeout(30), api.events(cid) as viewer:
        seen = await first_tokens(viewer, 3)
        answer_id = seen[0].data["turn_id"]
        path = f"/v1/conversations/{cid}/messages/{answer_id}/regenerate"
        status, refused = await api.request("POST", path, json={})
        assert (status, refused["error"]["code"]) == (409, "busy"), refused
        again = await api.send_stream_to(path, {"on_busy": on_busy})
        first_end = [e.data async for e in sse_events(viewer) if e.event == "done"][:1]
    assert first_end == (["stopped"] if on_busy == "interrupt" else ["ok"]), first_end
    assert again[0].event == "started" and again[-1].data == "ok", again[-2:]

    await projected(cid)
    answers = [m for m in await _messages(api, cid, "all") if m["role"] == "assistant"]
    assert [(m["id"], m["version_number"], m["is_latest"]) for m in answers] == [
        (answer_id, 1, False),
        (again[0].data["turn_id"], 2, True),
    ], answers


async def test_editing_a_message_answers_the_edited_history_only(
    api: SseClient, recorder: tuple[Recorder, str], projected: Projected
) -> None:
    recording, _ = recorder
    cid = (await api.create_conversation(model="recorder"))["id"]
    await api.send_stream(cid, "first question")
    await api.send_stream(cid, "second question")
    await projected(cid)
    rows = await _messages(api, cid, "latest")
    first_id = rows[0]["id"]
    before = len(recording.requests)
    edited = await api.send_stream_to(
        f"/v1/conversations/{cid}/messages/{first_id}", {"content": "the question, edited"}, "PATCH"
    )
    assert edited[-1].data == "ok", edited
    sent = recording.requests[before]["messages"]
    assert [m["content"] for m in sent[1:]] == ["the question, edited"], sent

    await projected(cid)
    rows = await _messages(api, cid, "all")
    users = [m for m in rows if m["role"] == "user"]
    assert [
        (m["version_number"], m["is_latest"]) for m in users if m["version_group_id"] == first_id
    ] == [
        (1, False),
        (2, True),
    ], users
    latest = await _messages(api, cid, "latest")
    assert [m["role"] for m in latest] == ["user", "assistant"], latest
    assert latest[0]["content"][0]["content"] == "the question, edited"


async def test_regenerating_or_editing_a_message_that_is_not_there_is_a_404(api: SseClient) -> None:
    cid = (await api.create_conversation())["id"]
    status, body = await api.request(
        "POST", f"/v1/conversations/{cid}/messages/01NOSUCHMESSAGE000000000/regenerate"
    )
    assert status == 404 and body["error"]["code"] == "not_found", body
    status, body = await api.request(
        "PATCH", f"/v1/conversations/{cid}/messages/01NOSUCHMESSAGE000000000", json={"content": "x"}
    )
    assert status == 404 and body["error"]["code"] == "not_found", body


async def _messages(api: SseClient, cid: str, versions: str) -> list[dict[str, Any]]:
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages?versions={versions}")
    assert status == 200, body
    rows: list[dict[str, Any]] = body["messages"]
    return rows


# ---------------------------------------------------------------- tools


async def test_calls_of_one_response_run_side_by_side_and_failures_become_results(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    calls = ";".join(
        ['sleepy{"ms": 400}'] * 3
        + ["boom{}", "slowpoke{}", "not_text{}", 'calculator{"expression": "6*7"}']
    )
    events = await api.send_stream(cid, f"[[tools={calls}]]")
    assert events[-1].data == "ok", events[-3:]
    results = {e.data["id"]: e.data for e in events if e.event == "tool_result"}
    assert len(results) == 7, results
    by_name: dict[str, list[dict[str, Any]]] = {}
    for result in results.values():
        by_name.setdefault(result["name"], []).append(result)
    assert [r["result"] for r in by_name["sleepy"]] == ["slept 400 ms"] * 3
    assert by_name["boom"][0]["error"] == "tool 'boom' failed: RuntimeError"
    assert by_name["slowpoke"][0]["error"] == "tool 'slowpoke' took longer than 0.2s"
    assert by_name["not_text"][0]["error"] == "tool 'not_text' returned bytes, not text"
    assert by_name["calculator"][0]["result"] == "42"
    # side by side: the three 400 ms sleeps end together, not 400 ms apart
    log = await event_log.read(cid)
    ends = sorted(
        s.event.at for s in log if isinstance(s.event, ToolResult) and s.event.name == "sleepy"
    )
    assert ends[-1] - ends[0] < 300_000_000, (
        f"sleeps ended {(ends[-1] - ends[0]) / 1e6:.0f} ms apart"
    )
    answer = "".join(e.data for e in events if e.event == "token")
    assert "slept 400 ms" in answer and "42" in answer


async def test_a_tool_result_with_a_lone_surrogate_is_recorded_and_the_turn_goes_on(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "[[tools=from_outside{}]]")
    assert events[-1].data == "ok", events[-3:]
    results = [e.data for e in events if e.event == "tool_result"]
    assert [r["result"] for r in results] == ["half a pair: \ufffd."]
    log = [s.event for s in await event_log.read(cid)]
    assert [e.result for e in log if isinstance(e, ToolResult)] == ["half a pair: \ufffd."]
    assert isinstance(log[-1], Done)


async def test_a_tool_that_holds_the_event_loop_is_named_while_it_does(
    api: SseClient, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """An async tool that blocks (a blocking client, `time.sleep`) stalls every stream,
    turn and request of its worker, and no timeout can stop it: the log names it
    while it does (where the loop's thread is), and says how long it held the loop."""
    caplog.set_level(logging.WARNING, logger="parley.stalls")
    registry = services.metrics.registry
    before = registry.get_sample_value("parley_event_loop_stalls_total") or 0.0
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "[[tools=holds_the_loop{}]]")
    assert events[-1].data == "ok", events[-3:]
    async with asyncio.timeout(5):  # the watch's thread says it once the loop beats again
        while not any(r.getMessage() == "event loop free again" for r in caplog.records):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    (held,) = [r for r in caplog.records if r.getMessage().startswith("event loop held")]
    where: str = held.__dict__["where"]
    assert "tool_plugin.py" in where and where.endswith(" holds_the_loop"), where
    (free,) = [r for r in caplog.records if r.getMessage() == "event loop free again"]
    assert 1.2 <= free.__dict__["held_s"] <= 3.0, free.__dict__["held_s"]
    assert registry.get_sample_value("parley_event_loop_stalls_total") == before + 1


async def test_a_project_tool_the_model_names_in_personal_scope_is_refused_not_run(
    api: SseClient, services: Services, http: aiohttp.ClientSession
) -> None:
    personal = (await api.create_conversation())["id"]
    # offered to the model it is not (personal scope hides it), so the model makes it up
    events = await api.send_stream(personal, "[[tools=!project_notes{}]]")
    assert events[-1].data == "ok", events[-3:]
    [result] = [e.data for e in events if e.event == "tool_result"]
    assert result["result"] is None, result
    assert result["error"] == "tool 'project_notes' is not available in a personal conversation"
    # in a project's conversation the same call runs
    project = await funded_project(api, services, http, "Notes")
    shared = (await api.create_conversation(project_id=project))["id"]
    events = await api.send_stream(shared, "[[tools=project_notes{}]]")
    assert events[-1].data == "ok", events[-3:]
    [result] = [e.data for e in events if e.event == "tool_result"]
    assert (result["result"], result["error"]) == ("the project's notes", None), result


async def test_the_set_title_tool_names_the_conversation(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, '[[tools=set_title{"title": "Named by a tool"}]]')
    titles = [e.data["title"] for e in events if e.event == "title"]
    assert titles[-1] == "Named by a tool", titles
    log = await event_log.read(cid)
    assert [e.event.source for e in log if isinstance(e.event, Title)][-1] == "tool"
    async with asyncio.timeout(10):
        title = ""
        while title != "Named by a tool":  # the projection catches up
            title = (await api.request("GET", f"/v1/conversations/{cid}"))[1]["title"]
            await asyncio.sleep(0.05)


async def test_a_title_of_spaces_is_no_title_and_titles_are_trimmed(api: SseClient) -> None:
    """A title of spaces was kept as the title, and the first message never named
    the conversation; one with spaces around it kept them."""
    trimmed = await api.create_conversation(title="  Ops runbook \n")
    assert trimmed["title"] == "Ops runbook", trimmed
    blank = await api.create_conversation(title="   ")
    assert blank["title"] == "", blank
    events = await api.send_stream(blank["id"], "Plan the quarterly roadmap review")
    titles = [e.data["title"] for e in events if e.event == "title"]
    assert titles == ["Plan the quarterly roadmap review"], titles


async def test_a_model_that_keeps_calling_tools_is_stopped_after_99_rounds(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    async with asyncio.timeout(60):
        events = await api.send_stream(cid, "[[rounds=150]]")
    assert [e.event for e in events[-2:]] == ["error", "done"], events[-3:]
    assert events[-2].raw["code"] == "tool_rounds_exhausted" and "99" in events[-2].data
    log = await event_log.read(cid)
    assert sum(isinstance(s.event, ToolResult) for s in log) == 99


# ---------------------------------------------------------------- model errors


async def test_model_errors_before_the_first_token_are_retried(
    api: SseClient, http: aiohttp.ClientSession, demo_model_url: str
) -> None:
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, f"[[flaky={cid}:2]] [[tokens=3]]")
    assert events[-1].data == "ok", events
    assert "".join(e.data for e in events if e.event == "token") == "0 1 2 "


async def test_a_model_that_keeps_failing_before_its_first_token_fails_the_turn(
    api: SseClient,
) -> None:
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, f"[[flaky={cid}:50]] [[tokens=3]]")
    assert [e.event for e in events[-2:]] == ["error", "done"], events
    assert events[-2].raw["code"] == "http_503"


async def test_a_model_that_never_answers_is_waited_for_once_not_once_per_retry(
    api: SseClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.turn")
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "[[fail=silent]]")
    assert [e.event for e in events[-2:]] == ["error", "done"], events
    assert events[-2].raw["code"] == "timeout", events[-2]
    retried = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert retried == [], [r.getMessage() for r in retried]


async def test_every_user_message_of_a_conversation_has_its_turn(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    for i in range(3):
        await api.send_stream(cid, f"message {i} [[tokens=2]]")
    log = [s.event for s in await event_log.read(cid)]
    users = [e.message_id for e in log if isinstance(e, UserMessage)]
    answered = [e.user_message_id for e in log if isinstance(e, Started)]
    assert users == answered and len(users) == 3


def _ids(events: list[SseEvent]) -> list[str | None]:
    return [e.id for e in events]


__all__ = ["json", "until_done"]


async def test_a_viewer_of_the_conversation_is_not_shown_refusals_while_turns_go_on(
    api: SseClient, event_log: EventLog
) -> None:
    """Messages queued behind a running turn are refused (superseded) between two
    turns when an edit, queued behind them, takes their branch away; a viewer of the
    whole conversation must not get their `error` and `done`: its frontend would stop
    there and miss the edit's turn that follows."""
    cid = (await api.create_conversation())["id"]
    first = await api.send_json(cid, "first [[tokens=40]] [[rate=20]]")
    async with api.events(cid) as viewer:
        assert viewer.status == 200
        for text in ("q1 [[tokens=2]]", "q2 [[tokens=2]]"):
            await api.send_json(cid, text, on_busy="enqueue")
        status, body = await api.request(
            "PATCH",
            f"/v1/conversations/{cid}/messages/{first['message_id']}",
            json={"content": "edited [[tokens=2]]", "on_busy": "enqueue"},
            headers={"Accept": "application/json"},
        )
        assert status == 202, body
        seen: list[SseEvent] = []
        async with asyncio.timeout(30):
            async for event in sse_events(viewer):
                seen.append(event)
                if [e.data for e in seen if e.event == "done"] == ["ok", "ok"]:
                    break  # the first turn's end, then the edit's
    refused = [s.event for s in await event_log.read(cid) if isinstance(s.event, CommandRejected)]
    assert [r.code for r in refused] == ["superseded", "superseded"], refused
    assert "error" not in [e.event for e in seen], [(e.event, e.data) for e in seen]


async def test_a_refusal_on_an_idle_conversation_reads_the_same_live_and_resumed(
    api: SseClient, event_log: EventLog
) -> None:
    """The viewer watching live was shown nothing (the actor's record of the request
    being decided made the conversation look busy), one resuming from the same id
    an error and its end: the same position read two ways."""
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "hi [[tokens=2]]")
    end = (await event_log.read(cid))[-1].seq
    regenerate = f"/v1/conversations/{cid}/messages/no-such-message/regenerate"
    async with asyncio.timeout(30):
        async with api.events(cid, after=str(end)) as live:
            assert live.status == 200
            status, body = await api.request("POST", regenerate, json={})
            assert status == 404, body  # the actor refused it, and the log says so
            seen_live = [(e.id, e.event) async for e in sse_events(live)]
        status, body = await api.request("POST", regenerate, json={})
        assert status == 404, body
        log = await event_log.read(cid)  # the edge answered from the refusal in the log
        refusals = [s.seq for s in log if isinstance(s.event, CommandRejected)]
        assert len(refusals) == 2, log[-3:]
        resumed = []
        for position in (end, refusals[0]):  # each stream ends at the first refusal it shows
            async with api.events(cid, after=str(position)) as again:
                resumed.append([(e.id, e.event) async for e in sse_events(again)])
    first, second = refusals
    assert seen_live == [(f"{first}-0", "error"), (str(first), "done")], seen_live
    assert resumed == [seen_live, [(f"{second}-0", "error"), (str(second), "done")]], resumed


async def test_a_tool_running_when_its_turn_is_cancelled_gets_an_end_too(
    api: SseClient, event_log: EventLog
) -> None:
    """Its call, left without a result, showed as pending for ever."""
    cid = (await api.create_conversation())["id"]
    await api.send_json(cid, '[[tools=sleepy{"ms": 20000}]]')
    async with asyncio.timeout(20):
        while not any(isinstance(s.event, ToolCall) for s in await event_log.read(cid)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    status, body = await api.request("POST", f"/v1/conversations/{cid}/cancel")
    assert status == 202 and body["cancelled"], body
    async with asyncio.timeout(20):
        while not any(isinstance(s.event, Cancelled) for s in await event_log.read(cid)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    log = [s.event for s in await event_log.read(cid)]
    (result,) = [e for e in log if isinstance(e, ToolResult)]
    assert result.error is not None and result.error.startswith("cancelled"), result
    assert log.index(result) < log.index(next(e for e in log if isinstance(e, Cancelled)))
