"""The conversation's pure core: decisions from commands, state folded from events.

States are built the way an actor builds them, by folding events; the clock and
the id maker are injected (a fixed `NOW` and a counter), so every expected
event is written out in full. Also the pure model-catalogue rule that picks the
price in force. No server and no I/O.
"""

from __future__ import annotations

import datetime as dt
import typing
from collections.abc import Iterable, Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.content import build_history, merge_blocks
from actors.decide import (
    ModelChoice,
    Rejected,
    TurnTotals,
    decide_billing_rejected,
    decide_cancelled,
    decide_delete,
    decide_done,
    decide_failed,
    decide_queue_refused,
    decide_rejection,
    decide_rename,
    decide_request,
    decide_start,
    decide_title,
    decide_tool_call,
    decide_tool_result,
    estimated_totals,
    next_turn,
)
from actors.model_stream import ToolCallRequest
from actors.models import ModelSpec, ModelVersion, active_version, choose_model
from actors.state import (
    Conversation,
    evolve,
    fold,
    history_of,
    latest_messages,
    messages_for_tools,
    partial_content,
)
from actors.tools import ToolOutcome
from events.vocabulary import (
    AnswerRequested,
    AnyEvent,
    BillingRejected,
    Cancelled,
    Chunk,
    ChunkKind,
    CommandRejected,
    ContentBlock,
    ConversationCreated,
    ConversationDeleted,
    DeleteConversation,
    Done,
    EditMessage,
    Event,
    Failed,
    OnBusy,
    Prices,
    Regenerate,
    RenameConversation,
    SendMessage,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
)

CONV = "conv-1"
USER = "user-1"
NOW = 1_767_225_600_000_000_000
MODEL = ModelChoice(
    name="demo",
    version_id="demo@2026-01",
    prices=Prices(input_price=3.0, output_price=15.0),
    max_tokens=4096,
    temperature=0.7,
)


class Ids:
    """A deterministic `new_id`: id-1, id-2, ..."""

    def __init__(self, prefix: str = "id") -> None:
        self.prefix = prefix
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count}"


def as_any(events: Iterable[Event]) -> list[AnyEvent]:
    """Narrow decided events to the union `evolve` takes (every Event subclass is in it)."""
    members = typing.get_args(AnyEvent)
    out: list[AnyEvent] = []
    for event in events:
        assert isinstance(event, members), f"{type(event).__name__} is not in AnyEvent"
        out.append(event)
    return out


def created(*, title: str = "", project_id: str | None = "proj-1") -> ConversationCreated:
    return ConversationCreated(
        conversation_id=CONV,
        at=NOW - 1,
        event_id="evt-created",
        user_id=USER,
        project_id=project_id,
        title=title,
        model="demo",
    )


def send(content: str, n: int = 1) -> SendMessage:
    return SendMessage(
        conversation_id=CONV,
        command_id=f"cmd-{n}",
        user_id=USER,
        at=NOW,
        message_id=f"msg-{n}",
        content=content,
    )


def empty() -> Conversation:
    return Conversation(conversation_id=CONV)


def decide_send(
    state: Conversation, cmd: SendMessage, model: ModelChoice, now: int, ids: Ids
) -> list[Event] | Rejected:
    """What an idle actor appends for a message: its acceptance, then its turn's start."""
    accepted = decide_request(state, cmd, now, ids)
    if isinstance(accepted, Rejected) or not accepted:
        return accepted
    folded = fold(state, as_any(accepted))
    queued = next_turn(folded)
    assert queued is not None, f"expected {cmd!r} at the head of the queue, saw {folded!r}"
    return [*accepted, *decide_start(folded, queued, model, now, ids)]


def decided(state: Conversation, cmd: SendMessage, ids: Ids) -> list[AnyEvent]:
    result = decide_send(state, cmd, MODEL, NOW, ids)
    assert not isinstance(result, Rejected), f"expected events for {cmd!r}, saw {result!r}"
    return as_any(result)


def chunk(turn_id: str, kind: ChunkKind, text: str, n: int = 0) -> Chunk:
    return Chunk(
        conversation_id=CONV, at=NOW, event_id=f"chunk-{n}", turn_id=turn_id, kind=kind, text=text
    )


def tool_call(turn_id: str, call_id: str) -> ToolCall:
    return ToolCall(
        conversation_id=CONV,
        at=NOW,
        event_id=f"call-{call_id}",
        turn_id=turn_id,
        call_id=call_id,
        name="get_weather",
        arguments='{"city": "Oslo"}',
    )


def tool_result(turn_id: str, call_id: str) -> ToolResult:
    return ToolResult(
        conversation_id=CONV,
        at=NOW,
        event_id=f"result-{call_id}",
        turn_id=turn_id,
        call_id=call_id,
        name="get_weather",
        result='{"temp_c": 4}',
        duration_ms=12.0,
    )


def started_turn(
    content: str = "How do I rotate the API keys?", *, title: str = ""
) -> tuple[Conversation, str]:
    """A conversation with one user message and its turn running; returns the turn id."""
    state = fold(empty(), [created(title=title)])
    state = fold(state, decided(state, send(content), Ids("t")))
    assert state.active is not None, f"expected an active turn, saw {state!r}"
    return state, state.active.turn_id


def finished(state: Conversation, input_tokens: int = 10, output_tokens: int = 5) -> Conversation:
    done = decide_done(state, "stop", TurnTotals(input_tokens, output_tokens), NOW, Ids("done"))
    return evolve(state, done)


# ---------------------------------------------------------------- decide_send


