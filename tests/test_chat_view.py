"""What `parley chat` reads (parley/chat_wire.py) and shows (parley/chat_view.py): pure, no servers."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from parley.chat_view import (
    STOPPED,
    WAITING,
    Block,
    MessageRow,
    Op,
    Spin,
    TurnView,
    Unspin,
    Write,
    history,
    printable,
    tool_call_text,
)
from parley.chat_wire import SseDecoder, WireEvent, id_order


def frame(event_id: str | None, event: str, data: Any, **extra: Any) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return (head + "data: " + json.dumps({"event": event, "data": data, **extra}) + "\n\n").encode()


def ev(event_id: str | None, event: str, data: Any, **extra: Any) -> WireEvent:
    return WireEvent(id=event_id, event=event, data=data, **extra)


def text_of(ops: list[Op]) -> str:
    return "".join(op.text for op in ops if isinstance(op, Write))


def styled(ops: list[Op]) -> list[tuple[str, str]]:
    return [(op.text, op.style) for op in ops if isinstance(op, Write)]


def play(view: TurnView, events: list[WireEvent]) -> list[Op]:
    ops = view.begin()
    for event in events:
        ops += view.feed(event)
    return ops


STARTED = {"turn_id": "T1", "message_id": "T1", "user_message_id": "U1", "model": "demo"}

# A turn as the demo model makes it for "calculate 6*7": think, call, think, answer.
CALCULATOR_TURN = [
    ev("3", "started", STARTED, message_id="T1"),
    ev("4", "title", {"title": "calculate 6*7"}, message_id="T1"),
    ev("5", "thinking", "I will ", message_id="T1"),
    ev("6", "thinking", "call it.", message_id="T1"),
    ev(
        "7",
        "tool_call",
        {"id": "c1", "name": "calculator", "arguments": {"expression": "6*7"}},
        message_id="T1",
    ),
    ev(
        "8",
        "tool_result",
        {"id": "c1", "name": "calculator", "result": "42", "error": None, "duration_ms": 0.25},
        message_id="T1",
    ),
    ev("9", "thinking", "Pass it on.", message_id="T1"),
    ev("10", "token", "The result ", message_id="T1"),
    ev("11", "token", "is 42.", message_id="T1"),
    ev("12", "done", "ok", message_id="T1"),
]


# ---------------------------------------------------------------- the wire


def test_decoder_reads_parley_frames_comments_and_retry() -> None:
    stream = (
        b"retry: 1000\n\n"
        + frame("3", "started", STARTED, message_id="T1")
        + b": ping\n\n"
        + frame("7-0", "error", "boom", code="model_error")
        + frame(None, "done", "error")
    )
    events = SseDecoder().feed(stream)
    assert events == [
        ev("3", "started", STARTED, message_id="T1"),
        ev("7-0", "error", "boom", code="model_error"),
        ev(None, "done", "error"),
    ]


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_decoder_gives_the_same_events_however_the_bytes_are_cut(cuts: list[int]) -> None:
    stream = (
        frame("5", "thinking", "héllo wörld ✓", message_id="T1")
        + b": ping\r\n\r\n"
        + frame("6", "token", "ünïcode 🙂", message_id="T1")
        + frame("7", "done", "ok")
    )
    whole = SseDecoder().feed(stream)
    decoder = SseDecoder()
    pieces: list[WireEvent] = []
    start = 0
    for cut in sorted({min(c, len(stream)) for c in cuts}):
        pieces += decoder.feed(stream[start:cut])
        start = cut
    pieces += decoder.feed(stream[start:])
    assert pieces == whole
    assert [e.data for e in whole] == ["héllo wörld ✓", "ünïcode 🙂", "ok"]


def test_a_frame_cut_off_by_a_dropped_connection_yields_nothing() -> None:
    decoder = SseDecoder()
    assert decoder.feed(frame("5", "token", "a") + b'id: 6\ndata: {"event":"tok') == [
        ev("5", "token", "a")
    ]


def test_event_ids_order_pieces_before_their_whole_event() -> None:
    order = ["7-0", "7-1", "7", "8-0", "8", "12"]
    keys = [id_order(i) for i in order]
    assert all(k is not None for k in keys)
    assert keys == sorted(keys)  # type: ignore[type-var]
    for bad in ["", "x", "7-", "-1", "7-a", "١٢"]:
        assert id_order(bad) is None, bad


# ---------------------------------------------------------------- a turn


def test_a_whole_turn_thinking_dimmed_tools_compact_answer_streamed() -> None:
    view = TurnView()
    ops = play(view, CALCULATOR_TURN)
    assert view.outcome == "ok" and view.finished and view.last_id == "12"
    assert view.title == "calculate 6*7"
    assert text_of(ops) == (
        "── calculate 6*7 ──\n"
        "I will call it.\n"
        '⚙ calculator(expression="6*7")\n'
        "  ↳ 42 · 0.2 ms\n"
        "Pass it on.\n"
        "The result is 42.\n"
    )
    assert ("I will ", "thinking") in styled(ops)
    assert ("The result ", "answer") in styled(ops)
    assert ('⚙ calculator(expression="6*7")\n', "tool") in styled(ops)


def test_the_spinner_shows_while_waiting_and_goes_before_anything_is_written() -> None:
    view = TurnView()
    assert view.begin() == [Spin(WAITING)]
    started = view.feed(CALCULATOR_TURN[0])
    assert started == []  # still waiting: the spinner stays
    first = view.feed(ev("5", "token", "Hi", message_id="T1"))
    assert first == [Unspin(), Write("Hi", "answer")]
    call = view.feed(ev("6", "tool_call", {"id": "c", "name": "get_current_time", "arguments": {}}))
    # the call on a line of its own, then a spinner while the tool runs
    assert call == [
        Write("\n", "answer"),
        Write("⚙ get_current_time()\n", "tool"),
        Spin("running get_current_time"),
    ]


def test_ctrl_c_notice_and_a_stopped_turn() -> None:
    view = TurnView()
    ops = play(view, [CALCULATOR_TURN[0], ev("5", "token", "0 1 2 ", message_id="T1")])
    ops += view.cancelling()
    ops += view.feed(ev("6", "token", "3 ", message_id="T1"))
    ops += view.feed(ev("7", "done", "stopped", message_id="T1"))
    assert view.outcome == "stopped"
    assert text_of(ops) == (
        "0 1 2 \nstopping the answer… (Ctrl-C again quits)\n3 \n" + STOPPED + "\n"
    )
    assert not _spinning_after(ops)


def test_resuming_shows_every_token_once_even_if_the_server_repeats_some() -> None:
    tokens = [ev(str(10 + i), "token", f"{i} ", message_id="T1") for i in range(10)]
    view = TurnView()
    ops = play(view, [ev("9", "started", STARTED, message_id="T1"), *tokens[:6]])
    assert view.last_id == "15"
    ops += view.reconnecting("Connection reset by peer")
    ops += view.connected()
    # a server that resumed too early: 13..19, then the end
    for event in [*tokens[3:], ev("20", "done", "ok", message_id="T1")]:
        ops += view.feed(event)
    answer = "".join(text for text, style in styled(ops) if style == "answer")
    assert answer.split() == [str(i) for i in range(10)]
    notices = [text for text, style in styled(ops) if style == "notice"]
    assert notices == ["⟳ connection lost (Connection reset by peer); resuming\n"]


def test_the_resume_notice_is_shown_once_for_several_failed_attempts() -> None:
    view = TurnView()
    ops = play(view, [ev("5", "token", "a", message_id="T1")])
    ops += view.reconnecting("refused") + view.reconnecting("refused")
    assert text_of(ops).count("connection lost") == 1


def test_a_busy_edge_is_not_a_lost_connection() -> None:
    view = TurnView()
    ops = view.begin() + view.reconnecting("too many messages wait", busy=True)
    ops += view.reconnecting("too many messages wait", busy=True)
    assert styled(ops) == [
        ("⟳ the server cannot take this now (too many messages wait); trying again\n", "notice")
    ]
    assert ops[-1] == Spin("trying again")


def test_another_requests_refusal_on_a_resumed_stream_is_not_this_turns_end() -> None:
    view = TurnView()
    play(view, [ev("3", "started", STARTED, message_id="T1"), ev("4", "token", "a")])
    assert view.feed(ev("5-0", "error", "busy", message_id="OTHER", code="busy")) == []
    assert view.feed(ev("5", "done", "error", message_id="OTHER")) == []
    assert not view.finished
    view.feed(ev("6", "done", "ok", message_id="T1"))
    assert view.outcome == "ok"


def test_a_title_in_the_middle_of_the_answer_waits_for_its_end() -> None:
    view = TurnView(title="old")
    ops = play(
        view,
        [
            ev("3", "token", "Hello"),
            ev("4", "title", {"title": "new title"}),
            ev("5", "token", " world"),
            ev("6", "done", "ok"),
        ],
    )
    assert text_of(ops) == "Hello world\n── new title ──\n"


def test_errors_and_billing_refusals_are_shown_plainly() -> None:
    view = TurnView()
    ops = play(
        view,
        [
            ev("5", "token", "partial"),
            ev("6-0", "error", "the model failed", code="model_error"),
            ev("6", "done", "error"),
        ],
    )
    assert text_of(ops) == "partial\nerror: the model failed\n"
    assert view.outcome == "error"
    billing = TurnView()
    ops = play(
        billing,
        [ev("4-0", "billing_error", "insufficient credits"), ev("4", "done", "billing_error")],
    )
    assert styled(ops) == [("billing: insufficient credits\n", "error")]
    assert billing.outcome == "billing_error"


def test_nothing_is_drawn_after_the_end() -> None:
    view = TurnView()
    play(view, CALCULATOR_TURN)
    assert view.feed(ev("13", "token", "late")) == []
    assert view.cancelling() == [] and view.reconnecting("x") == [] and view.leave() == []


_EVENTS = st.one_of(
    st.builds(ev, st.none(), st.sampled_from(["thinking", "token"]), st.text(max_size=5)),
    st.just(ev(None, "tool_call", {"id": "c", "name": "t", "arguments": {}})),
    st.just(ev(None, "tool_result", {"id": "c", "name": "t", "result": "r"})),
    st.builds(lambda t: ev(None, "title", {"title": t}), st.text(max_size=5)),
    st.just(ev(None, "error", "e")),
    st.just(ev(None, "unknown_event", None)),
    st.sampled_from(["cancel", "lost", "back", "note"]),
)


@given(st.lists(_EVENTS, max_size=30), st.sampled_from(["ok", "stopped", "error", "quit"]))
def test_the_spinner_only_owns_empty_lines_and_is_gone_at_the_end(
    steps: list[WireEvent | str], outcome: str
) -> None:
    view = TurnView()
    ops = view.begin()
    for step in steps:
        if step == "cancel":
            ops += view.cancelling()
        elif step == "lost":
            ops += view.reconnecting("reset")
        elif step == "back":
            ops += view.connected()
        elif step == "note":
            ops += view.note("could not cancel")
        elif isinstance(step, WireEvent):
            ops += view.feed(step)
    ops += view.leave() if outcome == "quit" else view.feed(ev(None, "done", outcome))
    at_line_start, spinning = True, False
    for op in ops:
        if isinstance(op, Spin):
            assert at_line_start, ops  # a spinner on a line of text would erase it
            spinning = True
        elif isinstance(op, Unspin):
            spinning = False
        elif op.text:
            assert not spinning, ops  # text is never written under a spinner
            at_line_start = op.text.endswith("\n")
    assert not spinning and at_line_start, ops
    assert view.outcome == outcome


def _spinning_after(ops: list[Op]) -> bool:
    spinning = False
    for op in ops:
        if isinstance(op, Spin):
            spinning = True
        elif isinstance(op, Unspin):
            spinning = False
    return spinning


# ---------------------------------------------------------------- tool lines, history


def test_tool_calls_are_one_short_line() -> None:
    assert tool_call_text("calculator", {"expression": "6*7"}) == 'calculator(expression="6*7")'
    assert tool_call_text("t", {}, raw_arguments="not json") == "t(not json)"
    long = tool_call_text("t", {"q": "x" * 500})
    assert len(long) < 100 and long.endswith("…)")
    assert "\n" not in tool_call_text("t", {"q": "a\nb"})


def _row(role: str, *blocks: tuple[str, str], **fields: Any) -> MessageRow:
    return MessageRow(
        id=fields.pop("id", f"m-{role}-{len(blocks)}"),
        role=role,
        content=[Block(r, c) for r, c in blocks],
        **fields,
    )


def test_history_shows_the_recent_messages_like_the_live_turns() -> None:
    rows = [
        _row("user", ("user", "first question"), id="u1"),
        _row("assistant", ("assistant", "first answer"), id="a1"),
        _row("user", ("user", "calculate 6*7"), id="u2"),
        _row(
            "assistant",
            ("thinking", "I will call it."),
            ("thinking", "Pass it on."),
            ("assistant", "The result is 42."),
            id="a2",
            tool_calls=[
                {
                    "id": "c1",
                    "name": "calculator",
                    "arguments": {"expression": "6*7"},
                    "result": "42",
                    "error": None,
                    "duration_ms": 3,
                }
            ],
        ),
        _row("user", ("user", "[[tokens=4000]]"), id="u3"),
        _row("assistant", ("assistant", "0 1 2"), id="a3", status="cancelled"),
        _row("user", ("user", "fail please"), id="u4"),
        _row("assistant", id="a4", status="failed", error_message="the model failed"),
    ]
    ops = history("C1", rows, limit=7, title="calculate 6*7")
    assert text_of(ops) == (
        "conversation C1\n"
        "── calculate 6*7 ──\n"
        "… 1 earlier message\n"
        "first answer\n"
        "you> calculate 6*7\n"
        "I will call it.\n"
        '⚙ calculator(expression="6*7")\n'
        "  ↳ 42 · 3 ms\n"
        "Pass it on.\n"
        "The result is 42.\n"
        "you> [[tokens=4000]]\n"
        "0 1 2\n"
        f"{STOPPED}\n"
        "you> fail please\n"
        "error: the model failed\n"
    )
    assert ("I will call it.\n", "thinking") in styled(ops)


def test_history_leaves_out_the_answer_the_live_stream_will_draw() -> None:
    rows = [
        _row("user", ("user", "hi"), id="u1"),
        _row("assistant", ("assistant", "half an ans"), id="T9", status="streaming"),
    ]
    assert text_of(history("C1", rows, limit=10, title=None, skip_turn="T9")) == (
        "conversation C1\nyou> hi\n"
    )


def test_nothing_a_model_writes_can_command_the_terminal() -> None:
    said = "a\x1b]0;PWNED\x07b \x1b[2J\x1b[31mred\u009b31m\u009d52;c;eA==\x9c\x7f\x08\r\n\tend"
    shown = printable(said)
    assert all(ch in "\n\t" or (ch.isprintable() and ch != "\x7f") for ch in shown), repr(shown)
    assert shown == "a␛]0;PWNED␇b ␛[2J␛[31mred\ufffd31m\ufffd52;c;eA==\ufffd␡␈\n\tend"
    # text as it should be passes as it is: wide, right-to-left, combining, emoji
    fine = "你好 שלום e\u0301 👨\u200d👩\u200d👧 🙂\n\tx"
    assert printable(fine) == fine
