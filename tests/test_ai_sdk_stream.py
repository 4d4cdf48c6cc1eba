"""The translation of a turn into the AI SDK's UI message stream, without servers."""

from __future__ import annotations

from typing import Any

from api.ai_sdk_stream import UiStream, frame
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    Chunk,
    ChunkKind,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
)

C, T, AT = "c-1", "t-1", 1


def started() -> Started:
    return Started(
        conversation_id=C, at=AT, event_id="e0", turn_id=T, user_message_id="m-1", model="demo"
    )


def chunk(kind: ChunkKind, text: str) -> Chunk:
    return Chunk(conversation_id=C, at=AT, event_id="e", turn_id=T, kind=kind, text=text)


def done() -> Done:
    return Done(
        conversation_id=C,
        at=AT,
        event_id="e9",
        turn_id=T,
        content=[],
        stop_reason="stop",
        input_tokens=1,
        output_tokens=2,
    )


def run(events: list[AnyEvent]) -> list[dict[str, Any]]:
    stream = UiStream()
    out: list[dict[str, Any]] = []
    for event in events:
        out.extend(stream.feed(event))
    assert stream.finished
    return out


def test_thinking_then_text_become_a_reasoning_part_then_a_text_part() -> None:
    chunks = run(
        [
            started(),
            chunk("thinking", "Let me "),
            chunk("thinking", "see."),
            chunk("answer", "Hello"),
            chunk("answer", " there"),
            done(),
        ]
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-delta",
        "reasoning-end",
        "text-start",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert chunks[0] == {"type": "start", "messageId": T}
    assert chunks[-1] == {"type": "finish", "messageMetadata": {"finishReason": "stop"}}
    assert {c["id"] for c in chunks if c["type"].startswith("reasoning")} == {"reasoning-1"}
    assert {c["id"] for c in chunks if c["type"].startswith("text")} == {"text-2"}


def test_a_tool_round_closes_the_text_and_the_answer_after_it_is_a_new_step() -> None:
    call = ToolCall(
        conversation_id=C,
        at=AT,
        event_id="e3",
        turn_id=T,
        call_id="call_1",
        name="calculator",
        arguments='{"expression": "6*7"}',
    )
    result = ToolResult(
        conversation_id=C,
        at=AT,
        event_id="e4",
        turn_id=T,
        call_id="call_1",
        name="calculator",
        result="42",
        duration_ms=1.0,
    )
    chunks = run(
        [started(), chunk("answer", "Working"), call, result, chunk("answer", "42"), done()]
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-start",
        "tool-input-available",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    available = chunks[6]
    assert available["input"] == {"expression": "6*7"} and available["toolName"] == "calculator"
    assert chunks[7] == {"type": "tool-output-available", "toolCallId": "call_1", "output": 42}


def test_a_failing_tool_is_an_output_error() -> None:
    call = ToolCall(
        conversation_id=C, at=AT, event_id="e3", turn_id=T, call_id="c", name="boom", arguments=""
    )
    result = ToolResult(
        conversation_id=C, at=AT, event_id="e4", turn_id=T, call_id="c", name="boom", error="broke"
    )
    chunks = run([started(), call, result, done()])
    assert {"type": "tool-output-error", "toolCallId": "c", "errorText": "broke"} in chunks
    assert chunks[2]["type"] == "tool-input-start" and chunks[3]["input"] == {}


def test_cancelled_failed_and_refused_turns_end_as_the_sdk_expects() -> None:
    cancelled = Cancelled(
        conversation_id=C, at=AT, event_id="e", turn_id=T, content=[], reason="user"
    )
    assert run([started(), chunk("answer", "par"), cancelled])[-3:] == [
        {"type": "text-end", "id": "text-1"},
        {"type": "finish-step"},
        {"type": "abort"},
    ]
    failed = Failed(conversation_id=C, at=AT, event_id="e", turn_id=T, code="x", message="it broke")
    assert run([started(), failed])[-2:] == [
        {"type": "error", "errorText": "it broke"},
        {"type": "finish", "messageMetadata": {"finishReason": "error"}},
    ]
    refused = BillingRejected(
        conversation_id=C,
        at=AT,
        event_id="e",
        turn_id=T,
        user_message_id="m",
        account="project:p",
        needed=5250,
        available=0,
    )
    error, finish = run([started(), refused])[-2:]
    assert error["type"] == "error" and "5250" in error["errorText"]
    assert finish == {"type": "finish", "messageMetadata": {"finishReason": "error"}}


def test_after_its_end_a_stream_adds_nothing_and_titles_ride_as_transient_data() -> None:
    stream = UiStream()
    stream.feed(started())
    title = Title(conversation_id=C, at=AT, event_id="e", title="Hi", source="auto", turn_id=T)
    assert stream.feed(title) == [
        {"type": "data-title", "data": {"title": "Hi"}, "transient": True}
    ]
    stream.feed(done())
    assert stream.feed(chunk("answer", "late")) == []


def test_tool_json_python_cannot_use_is_passed_on_as_text_or_made_encodable() -> None:
    """JSON that Python's parser turns into an error (a number of 5,000 digits, deep
    nesting) or into a string no encoder takes (a lone surrogate escape)."""
    huge, deep = '{"n": ' + "1" * 5000 + "}", "[" * 5000 + "]" * 5000
    events: list[AnyEvent] = [started()]
    for i, text in enumerate([huge, deep, '{"s": "\\ud800"}']):
        call = f"call-{i}"
        events.append(
            ToolCall(
                conversation_id=C,
                at=AT,
                event_id="e",
                turn_id=T,
                call_id=call,
                name="f",
                arguments=text,
            )
        )
        events.append(
            ToolResult(conversation_id=C, at=AT, event_id="e", turn_id=T, call_id=call, result=text)
        )
    chunks = run([*events, done()])
    inputs = [c["input"] for c in chunks if c["type"] == "tool-input-available"]
    outputs = [c["output"] for c in chunks if c["type"] == "tool-output-available"]
    assert inputs[:2] == [huge, deep] and outputs[:2] == [huge, deep], chunks
    assert inputs[2] == outputs[2] == {"s": "\ufffd"}, chunks
    for c in chunks:
        frame(c)  # every chunk goes on the wire