def test_a_message_opens_a_turn_user_message_then_started_then_title() -> None:
    state = fold(empty(), [created()])
    ids = Ids()
    result = decide_send(state, send("How do I rotate the API keys?"), MODEL, NOW, ids)
    expected = [
        UserMessage(
            conversation_id=CONV,
            at=NOW,
            event_id="id-1",
            message_id="msg-1",
            content="How do I rotate the API keys?",
            user_id=USER,
            parent_message_id=None,
            version_group_id="msg-1",
            version_number=1,
            command_id="cmd-1",
        ),
        Started(
            conversation_id=CONV,
            at=NOW,
            event_id="id-3",
            turn_id="id-2",
            user_message_id="msg-1",
            model="demo",
            model_version_id="demo@2026-01",
            prices=Prices(input_price=3.0, output_price=15.0),
            max_tokens=4096,
            temperature=0.7,
            parent_message_id="msg-1",
            version_group_id="id-2",
            version_number=1,
            command_id="cmd-1",
            user_id=USER,
        ),
        Title(
            conversation_id=CONV,
            at=NOW,
            event_id="id-4",
            title="How rotate the API keys?",
            source="auto",
            turn_id="id-2",
        ),
    ]
    assert result == expected, f"expected {expected!r}\nsaw      {result!r}"
    assert ids.count == 4, f"expected 4 ids drawn, saw {ids.count}"


def test_the_next_user_message_follows_the_previous_answer() -> None:
    state, first_turn = started_turn()
    state = finished(state)
    events = decided(state, send("And for production?", n=2), Ids("second"))
    user, started = events[0], events[1]
    assert isinstance(user, UserMessage) and isinstance(started, Started), f"saw {events!r}"
    assert user.parent_message_id == first_turn, (
        f"expected the new message to follow answer {first_turn!r}, saw {user.parent_message_id!r}"
    )
    assert started.parent_message_id == "msg-2", f"saw {started.parent_message_id!r}"
    assert started.user_message_id == "msg-2", f"saw {started.user_message_id!r}"
    state = fold(state, events)
    order = [(m.role, m.message_id, m.parent_message_id) for m in state.messages]
    expected = [
        ("user", "msg-1", None),
        ("assistant", first_turn, "msg-1"),
        ("user", "msg-2", first_turn),
        ("assistant", started.turn_id, "msg-2"),
    ]
    assert order == expected, f"expected the chain {expected!r}, saw {order!r}"


def test_a_redelivered_command_decides_nothing() -> None:
    state, _ = started_turn()
    # while its turn still runs: a redelivery, not a busy conversation
    assert decide_send(state, send("How do I rotate the API keys?"), MODEL, NOW, Ids()) == []
    state = finished(state)
    ids = Ids()
    again = decide_send(state, send("How do I rotate the API keys?"), MODEL, NOW, ids)
    assert again == [], f"expected no events for a command already in the log, saw {again!r}"
    assert ids.count == 0, f"expected no ids drawn, saw {ids.count}"


def test_a_message_to_a_missing_conversation_is_rejected_as_not_found() -> None:
    result = decide_send(empty(), send("hello there"), MODEL, NOW, Ids())
    assert isinstance(result, Rejected), f"expected Rejected, saw {result!r}"
    assert result.code == "not_found", f"expected not_found, saw {result.code!r}"


def test_a_message_while_a_turn_runs_is_rejected_as_busy() -> None:
    state, turn_id = started_turn()
    result = decide_send(state, send("another question", n=2), MODEL, NOW, Ids())
    assert isinstance(result, Rejected), f"expected Rejected, saw {result!r}"
    assert result.code == "busy", f"expected busy, saw {result.code!r}"
    assert turn_id in result.message, f"expected the running turn named in {result.message!r}"


def keyed(cmd: SendMessage | Regenerate, key: str, ttl_s: int = 3600) -> typing.Any:
    """The command with an idempotency key, sent with `on_busy: enqueue`."""
    return msgspec.structs.replace(cmd, request_key=key, request_key_ttl_s=ttl_s, on_busy="enqueue")


def test_a_keyed_request_sent_again_is_answered_with_the_first_while_its_key_lasts() -> None:
    """The edge's record of an idempotency key can be lost with Redis; the log keeps
    the key's hash with the request, so a retry is the same request, not a second
    turn, while the key lasts, running or not; another request, or the same one
    after the key's time, is a new one."""
    state, turn_id = started_turn()
    accepted = decide_request(state, keyed(send("a question", n=2), "k-1"), NOW, Ids("a"))
    assert isinstance(accepted, list), accepted
    state = fold(state, accepted)
    repeat = decide_request(state, keyed(send("a question", n=3), "k-1"), NOW + 5, Ids())
    assert repeat == Rejected(
        "repeated",
        "the request with this idempotency key was accepted already (command cmd-2)",
        repeats="cmd-2",
        message_id="msg-2",
    ), repeat
    event = decide_rejection(state, send("a question", n=3), repeat, NOW, Ids())
    assert (event.command_id, event.message_id, event.repeats) == ("cmd-3", "msg-2", "cmd-2")
    # not busy: a repeat is answered with the earlier request whatever runs
    assert state.active is not None and state.active.turn_id == turn_id
    later = NOW + 3600 * 1_000_000_000
    anew = decide_request(state, keyed(send("a question", n=4), "k-1"), later, Ids())
    assert isinstance(anew, list) and isinstance(anew[0], UserMessage), anew
    assert (anew[0].message_id, anew[0].request_key) == ("msg-4", "k-1")
    other = decide_request(state, keyed(send("another", n=5), "k-2"), NOW + 5, Ids())
    assert isinstance(other, list) and isinstance(other[0], UserMessage), other


