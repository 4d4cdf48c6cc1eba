"""No event is larger than a JetStream message: splitting and cutting, without servers."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sizing import assemble, fit
from actors.state import Conversation, fold
from events.codec import encode
from events.vocabulary import (
    AnyEvent,
    Chunk,
    ContentBlock,
    ContentPart,
    ConversationCreated,
    Done,
    Failed,
    Started,
    ToolCall,
    ToolResult,
)

CONV, TURN, AT = "c-1", "t-1", 1_767_225_600_000_000_000


def id_maker() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"id-{next(counter)}"


def done(blocks: list[ContentBlock]) -> Done:
    return Done(
        conversation_id=CONV,
        at=AT,
        event_id="e-done",
        turn_id=TURN,
        content=blocks,
        stop_reason="stop",
        input_tokens=10,
        output_tokens=20,
    )


def test_an_event_that_fits_is_left_alone() -> None:
    event = done([ContentBlock(role="assistant", content="short")])
    assert fit([event], 4096, id_maker()) == [event]


def test_a_two_megabyte_answer_moves_into_content_parts_before_a_slim_done() -> None:
    text = "word " * 400_000  # 2 MB
    blocks = [ContentBlock(role="thinking", content="hmm " * 10), ContentBlock("assistant", text)]
    out = fit([done(blocks)], 256 * 1024, id_maker())
    *parts, end = out
    assert isinstance(end, Done) and end.content == [] and end.content_parts == len(parts)
    assert all(isinstance(p, ContentPart) for p in parts) and len(parts) >= 8
    assert assemble([p for p in parts if isinstance(p, ContentPart)]) == blocks
    assert all(len(encode(e)) <= 256 * 1024 for e in out), [len(encode(e)) for e in out]
    assert len({e.event_id for e in out}) == len(out), "every piece has its own event id"


def test_a_long_chunk_becomes_several_chunks_with_the_same_text() -> None:
    chunk = Chunk(
        conversation_id=CONV, at=AT, event_id="e-1", turn_id=TURN, kind="answer", text="é" * 100_000
    )
    out = fit([chunk], 64 * 1024, id_maker())
    assert len(out) > 1 and all(isinstance(e, Chunk) for e in out)
    assert "".join(e.text for e in out if isinstance(e, Chunk)) == chunk.text
    assert out[0].event_id == "e-1" and all(len(encode(e)) <= 64 * 1024 for e in out)


def test_huge_tool_arguments_and_results_are_cut_with_a_note() -> None:
    call = ToolCall(
        conversation_id=CONV,
        at=AT,
        event_id="e-2",
        turn_id=TURN,
        call_id="call-1",
        name="write_file",
        arguments='{"text": "' + "x" * 500_000 + '"}',
    )
    result = ToolResult(
        conversation_id=CONV,
        at=AT,
        event_id="e-3",
        turn_id=TURN,
        call_id="call-1",
        result="y" * 500_000,
    )
    out = fit([call, result], 64 * 1024, id_maker())
    assert all(len(encode(e)) <= 64 * 1024 for e in out)
    cut_call, cut_result = out
    assert isinstance(cut_call, ToolCall) and "characters cut" in cut_call.arguments
    assert isinstance(cut_result, ToolResult) and cut_result.result is not None
    assert cut_result.result.startswith("yyyy") and "characters cut" in cut_result.result


def test_a_failed_end_with_a_huge_message_still_fits() -> None:
    failed = Failed(
        conversation_id=CONV,
        at=AT,
        event_id="e-4",
        turn_id=TURN,
        code="model_error",
        message="z" * 300_000,
        content=[ContentBlock("assistant", "a" * 300_000)],
    )
    out = fit([failed], 64 * 1024, id_maker())
    assert all(len(encode(e)) <= 64 * 1024 for e in out)
    assert isinstance(out[-1], Failed) and out[-1].code == "model_error"


blocks_strategy = st.lists(
    st.builds(
        ContentBlock,
        role=st.sampled_from(["thinking", "assistant"]),
        content=st.text(min_size=1, max_size=3000),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(blocks=blocks_strategy, max_bytes=st.integers(min_value=2048, max_value=20_000))
def test_split_content_always_reassembles_and_every_event_fits(
    blocks: list[ContentBlock], max_bytes: int
) -> None:
    out = fit([done(blocks)], max_bytes, id_maker())
    assert all(len(encode(e)) <= max_bytes for e in out)
    end = out[-1]
    assert isinstance(end, Done)
    if end.content_parts:
        assert assemble([p for p in out if isinstance(p, ContentPart)]) == blocks
    else:
        assert end.content == blocks


def test_the_fold_reassembles_the_content_of_a_split_end() -> None:
    header = ConversationCreated(conversation_id=CONV, at=AT, event_id="e-0", user_id="u")
    started = Started(
        conversation_id=CONV,
        at=AT,
        event_id="e-s",
        turn_id=TURN,
        user_message_id="m-1",
        model="demo",
    )
    blocks = [ContentBlock("assistant", "long answer " * 50_000)]
    split = fit([done(blocks)], 64 * 1024, id_maker())
    assert len(split) > 2, "the answer was meant to be split"
    events: list[AnyEvent] = [header, started, *split]  # type: ignore[list-item]
    state = fold(Conversation(conversation_id=CONV), events)
    assistant = next(m for m in state.messages if m.role == "assistant")
    assert assistant.blocks == tuple(blocks) and assistant.status == "complete"
    assert state.active is None
