"""The conversation's pure core: fold events into state, decide events from commands.

`evolve(state, event)` is the only way state changes, so the state an actor
holds after running a turn is exactly the state a fresh actor rebuilds from the
log. `decide_*` functions return the events a command or a model step causes;
they take the clock reading and the id maker as arguments and never do I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import msgspec
from msgspec.structs import replace

from actors.content import HistoryMessage, auto_title, merge_blocks, needs_title
from actors.model_stream import ToolCallRequest
from actors.sizing import assemble
from actors.tools import ToolOutcome
from events.codec import Unreadable
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    ChunkKind,
    CommandRejected,
    ContentBlock,
    ContentPart,
    ConversationCreated,
    Done,
    Event,
    Failed,
    Prices,
    SendMessage,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
    event_type,
)
from events.vocabulary import Chunk as ChunkEvent

NewId = Callable[[], str]
MessageStatus = Literal["complete", "streaming", "cancelled", "failed", "billing_error"]


class Piece(msgspec.Struct, frozen=True, eq=False):
    """A persistent (cons) list of streamed pieces, newest first.

    Appending is O(1) and never copies, so folding a 10,000-chunk turn stays
    linear while the state remains immutable. Equality and repr walk the list
    iteratively: the generated ones would recurse once per piece and overflow
    the stack on a long turn.
    """

    kind: ChunkKind | None  # None: a boundary, where a tool call interrupted the text
    text: str
    previous: Piece | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Piece):
            return NotImplemented
        return pieces_in_order(self) == pieces_in_order(other)

    def __hash__(self) -> int:
        return hash(tuple(pieces_in_order(self)))

    def __repr__(self) -> str:
        pieces = pieces_in_order(self)
        return f"Piece(<{len(pieces)} pieces, last {pieces[-1]!r}>)"


def pieces_in_order(last: Piece | None) -> list[tuple[ChunkKind | None, str]]:
    out: list[tuple[ChunkKind | None, str]] = []
    node = last
    while node is not None:
        out.append((node.kind, node.text))
        node = node.previous
    out.reverse()
    return out


class Message(msgspec.Struct, frozen=True):
    message_id: str
    role: Literal["user", "assistant", "system"]
    text: str = ""  # user and system messages
    blocks: tuple[ContentBlock, ...] = ()  # assistant messages
    version_group_id: str = ""
    version_number: int = 1
    parent_message_id: str | None = None
    is_latest: bool = True
    status: MessageStatus = "complete"


class ActiveTurn(msgspec.Struct, frozen=True):
    turn_id: str
    user_message_id: str
    model: str
    prices: Prices
    last_piece: Piece | None = None
    tool_calls: int = 0
    parts: tuple[ContentPart, ...] = ()  # the final content, when it came in pieces


class Conversation(msgspec.Struct, frozen=True):
    conversation_id: str
    exists: bool = False
    user_id: str = ""
    project_id: str | None = None
    title: str = ""
    model: str | None = None
    messages: tuple[Message, ...] = ()
    active: ActiveTurn | None = None
    commands_seen: frozenset[str] = frozenset()
    token_usage_total: int = 0
    # Why this conversation's state cannot be known (a damaged event, a broken
    # invariant): it refuses new work, every other conversation goes on.
    broken: str | None = None

    @property
    def personal(self) -> bool:
        return self.project_id is None


class ModelChoice(msgspec.Struct, frozen=True):
    """The model settings in force for a turn, resolved by the shell from configuration."""

    name: str
    version_id: str = ""
    prices: Prices = Prices()
    max_tokens: int | None = None
    temperature: float = 0.7


# ---------------------------------------------------------------- fold


def evolve(state: Conversation, event: AnyEvent | Unreadable) -> Conversation:
    """Fold one log entry. Total: never raises, whatever the log holds.

    An entry of an unknown type (a newer version wrote it) is skipped. A damaged
    entry, or an event that breaks the conversation's invariants, marks the
    state `broken`: what the conversation holds is no longer known for sure.
    """
    problem = _invariant_broken(state, event)
    if problem is not None:
        state = replace(state, broken=state.broken or problem)
    match event:
        case Unreadable():
            return state
        case ConversationCreated():
            if state.exists:
                return state
            return replace(
                state,
                exists=True,
                user_id=event.user_id,
                project_id=event.project_id,
                title=event.title,
                model=event.model,
            )
        case UserMessage():
            message = Message(
                message_id=event.message_id,
                role="user",
                text=event.content,
                version_group_id=event.version_group_id or event.message_id,
                version_number=event.version_number,
                parent_message_id=event.parent_message_id,
            )
            seen = state.commands_seen | {event.command_id} if event.command_id else None
            return replace(
                state,
                messages=_add_version(state.messages, message),
                commands_seen=seen if seen is not None else state.commands_seen,
            )
        case Started():
            message = Message(
                message_id=event.turn_id,
                role="assistant",
                version_group_id=event.version_group_id or event.turn_id,
                version_number=event.version_number,
                parent_message_id=event.parent_message_id or event.user_message_id,
                status="streaming",
            )
            turn = ActiveTurn(
                turn_id=event.turn_id,
                user_message_id=event.user_message_id,
                model=event.model,
                prices=event.prices,
            )
            return replace(state, messages=_add_version(state.messages, message), active=turn)
        case ChunkEvent():
            if state.active is None or state.active.turn_id != event.turn_id:
                return state
            piece = Piece(kind=event.kind, text=event.text, previous=state.active.last_piece)
            return replace(state, active=replace(state.active, last_piece=piece))
        case ToolCall():
            if state.active is None or state.active.turn_id != event.turn_id:
                return state
            boundary = Piece(kind=None, text="", previous=state.active.last_piece)
            return replace(
                state,
                active=replace(
                    state.active, last_piece=boundary, tool_calls=state.active.tool_calls + 1
                ),
            )
        case ContentPart():
            if state.active is None or state.active.turn_id != event.turn_id:
                return state
            return replace(state, active=replace(state.active, parts=(*state.active.parts, event)))
        case Done() | Cancelled() | Failed():
            content = tuple(event.content)
            if event.content_parts and state.active and state.active.turn_id == event.turn_id:
                content = tuple(assemble(list(state.active.parts)))
            status: MessageStatus = (
                "complete"
                if isinstance(event, Done)
                else "cancelled"
                if isinstance(event, Cancelled)
                else "failed"
            )
            return _end_turn(
                state,
                event.turn_id,
                content,
                status,
                event.input_tokens + event.output_tokens,
            )
        case BillingRejected():
            return _end_turn(state, event.turn_id, (), "billing_error", 0)
        case Title():
            return replace(state, title=event.title)
        case CommandRejected():
            return replace(state, commands_seen=state.commands_seen | {event.command_id})
        case _:
            return state


def _invariant_broken(state: Conversation, event: AnyEvent | Unreadable) -> str | None:
    if isinstance(event, Unreadable):
        if event.known_type or event.type is None:
            return f"an entry of type {event.type or 'unknown'} cannot be read: {event.error}"
        return None  # a newer version's event: skipped, the rest still holds
    if isinstance(event, ConversationCreated):
        return "conversation_created appears twice" if state.exists else None
    if not state.exists:
        return f"{event_type(event)} before conversation_created"
    if isinstance(event, Started) and state.active is not None:
        return f"turn {event.turn_id} started while turn {state.active.turn_id} was running"
    return None


def fold(state: Conversation, events: Iterable[AnyEvent | Unreadable]) -> Conversation:
    for event in events:
        state = evolve(state, event)
    return state


def _add_version(messages: tuple[Message, ...], message: Message) -> tuple[Message, ...]:
    """Append a message; earlier versions of its group stop being the latest."""
    group = message.version_group_id
    if any(m.version_group_id == group and m.is_latest for m in messages):
        messages = tuple(
            replace(m, is_latest=False) if m.version_group_id == group else m for m in messages
        )
    return (*messages, message)


def _end_turn(
    state: Conversation,
    turn_id: str,
    blocks: tuple[ContentBlock, ...],
    status: MessageStatus,
    tokens: int,
) -> Conversation:
    messages = tuple(
        replace(m, blocks=blocks, status=status) if m.message_id == turn_id else m
        for m in state.messages
    )
    active = None if state.active and state.active.turn_id == turn_id else state.active
    return replace(
        state,
        messages=messages,
        active=active,
        token_usage_total=state.token_usage_total + tokens,
    )


# ---------------------------------------------------------------- queries


def latest_messages(state: Conversation) -> Iterator[Message]:
    return (m for m in state.messages if m.is_latest)


def history_of(state: Conversation) -> list[HistoryMessage]:
    """The latest versions in creation order, minus the assistant message being written."""
    active_id = state.active.turn_id if state.active else None
    return [
        HistoryMessage(role=m.role, blocks=(m.text,), assistant_blocks=m.blocks)
        if m.role != "assistant"
        else HistoryMessage(role="assistant", assistant_blocks=m.blocks)
        for m in latest_messages(state)
        if m.message_id != active_id
    ]


def partial_content(state: Conversation) -> list[ContentBlock]:
    """The merged content of the active turn so far."""
    if state.active is None:
        return []
    return merge_blocks(pieces_in_order(state.active.last_piece))


# ---------------------------------------------------------------- decisions


class Rejected(msgspec.Struct, frozen=True):
    """A command that produces no events, and why."""

    code: str
    message: str


def decide_send(
    state: Conversation,
    cmd: SendMessage,
    model: ModelChoice,
    now: int,
    new_id: NewId,
) -> list[Event] | Rejected:
    """A user message opens a turn: `user_message`, `started`, then `title`.

    A command already in the log (redelivered by JetStream) decides nothing:
    `commands_seen` is folded from `user_message.command_id`.
    """
    if not state.exists:
        return Rejected("not_found", f"conversation {cmd.conversation_id} does not exist")
    if cmd.command_id in state.commands_seen:
        return []
    if state.broken is not None:
        return Rejected(
            "conversation_unreadable",
            f"this conversation's log cannot be read reliably ({state.broken}); "
            "it takes no new messages: start a new conversation",
        )
    if state.active is not None:
        return Rejected("busy", f"turn {state.active.turn_id} is still running")
    latest = [m for m in latest_messages(state)]
    parent = latest[-1].message_id if latest else None
    turn_id = new_id()
    user = UserMessage(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        message_id=cmd.message_id,
        content=cmd.content,
        user_id=cmd.user_id,
        parent_message_id=parent,
        version_group_id=cmd.message_id,
        version_number=1,
        command_id=cmd.command_id,
    )
    started = Started(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=turn_id,
        user_message_id=cmd.message_id,
        model=model.name,
        model_version_id=model.version_id,
        prices=model.prices,
        max_tokens=model.max_tokens,
        temperature=model.temperature,
        parent_message_id=cmd.message_id,
        version_group_id=turn_id,
        version_number=1,
    )
    return [user, started, decide_title(state, cmd.content, turn_id, now, new_id)]


def decide_rejection(
    state: Conversation, cmd: SendMessage, why: Rejected, now: int, new_id: NewId
) -> CommandRejected:
    """The record that a command started no turn, so its waiting viewer gets an end."""
    return CommandRejected(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        command_id=cmd.command_id,
        message_id=cmd.message_id,
        code=why.code,
        message=why.message,
    )


def decide_title(
    state: Conversation, new_user_text: str, turn_id: str, now: int, new_id: NewId
) -> Title:
    """Every turn announces the title: made from the first user message while the
    conversation is untitled, otherwise the existing one."""
    if needs_title(state.title):
        first_user = next((m.text for m in state.messages if m.role == "user"), new_user_text)
        generated = auto_title(first_user)
        if generated:
            return Title(
                conversation_id=state.conversation_id,
                at=now,
                event_id=new_id(),
                title=generated,
                source="auto",
                turn_id=turn_id,
            )
    return Title(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        title=state.title,
        source="existing",
        turn_id=turn_id,
    )


class TurnTotals(msgspec.Struct, frozen=True):
    """What a turn consumed so far, across its tool rounds."""

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False


def decide_done(
    state: Conversation,
    stop_reason: str,
    totals: TurnTotals,
    now: int,
    new_id: NewId,
) -> Done:
    turn = _require_active(state)
    return Done(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=turn.turn_id,
        content=partial_content(state),
        stop_reason=stop_reason,
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        tokens_estimated=totals.estimated,
    )


def decide_failed(
    state: Conversation,
    code: str,
    message: str,
    totals: TurnTotals,
    now: int,
    new_id: NewId,
) -> Failed:
    turn = _require_active(state)
    return Failed(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=turn.turn_id,
        code=code,
        message=message,
        content=partial_content(state),
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        tokens_estimated=totals.estimated,
    )


def decide_tool_call(
    state: Conversation, call: ToolCallRequest, now: int, new_id: NewId
) -> ToolCall:
    return ToolCall(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=_require_active(state).turn_id,
        call_id=call.call_id,
        name=call.name,
        arguments=call.arguments,
    )


def decide_tool_result(
    state: Conversation,
    call: ToolCallRequest,
    outcome: ToolOutcome,
    duration_ms: float,
    now: int,
    new_id: NewId,
) -> ToolResult:
    return ToolResult(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=_require_active(state).turn_id,
        call_id=call.call_id,
        name=call.name,
        result=outcome.result,
        error=outcome.error,
        duration_ms=duration_ms,
    )


def _require_active(state: Conversation) -> ActiveTurn:
    if state.active is None:
        raise ValueError(f"conversation {state.conversation_id} has no active turn")
    return state.active