def test_a_keyed_regeneration_sent_again_names_the_first_and_no_message() -> None:
    state, turn_id = started_turn()
    state = finished(state)
    regenerate = Regenerate(
        conversation_id=CONV, command_id="cmd-r1", user_id=USER, at=NOW, message_id=turn_id
    )
    accepted = decide_request(state, keyed(regenerate, "k-r"), NOW, Ids("r"))
    assert isinstance(accepted, list) and isinstance(accepted[0], AnswerRequested), accepted
    state = fold(state, accepted)
    again = msgspec.structs.replace(regenerate, command_id="cmd-r2")
    repeat = decide_request(state, keyed(again, "k-r"), NOW + 1, Ids())
    assert isinstance(repeat, Rejected), repeat
    assert (repeat.code, repeat.repeats, repeat.message_id) == ("repeated", "cmd-r1", "")


# ---------------------------------------------------------------- decide_title


def test_an_untitled_conversation_is_titled_from_its_first_user_message() -> None:
    state, _ = started_turn("Explain event sourcing with small examples please")
    state = finished(state)
    # the user cleared the title: the next turn titles it again, from the first message
    state = evolve(
        state,
        Title(conversation_id=CONV, at=NOW, event_id="evt-clear", title="New Chat", source="user"),
    )
    title = decide_title(state, "completely different second question", "turn-2", NOW, Ids())
    expected = Title(
        conversation_id=CONV,
        at=NOW,
        event_id="id-1",
        title="Explain event sourcing with small",
        source="auto",
        turn_id="turn-2",
    )
    assert title == expected, f"expected {expected!r}, saw {title!r}"


def rename(title: str, n: int = 1) -> RenameConversation:
    return RenameConversation(
        conversation_id=CONV, command_id=f"rename-{n}", user_id=USER, at=NOW, title=title
    )


def test_a_rename_is_a_user_title_that_later_turns_announce_and_keep() -> None:
    state = fold(empty(), [created()])
    (named,) = decide_rename(state, rename("Roadmap"), NOW, Ids())
    assert named == Title(
        conversation_id=CONV,
        at=NOW,
        event_id="id-1",
        title="Roadmap",
        source="user",
        command_id="rename-1",
    )
    state = evolve(state, named)
    # the first message does not replace it: the turn announces it as the title in force
    title = decide_title(state, "Plan the quarterly roadmap review", "turn-1", NOW, Ids())
    assert (title.title, title.source) == ("Roadmap", "existing"), title


def test_a_rename_to_the_name_in_force_or_of_no_conversation_decides_nothing() -> None:
    """The same command delivered again (its title landed, its ack did not) adds no
    second event; a conversation that does not exist is not named."""
    state = fold(empty(), [created(title="Roadmap")])
    assert decide_rename(state, rename("Roadmap"), NOW, Ids()) == []
    assert decide_rename(empty(), rename("Roadmap"), NOW, Ids()) == []


def test_a_rename_delivered_again_after_a_later_one_does_not_bring_its_name_back() -> None:
    """Rename 1 landed but its acknowledgement was lost; rename 2 landed; JetStream
    then delivers rename 1 again. Exactly once in effect: the name stays rename 2's."""
    state = fold(empty(), [created()])
    for n, title in ((1, "Roadmap"), (2, "Q3 plan")):
        state = fold(state, decide_rename(state, rename(title, n), NOW, Ids()))
    assert state.title == "Q3 plan"
    assert decide_rename(state, rename("Roadmap", 1), NOW, Ids()) == []
    # a new rename to the old name is a new command, and lands
    (again,) = decide_rename(state, rename("Roadmap", 3), NOW, Ids())
    assert isinstance(again, Title) and again.title == "Roadmap"


@pytest.mark.parametrize("untitled", ["", "New Chat", "   ", "\t\n"])
def test_the_first_message_titles_a_new_conversation(untitled: str) -> None:
    state = fold(empty(), [created(title=untitled)])
    title = decide_title(state, "Plan the quarterly roadmap review", "turn-1", NOW, Ids())
    assert (title.title, title.source) == ("Plan the quarterly roadmap review", "auto"), (
        f"saw {title!r}"
    )


def test_a_titled_conversation_announces_its_existing_title() -> None:
    state, _ = started_turn("Explain event sourcing", title="Ops runbook")
    title = decide_title(state, "Explain event sourcing", "turn-2", NOW, Ids())
    assert (title.title, title.source, title.turn_id) == ("Ops runbook", "existing", "turn-2"), (
        f"saw {title!r}"
    )


def test_a_title_entry_parley_did_not_write_is_announced_storable_and_cut() -> None:
    """A damaged or forged `title` entry (NUL, a lone surrogate, 900 KB) was copied as
    it was into the title every later turn announces."""
    state, _ = started_turn("Explain event sourcing", title="Ops")
    forged = "bad\x00ti\ud800tle " + "x" * 900_000
    state = evolve(
        state, Title(conversation_id=CONV, at=NOW, event_id="e-forged", title=forged, source="user")
    )
    title = decide_title(state, "Explain event sourcing", "turn-2", NOW, Ids())
    assert title.source == "existing" and len(title.title) == 200, len(title.title)
    assert title.title.startswith("bad\ufffdti\ufffdtle xxx"), title.title[:20]


def test_a_first_message_of_short_words_leaves_the_title_as_it_is() -> None:
    state = fold(empty(), [created(title="New Chat")])
    title = decide_title(state, "hi, is it ok", "turn-1", NOW, Ids())
    # "hi," is three characters: a word long enough to title with
    assert (title.title, title.source) == ("hi,", "auto"), f"saw {title!r}"
    title = decide_title(state, "hi is it ok", "turn-1", NOW, Ids())
    assert (title.title, title.source) == ("New Chat", "existing"), f"saw {title!r}"


def test_the_title_event_renames_the_conversation() -> None:
    state, _ = started_turn("Plan the quarterly roadmap review")
    assert state.title == "Plan the quarterly roadmap review", f"saw {state.title!r}"


# ---------------------------------------------------------------- evolve over a turn


