"""Message rows show the whole turn: tool cards, latency, counters, as a reloaded page needs them.

Turns run through the whole system where the demo model can produce them;
shapes it cannot (edited messages, call ids repeated across rounds, a result
whose call was never projected) are appended straight to a fresh
conversation's log, as a newer actor could write them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec

from api.responses import instant
from events.codec import timestamp
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import (
    ConversationCreated,
    Done,
    Event,
    Failed,
    Started,
    ToolCall,
    ToolResult,
    UserMessage,
)
from parley.services import Services
from projections.handlers import tool_card
from tests.sse import SseClient


async def projected(services: Services, seq: int) -> None:
    projector = services.projector
    assert projector is not None
    async with asyncio.timeout(20), projector.applied:
        await projector.applied.wait_for(lambda: projector.position >= seq)


async def messages(api: SseClient, cid: str, *, versions: str = "latest") -> list[dict[str, Any]]:
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages?versions={versions}")
    assert status == 200, body
    rows: list[dict[str, Any]] = body["messages"]
    return rows


def latency_ms(started: Started, end: Event) -> int:
    """What the row must say: the two event timestamps as the columns store them,
    rounded as Postgres rounds (half away from zero, not Python's half to even)."""
    delta = timestamp(end.at) - timestamp(started.at)
    micros = delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds
    return (micros + 500) // 1000


async def test_a_reloaded_page_shows_the_turns_tool_cards_and_latency(
    api: SseClient, services: Services, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "calculate 6*7")
    await api.send_stream(cid, "what is the time?")
    log = await event_log.read(cid)
    await projected(services, log[-1].seq)

    calls = [s.event for s in log if isinstance(s.event, ToolCall)]
    # ids are per turn (the demo model numbers its calls call_1, ... in each)
    results = {
        (s.event.turn_id, s.event.call_id): s.event for s in log if isinstance(s.event, ToolResult)
    }
    assert [c.name for c in calls] == ["calculator", "get_current_time"], calls
    rows = [r for r in await messages(api, cid) if r["role"] == "assistant"]
    assert len(rows) == 2
    for row, call in zip(rows, calls, strict=True):
        result = results[call.turn_id, call.call_id]
        assert row["tool_calls"] == [
            {
                "id": call.call_id,
                "name": call.name,
                "arguments": json.loads(call.arguments),
                "result": result.result,
                "error": result.error,
                "duration_ms": result.duration_ms,
            }
        ], row["tool_calls"]
    assert "42" in rows[0]["tool_calls"][0]["result"]

    starts = {s.event.turn_id: s.event for s in log if isinstance(s.event, Started)}
    ends = [s.event for s in log if isinstance(s.event, Done)]
    for row, end in zip(rows, ends, strict=True):
        assert row["latency_ms"] == latency_ms(starts[end.turn_id], end), (row, end)
        assert row["latency_ms"] > 0


async def test_a_failed_turn_keeps_its_tokens_and_latency_and_the_totals_count_it(
    api: SseClient, services: Services, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "fine first [[tokens=5]]")
    await api.send_stream(cid, "now break [[fail=error]]")
    log = await event_log.read(cid)
    await projected(services, log[-1].seq)

    starts = [s.event for s in log if isinstance(s.event, Started)]
    ends = [s.event for s in log if isinstance(s.event, Done | Failed)]
    failed = ends[-1]
    assert isinstance(failed, Failed) and failed.input_tokens > 0
    row = (await messages(api, cid))[-1]
    assert row["status"] == "failed" and row["error_code"] == failed.code
    assert row["latency_ms"] == latency_ms(starts[-1], failed)
    assert row["input_tokens"] == failed.input_tokens
    assert row["tool_calls"] == []

    _, conversation = await api.request("GET", f"/v1/conversations/{cid}")
    assert conversation["message_count"] == 4, conversation
    assert conversation["token_usage_total"] == sum(e.input_tokens + e.output_tokens for e in ends)
    assert conversation["updated_at"] == instant(failed.at)


class Writer:
    """Appends events to one fresh conversation's log, as an actor would."""

    def __init__(self, event_log: EventLog, user: str) -> None:
        self.log = event_log
        self.cid = new_id()
        self.user = user
        self.head = 0

    def _base(self) -> dict[str, Any]:
        return {"conversation_id": self.cid, "at": time.time_ns(), "event_id": new_id()}

    async def append(self, *events: Event) -> int:
        self.head = await self.log.append(self.cid, list(events), expected_seq=self.head)
        return self.head

    async def create(self) -> int:
        return await self.append(ConversationCreated(**self._base(), user_id=self.user))

    def user_message(self, group: str, version: int, content: str) -> UserMessage:
        return UserMessage(
            **self._base(),
            message_id=new_id(),
            content=content,
            version_group_id=group,
            version_number=version,
        )

    def started(self, turn: str, user_message_id: str) -> Started:
        return Started(**self._base(), turn_id=turn, user_message_id=user_message_id, model="demo")

    def call(self, turn: str, call_id: str, arguments: str) -> ToolCall:
        return ToolCall(
            **self._base(), turn_id=turn, call_id=call_id, name="calculator", arguments=arguments
        )

    def result(self, turn: str, call_id: str, result: str) -> ToolResult:
        return ToolResult(
            **self._base(),
            turn_id=turn,
            call_id=call_id,
            name="calculator",
            result=result,
            duration_ms=1.5,
        )

    def done(self, turn: str) -> Done:
        return Done(
            **self._base(),
            turn_id=turn,
            content=[],
            stop_reason="stop",
            input_tokens=3,
            output_tokens=4,
        )


async def test_an_edited_message_replaces_its_version_and_message_count_counts_latest_only(
    api: SseClient, services: Services, event_log: EventLog, user: str
) -> None:
    writer = Writer(event_log, user)
    await writer.create()
    group = new_id()
    first = writer.user_message(group, 1, "first words")
    edited = writer.user_message(group, 2, "better words")
    other = writer.user_message(new_id(), 1, "another question")
    await projected(services, await writer.append(first, edited, other))

    latest = await messages(api, writer.cid)
    assert [m["id"] for m in latest] == [edited.message_id, other.message_id], latest
    every = await messages(api, writer.cid, versions="all")
    assert [(m["id"], m["is_latest"]) for m in every] == [
        (first.message_id, False),
        (edited.message_id, True),
        (other.message_id, True),
    ]
    _, conversation = await api.request("GET", f"/v1/conversations/{writer.cid}")
    assert conversation["message_count"] == 2, conversation


async def test_each_result_fills_its_own_call_even_when_ids_repeat_or_the_call_is_missing(
    api: SseClient, services: Services, event_log: EventLog, user: str
) -> None:
    writer = Writer(event_log, user)
    await writer.create()
    question = writer.user_message(new_id(), 1, "sums please")
    turn = new_id()
    events = [
        question,
        writer.started(turn, question.message_id),
        # round 1 and round 2 both number their call call_1, as some models do
        writer.call(turn, "call_1", '{"expression": "1+1"}'),
        writer.result(turn, "call_1", "2"),
        writer.call(turn, "call_1", "not json {"),
        writer.result(turn, "call_1", "?"),
        # a result whose call never reached the projection
        writer.result(turn, "call_9", "9"),
        writer.done(turn),
    ]
    await projected(services, await writer.append(*events))

    (row,) = [m for m in await messages(api, writer.cid) if m["role"] == "assistant"]
    done = {"error": None, "duration_ms": 1.5}
    assert row["tool_calls"] == [
        {**tool_card("call_1", "calculator", '{"expression": "1+1"}'), **done, "result": "2"},
        {**tool_card("call_1", "calculator", "not json {"), **done, "result": "?"},
        {**tool_card("call_9", "calculator", ""), **done, "result": "9"},
    ], row["tool_calls"]
    assert row["tool_calls"][1]["arguments"] == {}
    assert row["tool_calls"][1]["raw_arguments"] == "not json {"
    assert row["status"] == "complete" and row["input_tokens"] == 3


async def test_a_turn_closed_a_month_after_it_started_is_projected_with_its_latency_held(
    api: SseClient, services: Services, event_log: EventLog, user: str
) -> None:
    """An orphaned turn is closed when its conversation is next touched, which may be
    weeks on: its latency in milliseconds passed the column's integer, Postgres refused
    the end event, and the message stayed streaming with its tokens uncounted."""
    writer = Writer(event_log, user)
    await writer.create()
    question = writer.user_message(new_id(), 1, "are you there?")
    turn = new_id()
    started = writer.started(turn, question.message_id)
    month_ns = 30 * 86_400 * 1_000_000_000
    late = msgspec.structs.replace(writer.done(turn), at=started.at + month_ns)
    await projected(services, await writer.append(question, started, late))

    (row,) = [m for m in await messages(api, writer.cid) if m["role"] == "assistant"]
    assert row["status"] == "complete" and row["input_tokens"] == 3, row
    assert row["latency_ms"] == 2**31 - 1, row
    _, conversation = await api.request("GET", f"/v1/conversations/{writer.cid}")
    assert conversation["token_usage_total"] == 7, conversation
