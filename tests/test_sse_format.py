"""The SSE wire format (DESIGN section 6) as pure functions: envelopes, ids, resuming.

Every log event maps to zero, one or two SSE events; the ids they carry let a
viewer resume from any id it saw and get every later event exactly once. No
server: events are built in memory and frames compared byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.sse import Envelope, Position, envelopes, frame, frames, parse_position
from events.codec import Unreadable
from events.log import StoredEvent
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    Chunk,
    CommandRejected,
    ContentBlock,
    ConversationCreated,
    CreditsGranted,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
)
from tests.sse import WIRE_EVENT_NAMES

CONV = "conv-1"
TURN = "turn-1"
AT = 1_767_225_600_000_000_000
BLOCKS = [ContentBlock(role="assistant", content="Hello")]


def started() -> Started:
    return Started(
        conversation_id=CONV,
        at=AT,
        event_id="e-started",
        turn_id=TURN,
        user_message_id="msg-1",
        model="demo",
    )


def token(text: str, kind: str = "answer") -> Chunk:
    return Chunk(
        conversation_id=CONV,
        at=AT,
        event_id=f"e-{text}",
        turn_id=TURN,
        kind="thinking" if kind == "thinking" else "answer",
        text=text,
    )


def tool_call(arguments: str) -> ToolCall:
    return ToolCall(
        conversation_id=CONV,
        at=AT,
        event_id="e-call",
        turn_id=TURN,
        call_id="call-1",
        name="get_weather",
        arguments=arguments,
    )


def tool_result(*, result: str | None = '{"temp_c": 4}', error: str | None = None) -> ToolResult:
    return ToolResult(
        conversation_id=CONV,
        at=AT,
        event_id="e-result",
        turn_id=TURN,
        call_id="call-1",
        name="get_weather",
        result=result,
        error=error,
        duration_ms=12.5,
    )


def title(turn_id: str | None = TURN) -> Title:
    return Title(
        conversation_id=CONV,
        at=AT,
        event_id="e-title",
        title="Weather in Oslo",
        source="auto",
        turn_id=turn_id,
    )


def done() -> Done:
    return Done(
        conversation_id=CONV,
        at=AT,
        event_id="e-done",
        turn_id=TURN,
        content=BLOCKS,
        stop_reason="stop",
        input_tokens=10,
        output_tokens=2,
    )


def cancelled() -> Cancelled:
    return Cancelled(conversation_id=CONV, at=AT, event_id="e-cancel", turn_id=TURN, content=BLOCKS)


def failed() -> Failed:
    return Failed(
        conversation_id=CONV,
        at=AT,
        event_id="e-failed",
        turn_id=TURN,
        code="model_error",
        message="upstream returned HTTP 502",
    )


def billing_rejected() -> BillingRejected:
    return BillingRejected(
        conversation_id=CONV,
        at=AT,
        event_id="e-billing",
        turn_id=TURN,
        user_message_id="msg-1",
        account="project:proj-1",
        needed=5250,
        available=1200,
    )


def conversation_created() -> ConversationCreated:
    return ConversationCreated(conversation_id=CONV, at=AT, event_id="e-created", user_id="u-1")


def user_message() -> UserMessage:
    return UserMessage(
        conversation_id=CONV, at=AT, event_id="e-user", message_id="msg-1", content="Weather?"
    )


def credits_granted() -> CreditsGranted:
    return CreditsGranted(
        conversation_id=CONV, at=AT, event_id="e-credits", account="user:u-1", amount=1_000_000
    )


def command_rejected() -> CommandRejected:
    return CommandRejected(
        conversation_id=CONV,
        at=AT,
        event_id="e-rejected",
        command_id="cmd-9",
        message_id="msg-9",
        code="conversation_unreadable",
        message="this conversation takes no new messages",
    )


def unreadable() -> Unreadable:
    return Unreadable(raw=b'{"type":"from_the_future"}', type="from_the_future", error="unknown")


def wire(stored: StoredEvent) -> list[tuple[str, Any, str | None]]:
    # data as the wire carries it (typed Structs in api.sse, plain JSON values here)
    return [(e.event, msgspec.to_builtins(e.data), e.message_id) for e in envelopes(stored)]


# ---------------------------------------------------------------- envelopes

ENVELOPE_CASES: list[tuple[str, AnyEvent | Unreadable, list[tuple[str, Any, str | None]]]] = [
    (
        "started",
        started(),
        [
            (
                "started",
                {"turn_id": TURN, "message_id": TURN, "user_message_id": "msg-1", "model": "demo"},
                TURN,
            )
        ],
    ),
    ("thinking chunk", token("Let me think", "thinking"), [("thinking", "Let me think", TURN)]),
    ("answer chunk", token("Hel"), [("token", "Hel", TURN)]),
    (
        "tool_call with JSON arguments carries the parsed object",
        tool_call('{"city": "Oslo", "days": 3}'),
        [
            (
                "tool_call",
                {"id": "call-1", "name": "get_weather", "arguments": {"city": "Oslo", "days": 3}},
                TURN,
            )
        ],
    ),
    (
        "tool_call with invalid JSON carries an empty object (the text rides beside it)",
        tool_call('{"city": "Oslo"'),
        [("tool_call", {"id": "call-1", "name": "get_weather", "arguments": {}}, TURN)],
    ),
    (
        "tool_call without arguments carries an empty object",
        tool_call(""),
        [("tool_call", {"id": "call-1", "name": "get_weather", "arguments": {}}, TURN)],
    ),
    (
        "tool_result",
        tool_result(),
        [
            (
                "tool_result",
                {
                    "id": "call-1",
                    "name": "get_weather",
                    "result": '{"temp_c": 4}',
                    "error": None,
                    "duration_ms": 12.5,
                },
                TURN,
            )
        ],
    ),
    (
        "tool_result with an error",
        tool_result(result=None, error="timeout after 30 s"),
        [
            (
                "tool_result",
                {
                    "id": "call-1",
                    "name": "get_weather",
                    "result": None,
                    "error": "timeout after 30 s",
                    "duration_ms": 12.5,
                },
                TURN,
            )
        ],
    ),
    ("title", title(), [("title", {"title": "Weather in Oslo"}, TURN)]),
    ("title outside a turn", title(None), [("title", {"title": "Weather in Oslo"}, None)]),
    ("done", done(), [("done", "ok", TURN)]),
    ("cancelled", cancelled(), [("done", "stopped", TURN)]),
    (
        "failed: error then done error",
        failed(),
        [
            ("error", "upstream returned HTTP 502", TURN),
            ("done", "error", TURN),
        ],
    ),
    (
        "billing_rejected: billing_error then done billing_error",
        billing_rejected(),
        [
            (
                "billing_error",
                "insufficient credits: the account project:proj-1 has 1200 micro-credits,"
                " this turn needs 5250",
                TURN,
            ),
            ("done", "billing_error", TURN),
        ],
    ),
    ("conversation_created is bookkeeping", conversation_created(), []),
    ("user_message is bookkeeping", user_message(), []),
    ("credits_granted is bookkeeping", credits_granted(), []),
    (
        "command_rejected: error then done error, under the message's id",
        command_rejected(),
        [
            ("error", "this conversation takes no new messages", "msg-9"),
            ("done", "error", "msg-9"),
        ],
    ),
    ("an unreadable entry is stepped over", unreadable(), []),
]


# The `data` of each SSE event exactly as the original frontend reads it (DESIGN section 6).
DESIGN_DATA_SHAPES: dict[str, Any] = {
    "started": {"turn_id", "message_id", "user_message_id", "model"},
    "thinking": str,
    "token": str,
    "tool_call": {"id", "name", "arguments"},
    "tool_result": {"id", "name", "result", "error", "duration_ms"},
    "title": {"title"},
    "billing_error": str,
    "error": str,
    "done": ("ok", "stopped", "billing_error", "error"),
}


@pytest.mark.parametrize(
    "event", [pytest.param(event, id=name) for name, event, _ in ENVELOPE_CASES]
)
def test_every_sse_data_has_the_shape_of_the_design_table(event: AnyEvent | Unreadable) -> None:
    for envelope in envelopes(StoredEvent(seq=7, event=event)):
        shape = DESIGN_DATA_SHAPES[envelope.event]
        data = msgspec.to_builtins(envelope.data)
        if shape is str:
            assert isinstance(data, str), f"{envelope.event}: expected a string, saw {data!r}"
        elif isinstance(shape, tuple):
            assert data in shape, f"{envelope.event}: expected one of {shape}, saw {data!r}"
        else:
            assert isinstance(data, dict) and set(data) == shape, (
                f"{envelope.event}: expected an object with keys {sorted(shape)}, saw {data!r}"
            )
        if envelope.event == "tool_call":
            assert isinstance(data["arguments"], dict), data


def test_tool_arguments_that_are_not_an_object_ride_beside_the_data() -> None:
    (envelope,) = envelopes(StoredEvent(seq=7, event=tool_call('{"city": "Oslo"')))
    assert envelope.data.arguments == {} and envelope.raw_arguments == '{"city": "Oslo"'
    (envelope,) = envelopes(StoredEvent(seq=7, event=tool_call('{"city": "Oslo"}')))
    assert envelope.raw_arguments is None


def test_error_codes_ride_in_the_envelope_beside_the_string() -> None:
    (error, _done) = envelopes(StoredEvent(seq=7, event=failed()))
    assert error.code == "model_error", error
    raw = frame("7-0", error)
    assert b'"code":"model_error"' in raw and b'"data":"upstream returned HTTP 502"' in raw


@pytest.mark.parametrize(
    ("event", "expected"),
    [pytest.param(event, expected, id=name) for name, event, expected in ENVELOPE_CASES],
)
def test_each_log_event_maps_to_its_sse_events(
    event: AnyEvent | Unreadable, expected: list[tuple[str, Any, str | None]]
) -> None:
    seen = wire(StoredEvent(seq=7, event=event))
    assert seen == expected, f"expected {expected!r}\nsaw      {seen!r}"


def test_every_wire_name_is_one_the_frontend_knows() -> None:
    known = WIRE_EVENT_NAMES
    names = {e.event for _, event, _ in ENVELOPE_CASES for e in envelopes(StoredEvent(1, event))}
    assert names == known, f"expected exactly {sorted(known)}, saw {sorted(names)}"
    assert set(DESIGN_DATA_SHAPES) == known


# ---------------------------------------------------------------- frames: ids and bytes


def test_a_frame_is_id_then_one_data_line_then_a_blank_line() -> None:
    seen = frames(StoredEvent(seq=12, event=token("Hel")))
    expected = [b'id: 12\ndata: {"event":"token","data":"Hel","message_id":"turn-1"}\n\n']
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


def test_an_envelope_without_a_message_id_leaves_the_key_out() -> None:
    seen = frames(StoredEvent(seq=3, event=title(None)))
    expected = [b'id: 3\ndata: {"event":"title","data":{"title":"Weather in Oslo"}}\n\n']
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


def test_a_frame_without_an_id_has_only_the_data_line() -> None:
    seen = frame(None, Envelope("error", {"code": "position_gone"}))
    expected = b'data: {"event":"error","data":{"code":"position_gone"}}\n\n'
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


def test_data_is_json_that_keeps_unicode_and_newlines_on_one_line() -> None:
    text = 'Grüße "quoted"\nnew line 🙂'
    (raw,) = frames(StoredEvent(seq=4, event=token(text)))
    lines = raw.split(b"\n")
    assert lines[0] == b"id: 4" and lines[2:] == [b"", b""], f"saw {raw!r}"
    assert lines[1].startswith(b"data: "), f"saw {raw!r}"
    envelope = json.loads(lines[1][len(b"data: ") :])
    expected = {"event": "token", "data": text, "message_id": TURN}
    assert envelope == expected, f"expected {expected!r}, saw {envelope!r}"
    assert list(envelope) == ["event", "data", "message_id"], f"key order {list(envelope)}"


@pytest.mark.parametrize(
    ("event", "expected_ids"),
    [
        pytest.param(token("x"), ["9"], id="one SSE event: N"),
        pytest.param(failed(), ["9-0", "9"], id="two SSE events: N-0 then N"),
        pytest.param(billing_rejected(), ["9-0", "9"], id="billing: N-0 then N"),
        pytest.param(user_message(), [], id="bookkeeping: no frames"),
    ],
)
def test_frame_ids_name_the_log_position_and_the_piece(
    event: AnyEvent, expected_ids: list[str]
) -> None:
    seen = [frame_id(f) for f in frames(StoredEvent(seq=9, event=event))]
    assert seen == expected_ids, f"expected ids {expected_ids!r}, saw {seen!r}"


def frame_id(raw: bytes) -> str:
    head = raw.split(b"\n", 1)[0]
    assert head.startswith(b"id: "), f"expected an id line, saw {raw!r}"
    return head[len(b"id: ") :].decode()


# ---------------------------------------------------------------- parse_position

PARSE_CASES: list[tuple[str, Position | None]] = [
    ("12", Position(seq=12)),
    ("12-0", Position(seq=12, piece=0)),
    ("12-1", Position(seq=12, piece=1)),
    ("0", Position(seq=0)),
    (" 12 ", Position(seq=12)),  # header values may carry surrounding spaces
    ("007", Position(seq=7)),
    ("9" * 18, Position(seq=int("9" * 18))),
    ("9" * 19, None),  # past what a JetStream sequence reaches in practice; never an id we gave
    ("١٢", None),  # Arabic-Indic digits: \d would take them
    ("１２", None),  # fullwidth digits
    ("", None),
    ("   ", None),
    ("x", None),
    ("12a", None),
    ("-1", None),
    ("+1", None),
    ("1.5", None),
    ("0x1f", None),
    ("12-", None),
    ("-0", None),
    ("1-2-3", None),
    ("12--1", None),
    ("12-1000", None),
    ("1" * 20, None),
    ("9" * 400, None),
    ("12\n13", None),
]


@pytest.mark.parametrize(("raw", "expected"), PARSE_CASES)
def test_parse_position_accepts_only_ids_we_hand_out(raw: str, expected: Position | None) -> None:
    seen = parse_position(raw)
    assert seen == expected, f"parse_position({raw!r}): expected {expected!r}, saw {seen!r}"


@pytest.mark.parametrize(
    ("position", "after"),
    [(Position(seq=12), 12), (Position(seq=12, piece=0), 11), (Position(seq=12, piece=3), 11)],
)
def test_a_partly_seen_event_is_read_again_from_the_log(position: Position, after: int) -> None:
    assert position.after() == after, f"{position!r}: expected {after}, saw {position.after()}"


# ---------------------------------------------------------------- resuming: exactly once

ALL_KINDS: list[AnyEvent] = [
    conversation_created(),
    user_message(),
    started(),
    token("Hel"),
    token("hmm", "thinking"),
    tool_call('{"a": 1}'),
    tool_call("not json"),
    tool_result(),
    title(),
    title(None),
    done(),
    cancelled(),
    failed(),
    billing_rejected(),
    credits_granted(),
]


def resume(log: list[StoredEvent], position: Position) -> list[bytes]:
    """What the edge sends a viewer at `position`: the log after `after()`, filtered."""
    out: list[bytes] = []
    for stored in log:
        if stored.seq > position.after():
            out.extend(frames(stored, position))
    return out


def all_frames(log: list[StoredEvent]) -> list[bytes]:
    return [f for stored in log for f in frames(stored)]


log_strategy = st.lists(
    st.tuples(st.sampled_from(ALL_KINDS), st.integers(min_value=1, max_value=3)), max_size=30
).map(
    # increasing sequences with gaps: other conversations share the stream
    lambda items: [
        StoredEvent(seq=sum(gap for _, gap in items[: i + 1]), event=event)
        for i, (event, _) in enumerate(items)
    ]
)


@settings(max_examples=200, deadline=None)
@given(log_strategy)
def test_resuming_from_any_id_seen_gives_every_later_frame_exactly_once(
    log: list[StoredEvent],
) -> None:
    everything = all_frames(log)
    for cut, seen_frame in enumerate(everything):
        last_id = frame_id(seen_frame)
        position = parse_position(last_id)
        assert position is not None, f"our own id {last_id!r} does not parse"
        rest = resume(log, position)
        expected = everything[cut + 1 :]
        assert everything[: cut + 1] + rest == everything, (
            f"resuming after {last_id!r}: expected {expected!r}\nsaw {rest!r}"
        )


@settings(max_examples=100, deadline=None)
@given(log_strategy)
def test_following_from_a_log_position_gives_the_frames_of_later_events(
    log: list[StoredEvent],
) -> None:
    last = log[-1].seq if log else 0
    for seq in range(last + 1):
        expected = [f for stored in log if stored.seq > seq for f in frames(stored)]
        seen = resume(log, Position(seq=seq))
        assert seen == expected, f"from {seq}: expected {expected!r}\nsaw {seen!r}"


@settings(max_examples=100, deadline=None)
@given(log_strategy)
def test_frame_ids_increase_strictly(log: list[StoredEvent]) -> None:
    ids = [frame_id(f) for f in all_frames(log)]
    keys = []
    for raw in ids:
        position = parse_position(raw)
        assert position is not None, f"our own id {raw!r} does not parse"
        # N-i comes before N: order by (seq, piece, with no piece last)
        keys.append((position.seq, 1 if position.piece is None else 0, position.piece or 0))
    assert keys == sorted(keys) and len(set(ids)) == len(ids), f"ids out of order: {ids!r}"