def test_a_turn_with_tool_calls_is_stored_as_merged_blocks() -> None:
    state, turn = started_turn()
    events: list[AnyEvent] = [
        chunk(turn, "thinking", "I should ", 1),
        chunk(turn, "thinking", "check the docs ", 2),
        tool_call(turn, "c1"),
        tool_result(turn, "c1"),
        chunk(turn, "thinking", " Found it.", 3),
        chunk(turn, "answer", "Open ", 4),
        chunk(turn, "answer", "Settings.", 5),
        tool_call(turn, "c2"),
        tool_result(turn, "c2"),
        chunk(turn, "answer", "Then rotate.", 6),
        chunk("another-turn", "answer", "ignored: not this turn", 7),
    ]
    state = fold(state, events)
    expected = [
        ContentBlock(role="thinking", content="I should check the docs"),
        ContentBlock(role="thinking", content="Found it."),
        ContentBlock(role="assistant", content="Open Settings."),
        ContentBlock(role="assistant", content="Then rotate."),
    ]
    seen = partial_content(state)
    assert seen == expected, f"expected {expected!r}\nsaw      {seen!r}"
    assert state.active is not None and state.active.tool_calls == 2, f"saw {state.active!r}"

    done = decide_done(state, "stop", TurnTotals(812, 64), NOW + 5, Ids("d"))
    assert done == Done(
        conversation_id=CONV,
        at=NOW + 5,
        event_id="d-1",
        turn_id=turn,
        content=expected,
        stop_reason="stop",
        input_tokens=812,
        output_tokens=64,
        idle=True,  # nothing waits behind it
    ), f"saw {done!r}"

    state = evolve(state, done)
    assert state.active is None, f"expected the turn to end, saw {state.active!r}"
    assert state.token_usage_total == 876, f"expected 812 + 64, saw {state.token_usage_total}"
    answer = next(m for m in state.messages if m.message_id == turn)
    assert (answer.status, list(answer.blocks)) == ("complete", expected), f"saw {answer!r}"
    assert partial_content(state) == [], "no active turn: no partial content"


def test_a_tool_reads_an_answer_as_the_model_was_shown_it_without_its_thinking() -> None:
    state, turn = started_turn("Where are the keys?")
    state = fold(
        state,
        [
            chunk(turn, "thinking", "the user's PIN is 4471", 1),
            chunk(turn, "answer", "In Settings.", 2),
        ],
    )
    # the answer being written is not a message a tool can read yet
    assert [m.text for m in messages_for_tools(state)] == ["Where are the keys?"]
    state = evolve(state, decide_done(state, "stop", TurnTotals(1, 1), NOW, Ids("d")))
    read = [(m.message_id, m.role, m.text) for m in messages_for_tools(state)]
    assert read == [("msg-1", "user", "Where are the keys?"), (turn, "assistant", "In Settings.")]


def test_a_failed_turn_keeps_its_partial_content_and_counts_its_tokens() -> None:
    state, turn = started_turn()
    state = finished(state, 100, 20)  # a first turn: 120 tokens
    state = fold(state, decided(state, send("and then?", n=2), Ids("t2")))
    assert state.active is not None
    turn2 = state.active.turn_id
    state = fold(state, [chunk(turn2, "answer", "Partial ", 1), chunk(turn2, "answer", "ans", 2)])
    failed = decide_failed(state, "model_error", "HTTP 502", TurnTotals(300, 2, True), NOW, Ids())
    assert failed.content == [ContentBlock(role="assistant", content="Partial ans")], (
        f"saw {failed.content!r}"
    )
    assert (failed.code, failed.tokens_estimated) == ("model_error", True), f"saw {failed!r}"
    state = evolve(state, failed)
    assert state.active is None, f"expected the turn to end, saw {state.active!r}"
    assert state.token_usage_total == 120 + 302, f"saw {state.token_usage_total}"
    statuses = {m.message_id: m.status for m in state.messages if m.role == "assistant"}
    assert statuses == {turn: "complete", turn2: "failed"}, f"saw {statuses!r}"


def test_a_cancelled_turn_ends_and_counts_its_tokens() -> None:
    state, turn = started_turn()
    content = [ContentBlock(role="assistant", content="Sure, first")]
    state = evolve(
        state,
        Cancelled(
            conversation_id=CONV,
            at=NOW,
            event_id="cancel-1",
            turn_id=turn,
            content=content,
            input_tokens=40,
            output_tokens=3,
        ),
    )
    assert state.active is None, f"saw {state.active!r}"
    assert state.token_usage_total == 43, f"saw {state.token_usage_total}"
    answer = next(m for m in state.messages if m.message_id == turn)
    assert (answer.status, list(answer.blocks)) == ("cancelled", content), f"saw {answer!r}"


def test_a_billing_rejection_ends_the_turn_without_tokens() -> None:
    state, turn = started_turn()
    state = evolve(
        state,
        BillingRejected(
            conversation_id=CONV,
            at=NOW,
            event_id="billing-1",
            turn_id=turn,
            user_message_id="msg-1",
            account="project:proj-1",
            needed=5250,
            available=0,
        ),
    )
    assert state.active is None, f"saw {state.active!r}"
    assert state.token_usage_total == 0, f"saw {state.token_usage_total}"
    answer = next(m for m in state.messages if m.message_id == turn)
    assert answer.status == "billing_error", f"saw {answer!r}"


def test_chunks_without_an_active_turn_change_nothing() -> None:
    state, turn = started_turn()
    state = finished(state)
    after = fold(state, [chunk(turn, "answer", "late"), tool_call(turn, "late")])
    assert after == state, f"expected no change, saw {after!r}"


def test_done_without_a_turn_is_a_programming_error() -> None:
    state = fold(empty(), [created()])
    with pytest.raises(ValueError, match="no active turn"):
        decide_done(state, "stop", TurnTotals(), NOW, Ids())


# ---------------------------------------------------------------- message versions


