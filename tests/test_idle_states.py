"""The worker's idle states (actors/worker.py IdleStates): bounded by memory as well
as by count, without servers."""

from __future__ import annotations

import msgspec

from actors.snapshots import Folded
from actors.state import Conversation, Message, state_bytes
from actors.worker import IdleStates
from events.vocabulary import ContentBlock

MB = 1024 * 1024


def with_answer(conversation_id: str, chars: int) -> Conversation:
    """A conversation with one question and an answer of `chars` characters."""
    return Conversation(
        conversation_id=conversation_id,
        exists=True,
        messages=(
            Message(message_id="q", role="user", text="a question"),
            Message(
                message_id="a",
                role="assistant",
                blocks=(ContentBlock(role="assistant", content="x" * chars),),
            ),
        ),
    )


def test_a_states_size_is_mostly_its_text() -> None:
    small, large = with_answer("c", 10), with_answer("c", MB)
    assert state_bytes(large) - state_bytes(small) >= MB - 10
    assert state_bytes(small) < 10_000


def test_large_states_are_kept_within_the_memory_budget_newest_first() -> None:
    """Sixty conversations of a 1 MB answer each were all kept (2,000 by count alone):
    60 MB held for as long as 2,000 newer conversations had not come."""
    states = IdleStates(count=2_000, max_bytes=10 * MB)
    for i in range(60):
        states.keep(f"c{i}", Folded(with_answer(f"c{i}", MB), seq=i))
    assert states.bytes <= 10 * MB
    assert 8 <= len(states) <= 10, len(states)
    assert states.take("c0") is None  # the oldest went first
    kept = states.take("c59")
    assert kept is not None and kept.seq == 59
    assert states.take("c59") is None  # taken: no longer kept
    assert states.bytes == sum(
        state_bytes(with_answer(f"c{i}", MB)) for i in range(60 - len(states) - 1, 59)
    )


def test_a_state_larger_than_the_budget_is_not_kept_and_the_count_still_bounds() -> None:
    states = IdleStates(count=3, max_bytes=MB)
    states.keep("huge", Folded(with_answer("huge", 2 * MB), seq=1))
    assert len(states) == 0 and states.bytes == 0
    for i in range(5):
        states.keep(f"c{i}", Folded(with_answer(f"c{i}", 10), seq=i))
    assert len(states) == 3 and states.take("c1") is None and states.take("c4") is not None
    # kept again: the newer state replaces the older, counted once
    states.keep("c3", Folded(with_answer("c3", 100), seq=9))
    assert len(states) == 2
    assert states.bytes == state_bytes(with_answer("c2", 10)) + state_bytes(with_answer("c3", 100))


def test_a_state_whose_snapshot_was_not_written_is_kept_as_unsaved() -> None:
    """A worker keeps a state as saved before it writes the snapshot; a write that
    failed puts it back as it was, so the next actor of it tries again."""
    states = IdleStates(count=10, max_bytes=MB)
    before = Folded(with_answer("c", 10), seq=9, entries=3_000, saved=0, event_id="e")
    states.keep("c", msgspec.structs.replace(before, saved=3_000))
    states.unsaved("c", before)
    kept = states.take("c")
    assert kept is not None and kept.saved == 0
    # no longer the one kept (a new actor took it and left a newer state): untouched
    newer = Folded(with_answer("c", 10), seq=12, entries=3_010, saved=3_000, event_id="f")
    states.keep("c", newer)
    states.unsaved("c", before)
    assert states.take("c") == newer