def user_version(message_id: str, group: str, number: int, content: str) -> UserMessage:
    return UserMessage(
        conversation_id=CONV,
        at=NOW,
        event_id=f"evt-{message_id}",
        message_id=message_id,
        content=content,
        version_group_id=group,
        version_number=number,
    )


def test_a_new_version_of_a_user_message_replaces_the_old_one_as_latest() -> None:
    state = fold(
        empty(),
        [
            created(),
            user_version("m1", "m1", 1, "first draft"),
            user_version("m2", "m2", 1, "another message"),
            user_version("m1b", "m1", 2, "edited draft"),
        ],
    )
    latest = {m.message_id: m.is_latest for m in state.messages}
    assert latest == {"m1": False, "m2": True, "m1b": True}, f"saw {latest!r}"
    seen = [m.message_id for m in latest_messages(state)]
    assert seen == ["m2", "m1b"], f"expected latest versions in creation order, saw {seen!r}"
    history = [(h.role, h.blocks) for h in history_of(state)]
    expected = [("user", ("another message",)), ("user", ("edited draft",))]
    assert history == expected, f"expected {expected!r}, saw {history!r}"


def test_a_message_without_a_version_group_is_its_own_group() -> None:
    state = fold(
        empty(), [created(), user_version("m1", "", 1, "a"), user_version("m2", "", 1, "b")]
    )
    groups = [(m.version_group_id, m.is_latest) for m in state.messages]
    assert groups == [("m1", True), ("m2", True)], f"saw {groups!r}"


def test_a_regenerated_answer_replaces_the_old_answer_as_latest() -> None:
    state, turn = started_turn()
    state = finished(state)
    regenerated = Started(
        conversation_id=CONV,
        at=NOW,
        event_id="evt-regen",
        turn_id="turn-2",
        user_message_id="msg-1",
        model="demo",
        parent_message_id="msg-1",
        version_group_id=turn,
        version_number=2,
    )
    state = evolve(state, regenerated)
    assert state.active is not None and state.active.turn_id == "turn-2", f"saw {state.active!r}"
    latest = [(m.message_id, m.version_number) for m in latest_messages(state)]
    assert latest == [("msg-1", 1), ("turn-2", 2)], f"saw {latest!r}"
    # the answer being written is not history yet
    history = [h.role for h in history_of(state)]
    assert history == ["user"], f"saw {history!r}"


def edited(state: Conversation, edits: str, n: int, on_busy: OnBusy = "reject") -> Conversation:
    cmd = EditMessage(
        conversation_id=CONV,
        command_id=f"cmd-{n}",
        user_id=USER,
        at=NOW,
        message_id=f"msg-{n}",
        edits=edits,
        content=f"edit {n}",
        on_busy=on_busy,
    )
    accepted = decide_request(state, cmd, NOW, Ids(f"e{n}"))
    assert isinstance(accepted, list) and accepted, f"expected the edit accepted, saw {accepted!r}"
    return fold(state, as_any(accepted))


def test_an_edit_of_a_message_on_a_branch_no_longer_in_force_is_refused() -> None:
    # msg-1 -> answer -> msg-2 -> answer; then msg-1 is edited: msg-2 leaves the branch
    state, _ = started_turn()
    state = finished(state)
    state = fold(state, decided(state, send("second question", 2), Ids("t2")))
    state = finished(state)
    state = edited(state, "msg-1", 3)
    cmd = EditMessage(
        conversation_id=CONV,
        command_id="cmd-4",
        user_id=USER,
        at=NOW,
        message_id="msg-4",
        edits="msg-2",
        content="an edit of a message nobody sees any more",
        on_busy="enqueue",
    )
    outcome = decide_request(state, cmd, NOW, Ids())
    assert isinstance(outcome, Rejected) and outcome.code == "superseded", f"saw {outcome!r}"


def test_an_untitled_conversation_is_titled_from_its_first_message_as_edited() -> None:
    state, _ = started_turn("yo")  # no word long enough: the conversation stays untitled
    state = finished(state)
    assert state.title == "", f"saw {state.title!r}"
    state = edited(state, "msg-1", 2)
    title = decide_title(state, "edit 2", "turn-2", NOW, Ids())
    # the first message in force is the edit ("edit 2"), not the "yo" it replaced
    assert (title.title, title.source) == ("edit", "auto"), f"saw {title!r}"


def test_a_refusal_records_whether_a_turn_ran_or_waited_when_it_was_made() -> None:
    missing = Regenerate(
        conversation_id=CONV,
        command_id="cmd-9",
        user_id=USER,
        at=NOW,
        message_id="nope",
        on_busy="enqueue",
    )
    running, _ = started_turn()
    for state, idle in ((running, False), (finished(running), True)):
        why = decide_request(state, missing, NOW, Ids())
        assert isinstance(why, Rejected) and why.code == "not_found", f"saw {why!r}"
        refusal = decide_rejection(state, missing, why, NOW, Ids())
        assert refusal.idle is idle, f"saw {refusal!r}"


def test_regenerating_an_answer_on_a_branch_no_longer_in_force_is_refused() -> None:
    state, turn = started_turn()
    state = finished(state)
    state = edited(state, "msg-1", 2)
    cmd = Regenerate(
        conversation_id=CONV,
        command_id="cmd-3",
        user_id=USER,
        at=NOW,
        message_id=turn,
        on_busy="enqueue",
    )
    outcome = decide_request(state, cmd, NOW, Ids())
    assert isinstance(outcome, Rejected) and outcome.code == "superseded", f"saw {outcome!r}"


def test_a_regenerate_that_names_no_answer_regenerates_the_latest_one() -> None:
    state, first = started_turn()
    state = finished(state)
    state = fold(state, decided(state, send("second question", 2), Ids("t2")))
    state = finished(state)
    latest = [m.message_id for m in latest_messages(state) if m.role == "assistant"][-1]
    assert latest != first
    cmd = Regenerate(conversation_id=CONV, command_id="cmd-3", user_id=USER, at=NOW, message_id="")
    outcome = decide_request(state, cmd, NOW, Ids())
    assert isinstance(outcome, list) and len(outcome) == 1, f"saw {outcome!r}"
    (requested,) = outcome
    assert isinstance(requested, AnswerRequested) and requested.regenerates == latest
    assert requested.user_message_id == "msg-2"
    # a conversation with no answer yet has none to regenerate
    nothing = decide_request(fold(empty(), [created()]), cmd, NOW, Ids())
    assert isinstance(nothing, Rejected) and nothing.code == "not_found", f"saw {nothing!r}"


def queue(state: Conversation, content: str, n: int, on_busy: OnBusy = "enqueue") -> Conversation:
    cmd = msgspec.structs.replace(send(content, n), on_busy=on_busy)
    accepted = decide_request(state, cmd, NOW, Ids(f"q{n}"))
    assert isinstance(accepted, list) and accepted, f"saw {accepted!r}"
    return fold(state, as_any(accepted))


def start_next(state: Conversation, n: int) -> Conversation:
    queued = next_turn(state)
    assert queued is not None
    return fold(state, as_any(decide_start(state, queued, MODEL, NOW, Ids(f"s{n}"))))


def said(state: Conversation, text: str) -> Conversation:
    assert state.active is not None
    return evolve(state, chunk(state.active.turn_id, "answer", text))


def spoken(state: Conversation) -> list[tuple[str, str]]:
    """The history of the running turn: (role, text) as the model gets it."""
    assert state.active is not None
    sent = build_history(history_of(state, upto=state.active.user_message_id), personal=False)
    return [(m["role"], m["content"]) for m in sent]


def test_a_queued_turn_sees_the_answer_to_the_message_queued_before_it() -> None:
    """Messages queued behind a running turn are made as they are accepted, their
    answers as their turns start: each turn reads the answers before it, in order."""
    state, _ = started_turn("X")
    state = queue(state, "Y1", 2)
    state = queue(state, "Y2", 3)
    state = finished(said(state, "to X"))
    state = start_next(state, 2)
    assert spoken(state) == [("user", "X"), ("assistant", "to X"), ("user", "Y1")]
    state = finished(said(state, "to Y1"))
    state = start_next(state, 3)
    assert spoken(state) == [
        ("user", "X"),
        ("assistant", "to X"),
        ("user", "Y1"),
        ("assistant", "to Y1"),
        ("user", "Y2"),
    ]


def test_a_turns_end_says_whether_another_turn_waits_behind_it() -> None:
    """Read by every edge from the log, the same for all: a viewer of the whole
    conversation goes on into the next turn or ends its stream."""
    totals = TurnTotals(1, 1)

    def ends(state: Conversation) -> list[Done | Cancelled | Failed | BillingRejected]:
        return [
            decide_done(state, "stop", totals, NOW, Ids("d")),
            decide_cancelled(state, "user", totals, NOW, Ids("c")),
            decide_failed(state, "model_error", "boom", totals, NOW, Ids("f")),
            decide_billing_rejected(state, "project:p", 10, 0, NOW, Ids("b")),
        ]

    state, _ = started_turn("A")
    assert [end.idle for end in ends(state)] == [True] * 4
    assert [end.idle for end in ends(queue(state, "waiting", 2))] == [False] * 4


def test_an_interrupt_reads_what_was_answered_not_the_messages_still_waiting() -> None:
    state, _ = started_turn("A")
    state = queue(state, "waiting", 2)
    state = queue(state, "now", 3, on_busy="interrupt")
    state = said(state, "half an answer")
    state = evolve(state, decide_cancelled(state, "superseded", TurnTotals(1, 1), NOW, Ids("c")))
    state = start_next(state, 3)  # the interrupt goes first
    assert spoken(state) == [("user", "A"), ("assistant", "half an answer"), ("user", "now")]
    state = finished(said(state, "to now"))
    state = start_next(state, 2)  # then the one that waited, after the interrupt's answer
    assert spoken(state)[-3:] == [("user", "now"), ("assistant", "to now"), ("user", "waiting")]


def test_a_dead_workers_turn_is_estimated_on_what_it_sent_as_a_live_turn_counts_it() -> None:
    """The same history, system prompt included (a personal conversation's comes first),
    at 4 characters a token: a turn does not cost less for having lost its worker."""
    state = fold(empty(), [created(project_id=None)])
    state = fold(state, decided(state, send("a question of some forty characters, no?"), Ids("t")))
    state = finished(state)
    state = fold(state, decided(state, send("and a second one", 2), Ids("t2")))
    assert state.active is not None and state.personal
    sent = build_history(history_of(state, upto=state.active.user_message_id), personal=True)
    assert sent[0]["role"] == "system"
    chars = sum(len(m["content"]) for m in sent)
    assert estimated_totals(state).input_tokens == -(-chars // 4)


def tool_round(
    state: Conversation, calls: list[tuple[str, str]], results: list[str]
) -> Conversation:
    """One model answer asking for `calls` (name, arguments), then their results."""
    requests = [ToolCallRequest(f"call-{i}", name, args) for i, (name, args) in enumerate(calls)]
    for request in requests:
        state = evolve(state, decide_tool_call(state, request, NOW, Ids("tc")))
    for request, result in zip(requests, results, strict=True):
        outcome = ToolOutcome(result=result)
        state = evolve(state, decide_tool_result(state, request, outcome, 1.0, NOW, Ids("tr")))
    return state


def test_a_dead_workers_tool_rounds_are_estimated_call_by_call() -> None:
    """Every round's call sent the whole history again, with the earlier rounds' calls
    and results: a worker that died after seven rounds was billed one call's input."""
    state, _ = started_turn("what time is it, twice?")
    assert state.active is not None
    history = build_history(history_of(state, upto=state.active.user_message_id), personal=False)
    base = sum(len(m["content"]) for m in history)
    state = said(state, "let me look")
    first = [("clock", "{}"), ("clock", '{"tz":"UTC"}')]  # two calls in one answer
    state = tool_round(state, first, ["12:00", "12:00 UTC"])
    second = [("calculator", '{"expression":"1+1"}')]
    state = tool_round(state, second, ["2"])
    round_1 = sum(len(n) + len(a) for n, a in first) + len("12:00") + len("12:00 UTC")
    round_2 = len("calculator") + len('{"expression":"1+1"}') + len("2")
    calls_written = sum(len(n) + len(a) for n, a in [*first, *second])

    # it died running the second round's tools: two calls answered
    assert estimated_totals(state).input_tokens == -(-(base + (base + round_1)) // 4)
    # it died while the third call wrote: three calls
    state = said(state, "it is noon")
    totals = estimated_totals(state)
    assert totals.input_tokens == -(-(3 * base + round_1 + (round_1 + round_2)) // 4)
    written = len("let me look") + len("it is noon") + calls_written
    assert totals.output_tokens == -(-written // 4) and totals.estimated


def test_an_edit_of_an_older_version_grows_from_the_version_in_force() -> None:
    state, _ = started_turn()
    state = finished(state)
    state = edited(state, "msg-1", 2)  # msg-2 is version 2 of msg-1
    state = edited(state, "msg-1", 3, on_busy="enqueue")  # editing version 1 again
    third = next(m for m in state.messages if m.message_id == "msg-3")
    assert (third.version_number, third.parent_message_id, third.is_latest) == (3, None, True)
    in_force = [m.message_id for m in latest_messages(state) if m.version_group_id == "msg-1"]
    assert in_force == ["msg-3"], f"saw {in_force!r}"


def test_a_queued_message_whose_branch_was_edited_away_is_refused_when_its_turn_comes() -> None:
    state, _ = started_turn()  # msg-1 is being answered
    queued = SendMessage(
        conversation_id=CONV,
        command_id="cmd-2",
        user_id=USER,
        at=NOW,
        message_id="msg-2",
        content="queued behind the running turn",
        on_busy="enqueue",
    )
    accepted = decide_request(state, queued, NOW, Ids("q"))
    assert isinstance(accepted, list)
    state = fold(state, as_any(accepted))
    state = edited(state, "msg-1", 3, on_busy="enqueue")  # msg-2 grew from msg-1's answer
    state = finished(state)
    head = next_turn(state)
    assert head is not None and head.command_id == "cmd-2"
    events = decide_start(state, head, MODEL, NOW, Ids("s"))
    assert [type(e).__name__ for e in events] == ["CommandRejected"], f"saw {events!r}"
    rejected = events[0]
    assert isinstance(rejected, CommandRejected) and rejected.code == "superseded"
    state = fold(state, as_any(events))
    head = next_turn(state)
    assert head is not None and head.command_id == "cmd-3", f"the edit runs next, saw {head!r}"


# ---------------------------------------------------------------- properties of the fold

KINDS: list[ChunkKind | None] = ["thinking", "answer"]
turn_step: st.SearchStrategy[tuple[ChunkKind | None, str]] = st.one_of(
    st.tuples(st.sampled_from(KINDS), st.text(max_size=8)),
    st.just((None, "")),  # a tool call: a boundary
)


def turn_events(turn: str, steps: Sequence[tuple[ChunkKind | None, str]]) -> list[AnyEvent]:
    out: list[AnyEvent] = []
    for i, (kind, text) in enumerate(steps):
        if kind is None:
            out.extend([tool_call(turn, f"c{i}"), tool_result(turn, f"c{i}")])
        else:
            out.append(chunk(turn, kind, text, i))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(turn_step, max_size=40))
def test_folding_chunks_gives_the_same_content_as_merging_the_pieces(
    steps: list[tuple[ChunkKind | None, str]],
) -> None:
    state, turn = started_turn()
    state = fold(state, turn_events(turn, steps))
    expected = merge_blocks(steps)
    seen = partial_content(state)
    assert seen == expected, f"steps {steps!r}: expected {expected!r}, saw {seen!r}"
    done = decide_done(state, "stop", TurnTotals(1, 1), NOW, Ids())
    assert done.content == expected, f"expected Done to carry {expected!r}, saw {done.content!r}"
    answer = next(m for m in evolve(state, done).messages if m.message_id == turn)
    assert list(answer.blocks) == expected, f"expected {expected!r} stored, saw {answer.blocks!r}"


@settings(max_examples=100, deadline=None)
@given(st.lists(turn_step, max_size=40), st.integers(0, 5), st.integers(0, 5))
def test_folding_the_same_events_twice_gives_equal_states(
    steps: list[tuple[ChunkKind | None, str]], input_tokens: int, output_tokens: int
) -> None:
    base, turn = started_turn()
    events = turn_events(turn, steps)
    first, second = fold(base, events), fold(base, list(events))
    assert first == second, f"the same events folded to {first!r} and {second!r}"
    end = decide_done(first, "stop", TurnTotals(input_tokens, output_tokens), NOW, Ids())
    assert evolve(first, end) == evolve(second, end)


def test_folding_a_long_turn_stays_fast_and_exact() -> None:
    state, turn = started_turn()
    n = 10_000
    state = fold(state, (chunk(turn, "answer", "x", i) for i in range(n)))
    seen = partial_content(state)
    assert seen == [ContentBlock(role="assistant", content="x" * n)], (
        f"expected one block of {n} characters, saw {len(seen)} blocks"
    )


# ---------------------------------------------------------------- models: the price in force


def version(
    name: str,
    *,
    status: typing.Literal["active", "deprecated"] = "active",
    default: bool = False,
    released: dt.date | None = None,
    price: float = 1.0,
) -> ModelVersion:
    return ModelVersion(
        version=name,
        status=status,
        is_default=default,
        release_date=released,
        input_price=price,
        output_price=price * 5,
    )


JAN = dt.date(2026, 1, 15)
MAR = dt.date(2026, 3, 1)
JUN = dt.date(2026, 6, 1)

ACTIVE_VERSION_CASES: list[tuple[str, list[ModelVersion], str | None]] = [
    ("no versions", [], None),
    ("only deprecated versions", [version("old", status="deprecated", default=True)], None),
    ("the only active version", [version("v1", released=JAN)], "v1"),
    (
        "the default beats a newer release",
        [version("new", released=JUN), version("dflt", default=True, released=JAN)],
        "dflt",
    ),
    (
        "a deprecated default never wins",
        [
            version("dep", status="deprecated", default=True, released=JUN),
            version("act", released=JAN),
        ],
        "act",
    ),
    (
        "without a default, the newest release",
        [version("jan", released=JAN), version("jun", released=JUN), version("mar", released=MAR)],
        "jun",
    ),
    (
        "among several defaults, the newest release",
        [
            version("d-jan", default=True, released=JAN),
            version("d-mar", default=True, released=MAR),
        ],
        "d-mar",
    ),
    (
        "a version without a release date is older than any dated one",
        [version("undated"), version("jan", released=JAN)],
        "jan",
    ),
    (
        "a deprecated newer release never wins",
        [version("jun", status="deprecated", released=JUN), version("jan", released=JAN)],
        "jan",
    ),
]


@pytest.mark.parametrize(
    ("versions", "expected"),
    [pytest.param(v, e, id=name) for name, v, e in ACTIVE_VERSION_CASES],
)
def test_the_version_in_force_is_active_default_first_then_newest(
    versions: list[ModelVersion], expected: str | None
) -> None:
    chosen = active_version(ModelSpec(name="m", versions=versions))
    seen = chosen.version if chosen else None
    assert seen == expected, f"expected {expected!r}, saw {seen!r} from {versions!r}"


def test_choosing_a_model_records_the_prices_in_force() -> None:
    spec = ModelSpec(
        name="demo",
        max_output_tokens=4096,
        versions=[
            ModelVersion(
                version="2025-06",
                status="deprecated",
                is_default=True,
                input_price=9,
                output_price=9,
            ),
            ModelVersion(
                version="2026-01",
                is_default=True,
                release_date=JAN,
                input_price=3.0,
                output_price=15.0,
            ),
        ],
    )
    expected = ModelChoice(
        name="demo",
        version_id="demo@2026-01",
        prices=Prices(input_price=3.0, output_price=15.0),
        max_tokens=4096,
        temperature=0.7,
    )
    seen = choose_model(spec)
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


def test_a_model_without_max_output_tokens_is_unlimited() -> None:
    seen = choose_model(ModelSpec(name="m", versions=[version("v1", released=JAN)]))
    assert seen.max_tokens is None, f"expected no limit, saw {seen.max_tokens!r}"


def test_the_chosen_prices_are_recorded_in_started() -> None:
    spec = ModelSpec(name="demo", versions=[version("v2", default=True, released=JAN, price=2.5)])
    state = fold(empty(), [created()])
    result = decide_send(state, send("price check please"), choose_model(spec), NOW, Ids())
    assert not isinstance(result, Rejected), f"saw {result!r}"
    started = result[1]
    assert isinstance(started, Started), f"saw {result!r}"
    seen = (started.model_version_id, started.prices)
    expected = ("demo@v2", Prices(input_price=2.5, output_price=12.5))
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


# ---------------------------------------------------------------- deleting


def delete(n: int = 1) -> DeleteConversation:
    return DeleteConversation(conversation_id=CONV, command_id=f"del-{n}", user_id=USER, at=NOW)


def test_a_delete_waits_for_no_turn_then_names_every_turn_in_its_tombstone() -> None:
    state, turn_id = started_turn()
    queued = msgspec.structs.replace(send("and then", n=2), on_busy="enqueue")
    accepted = decide_request(state, queued, NOW, Ids("q"))
    assert not isinstance(accepted, Rejected), accepted
    state = fold(state, as_any(accepted))
    assert decide_delete(state, delete(), NOW, Ids("d")) == []  # a turn runs, one waits
    refused = [
        r for r in decide_queue_refused(state, NOW, Ids("r")) if isinstance(r, CommandRejected)
    ]
    assert [(r.command_id, r.code, r.idle) for r in refused] == [
        ("cmd-2", "conversation_deleted", False)
    ]
    state = finished(fold(state, as_any(refused)))
    assert state.active is None and not state.queue
    (tombstone,) = decide_delete(state, delete(), NOW, Ids("d"))
    assert isinstance(tombstone, ConversationDeleted)
    assert tombstone.turn_ids == [turn_id] and tombstone.project_id == "proj-1"
    gone = evolve(state, tombstone)
    assert gone.deleted and not gone.exists and gone.messages == ()
    assert decide_delete(gone, delete(2), NOW, Ids("d")) == []  # delivered again: nothing


def test_a_log_purged_down_to_its_tombstone_folds_as_the_whole_log_does() -> None:
    state, _ = started_turn()
    whole = as_any([created(), *decided(fold(empty(), [created()]), send("hi"), Ids("t"))])
    state = finished(fold(empty(), whole))
    (tombstone,) = decide_delete(state, delete(), NOW, Ids("d"))
    assert isinstance(tombstone, ConversationDeleted)
    alone = evolve(empty(), tombstone)
    assert evolve(state, tombstone) == alone and alone.broken is None
