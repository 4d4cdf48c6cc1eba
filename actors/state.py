"""A conversation's state, folded from its events: the only way that state changes.

`evolve(state, event)` is total (it never raises, whatever the log holds), so
the state an actor holds after running a turn is exactly the state a fresh
actor rebuilds from the log. Queries over the state (the latest messages, the
history a turn sends, the partial content of the running turn) live here too.

Pure: no I/O, no clock, no ids made here, no logging. The decisions that
produce events are in `actors.decide`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Literal

import msgspec
from msgspec.structs import replace

from actors.content import HistoryMessage, answer_text, merge_blocks
from actors.sizing import assemble
from actors.tools import ToolMessage
from events.codec import Unreadable
from events.vocabulary import (
    AnswerRequested,
    AnyEvent,
    BillingRejected,
    Cancelled,
    ChunkKind,
    CommandRejected,
    ContentBlock,
    ContentPart,
    ConversationCreated,
    ConversationDeleted,
    Done,
    Event,
    Failed,
    Prices,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
    event_type,
)
from events.vocabulary import Chunk as ChunkEvent

MessageStatus = Literal["complete", "streaming", "cancelled", "failed", "billing_error"]


class Piece(msgspec.Struct, frozen=True, eq=False, gc=False):
    """A persistent (cons) list of streamed pieces, newest first.

    Appending is O(1) and never copies, so folding a 10,000-chunk turn stays
    linear while the state remains immutable. Equality and repr walk the list
    iteratively: the generated ones would recurse once per piece and overflow
    the stack on a long turn.

    A worker holds one piece per chunk of every running turn. Frozen, each
    points only at an older piece, so no cycle can form, and they are left out
    of the garbage collector's passes (`gc=False`, as messages are).
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


class Message(msgspec.Struct, frozen=True, gc=False):
    message_id: str
    role: Literal["user", "assistant", "system"]
    text: str = ""  # user and system messages
    blocks: tuple[ContentBlock, ...] = ()  # assistant messages
    version_group_id: str = ""
    version_number: int = 1
    parent_message_id: str | None = None
    is_latest: bool = True
    is_fork_origin: bool = False
    status: MessageStatus = "complete"


class QueuedTurn(msgspec.Struct, frozen=True):
    """An accepted request whose turn has not started yet."""

    command_id: str
    user_message_id: str
    model: str | None = None
    regenerates: str | None = None  # an answer being regenerated: its message id
    answer_group: str | None = None  # ... and its version group
    user_id: str = ""


class KeyedRequest(msgspec.Struct, frozen=True):
    """A request sent with an idempotency key: what a retry of it is answered with."""

    command_id: str
    message_id: str  # its user message ("" for a regeneration: the answer has no id yet)
    at: int  # when it was accepted (a key is the same request for a while, not for ever)


class BilledTurn(msgspec.Struct, frozen=True):
    """A turn that ended with an account to charge: what its charge is made of."""

    turn_id: str
    payer: str
    prices: Prices
    input_tokens: int
    output_tokens: int
    estimated: bool
    end: str  # done | cancelled | failed
    user_id: str = ""


class ActiveTurn(msgspec.Struct, frozen=True):
    turn_id: str
    user_message_id: str
    model: str
    prices: Prices
    command_id: str = ""
    payer: str | None = None
    user_id: str = ""
    last_piece: Piece | None = None
    tool_calls: int = 0
    parts: tuple[ContentPart, ...] = ()  # the final content, when it came in pieces
    # What the tool rounds add to the model's calls, for an estimate of a turn whose
    # usage never came (actors.decide.estimated_totals): per model answer that asked
    # for tools, the characters of its calls and their results, which every later
    # call sends again; and the characters of all calls (the model wrote them).
    round_chars: tuple[int, ...] = ()
    call_chars: int = 0
    after_results: bool = False  # the last tool event was a result: a call opens a round
    history_omitted: int = 0  # earlier messages its first model call left out


class InputRate(msgspec.Struct, frozen=True):
    """What a model's provider counted for what was sent to it: the last turn's reported
    input tokens and the bytes its calls sent (`Done.input_bytes`)."""

    model: str
    tokens: int
    bytes: int


class Conversation(msgspec.Struct, frozen=True):
    conversation_id: str
    exists: bool = False
    user_id: str = ""
    project_id: str | None = None
    title: str = ""
    model: str | None = None
    messages: tuple[Message, ...] = ()
    active: ActiveTurn | None = None
    queue: tuple[QueuedTurn, ...] = ()
    commands_seen: frozenset[str] = frozenset()
    # commands whose turn ended (or which were refused): a redelivery is settled at once
    commands_done: frozenset[str] = frozenset()
    # accepted requests by their `request_key` (events.vocabulary.TurnRequest)
    keyed: dict[str, KeyedRequest] = {}
    token_usage_total: int = 0
    last_billed: BilledTurn | None = None  # the latest ended turn that has an account to charge
    input_rate: InputRate | None = None  # the latest turn's that knew it
    # Why this conversation's state cannot be known (a damaged event, a broken
    # invariant): it refuses new work, every other conversation goes on.
    broken: str | None = None
    # Its tombstone is in the log (`conversation_deleted`): nothing of it is kept,
    # nothing more is appended, every command is dropped.
    deleted: bool = False

    @property
    def personal(self) -> bool:
        return self.project_id is None

    @property
    def busy(self) -> bool:
        return self.active is not None or bool(self.queue)


def state_bytes(state: Conversation) -> int:
    """About how much memory a folded conversation holds: its messages' text (which
    is most of it: every answer in full) and the ids it remembers. `sys.getsizeof`
    of a string is its real size, known without reading it."""
    ids = len(state.commands_seen) + len(state.commands_done) + 3 * len(state.keyed)
    size = _STATE_OVERHEAD + _ID_BYTES * ids
    for m in state.messages:
        size += _MESSAGE_OVERHEAD + sys.getsizeof(m.text)
        size += sum(_MESSAGE_OVERHEAD + sys.getsizeof(b.content) for b in m.blocks)
    return size


# rough costs of what is not text: a Struct and its fields, an id in a frozenset
_STATE_OVERHEAD = 1_000
_MESSAGE_OVERHEAD = 200
_ID_BYTES = 120


# ---------------------------------------------------------------- fold


def evolve(state: Conversation, event: AnyEvent | Unreadable) -> Conversation:
    """Fold one log entry.

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
        case ConversationDeleted():
            # Everything before it is purged from the log: a state folded from the
            # tombstone alone and one folded from the whole log must be the same.
            return Conversation(conversation_id=state.conversation_id, deleted=True)
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
            return _user_message(state, event)
        case AnswerRequested():
            queued = QueuedTurn(
                command_id=event.command_id,
                user_message_id=event.user_message_id,
                model=event.model,
                regenerates=event.regenerates,
                answer_group=event.version_group_id,
                user_id=event.user_id,
            )
            return replace(
                state,
                queue=_enqueue(state.queue, queued, front=event.interrupts),
                commands_seen=state.commands_seen | {event.command_id},
                keyed=_keyed(state, event.request_key, event.command_id, "", event.at),
            )
        case Started():
            return _started(state, event)
        case ChunkEvent():
            if state.active is None or state.active.turn_id != event.turn_id:
                return state
            piece = Piece(kind=event.kind, text=event.text, previous=state.active.last_piece)
            return replace(state, active=replace(state.active, last_piece=piece))
        case ToolCall():
            active = state.active
            if active is None or active.turn_id != event.turn_id:
                return state
            boundary = Piece(kind=None, text="", previous=active.last_piece)
            chars = len(event.name) + len(event.arguments)
            rounds = active.round_chars
            if rounds and not active.after_results:  # another call of the same answer
                rounds = (*rounds[:-1], rounds[-1] + chars)
            else:  # the first call of a model answer
                rounds = (*rounds, chars)
            return replace(
                state,
                active=replace(
                    active,
                    last_piece=boundary,
                    tool_calls=active.tool_calls + 1,
                    round_chars=rounds,
                    call_chars=active.call_chars + chars,
                    after_results=False,
                ),
            )
        case ToolResult():
            active = state.active
            if active is None or active.turn_id != event.turn_id or not active.round_chars:
                return state
            chars = len(event.result or "") + len(event.error or "")
            rounds = (*active.round_chars[:-1], active.round_chars[-1] + chars)
            return replace(state, active=replace(active, round_chars=rounds, after_results=True))
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
            active = state.active
            if (
                isinstance(event, Done)
                and active is not None
                and active.turn_id == event.turn_id
                and event.input_bytes > 0
                and not event.tokens_estimated
            ):
                rate = InputRate(active.model, event.input_tokens, event.input_bytes)
                state = replace(state, input_rate=rate)
            if active is not None and active.turn_id == event.turn_id and active.payer:
                state = replace(
                    state,
                    last_billed=BilledTurn(
                        turn_id=event.turn_id,
                        payer=active.payer,
                        prices=active.prices,
                        input_tokens=event.input_tokens,
                        output_tokens=event.output_tokens,
                        estimated=event.tokens_estimated,
                        end=event_type(event),
                        user_id=active.user_id,
                    ),
                )
            return _end_turn(
                state, event.turn_id, content, status, event.input_tokens + event.output_tokens
            )
        case BillingRejected():
            return _end_turn(state, event.turn_id, (), "billing_error", 0)
        case Title():
            if event.command_id:
                seen = state.commands_seen | {event.command_id}
                return replace(state, title=event.title, commands_seen=seen)
            return replace(state, title=event.title)
        case CommandRejected():
            return replace(
                state,
                # refused after it was queued (given up): it leaves the queue
                queue=tuple(q for q in state.queue if q.command_id != event.command_id),
                commands_seen=state.commands_seen | {event.command_id},
                commands_done=state.commands_done | {event.command_id},
            )
        case _:
            return state


def fold(state: Conversation, events: Iterable[Event | Unreadable]) -> Conversation:
    """Fold entries in order: read from the log, or just decided and appended."""
    for event in events:
        # Every concrete Event subclass is a member of AnyEvent; this narrows the static type.
        state = evolve(state, event)  # type: ignore[arg-type]
    return state


def _user_message(state: Conversation, event: UserMessage) -> Conversation:
    message = Message(
        message_id=event.message_id,
        role="user",
        text=event.content,
        version_group_id=event.version_group_id or event.message_id,
        version_number=event.version_number,
        parent_message_id=event.parent_message_id,
    )
    messages = _supersede(state.messages, event.supersedes, event.fork_origin)
    seen = state.commands_seen | {event.command_id} if event.command_id else state.commands_seen
    queued = QueuedTurn(
        command_id=event.command_id,
        user_message_id=event.message_id,
        model=event.model,
        user_id=event.user_id,
    )
    return replace(
        state,
        messages=_add_version(messages, message),
        queue=_enqueue(state.queue, queued, front=event.interrupts),
        commands_seen=seen,
        keyed=_keyed(state, event.request_key, event.command_id, event.message_id, event.at),
    )


def _keyed(
    state: Conversation, request_key: str, command_id: str, message_id: str, at: int
) -> dict[str, KeyedRequest]:
    """The keyed requests with this one (a copy: a state is never changed in place)."""
    if not request_key:
        return state.keyed
    return {**state.keyed, request_key: KeyedRequest(command_id, message_id, at)}


def _started(state: Conversation, event: Started) -> Conversation:
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
        command_id=event.command_id,
        payer=event.payer,
        user_id=event.user_id,
        history_omitted=event.history_omitted,
    )
    messages = _supersede(state.messages, event.supersedes, event.fork_origin)
    return replace(
        state,
        messages=_add_version(messages, message),
        active=turn,
        queue=_dequeue(state.queue, event),
    )


def _enqueue(
    queue: tuple[QueuedTurn, ...], queued: QueuedTurn, *, front: bool
) -> tuple[QueuedTurn, ...]:
    return (queued, *queue) if front else (*queue, queued)


def _dequeue(queue: tuple[QueuedTurn, ...], started: Started) -> tuple[QueuedTurn, ...]:
    """The queue without the request `started` answers (by command, else by user message:
    logs written before requests were queued name only the user message)."""
    for i, queued in enumerate(queue):
        if (started.command_id and queued.command_id == started.command_id) or (
            not started.command_id and queued.user_message_id == started.user_message_id
        ):
            return queue[:i] + queue[i + 1 :]
    return queue


def _supersede(
    messages: tuple[Message, ...], ids: list[str], fork_origin: str | None
) -> tuple[Message, ...]:
    if not ids and fork_origin is None:
        return messages
    gone = set(ids)
    return tuple(
        replace(
            m,
            is_latest=m.is_latest and m.message_id not in gone,
            is_fork_origin=m.is_fork_origin or m.message_id == fork_origin,
        )
        for m in messages
    )


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
    ended = state.active if state.active and state.active.turn_id == turn_id else None
    done = state.commands_done | {ended.command_id} if ended and ended.command_id else None
    return replace(
        state,
        messages=messages,
        active=None if ended else state.active,
        commands_done=done if done is not None else state.commands_done,
        token_usage_total=state.token_usage_total + tokens,
    )


def _invariant_broken(state: Conversation, event: AnyEvent | Unreadable) -> str | None:
    if isinstance(event, Unreadable):
        if event.known_type or event.type is None:
            return f"an entry of type {event.type or 'unknown'} cannot be read: {event.error}"
        return None  # a newer version's event: skipped, the rest still holds
    if isinstance(event, ConversationCreated):
        return "conversation_created appears twice" if state.exists else None
    if isinstance(event, ConversationDeleted) or state.deleted:
        return None  # a tombstone ends it, alone (purged) or not; after it: nothing to hold
    if not state.exists:
        return f"{event_type(event)} before conversation_created"
    if isinstance(event, Started) and state.active is not None:
        return f"turn {event.turn_id} started while turn {state.active.turn_id} was running"
    return None


# ---------------------------------------------------------------- queries


def latest_messages(state: Conversation) -> Iterator[Message]:
    return (m for m in state.messages if m.is_latest)


def message(state: Conversation, message_id: str) -> Message | None:
    return next((m for m in state.messages if m.message_id == message_id), None)


def messages_for_tools(state: Conversation) -> tuple[ToolMessage, ...]:
    """The latest versions as a tool reads them (`search_messages`): an answer by the
    text the model was shown of it, its thinking left out as the history leaves it
    out; the answer being written is not one yet."""
    active = state.active.turn_id if state.active else None
    return tuple(
        ToolMessage(
            message_id=m.message_id,
            role=m.role,
            text=m.text if m.role != "assistant" else answer_text(m.blocks),
        )
        for m in latest_messages(state)
        if m.message_id != active
    )


def history_of(state: Conversation, upto: str | None = None) -> list[HistoryMessage]:
    """The latest versions as the model reads them: each answered message followed by
    its answer, in the order their turns started; then the messages with no answer
    yet, in creation order. The assistant message being written is left out.

    Not creation order alone: a message queued behind a running turn is made when it
    is accepted, its answer when its turn starts, after later messages may have been
    queued too, so creation order put all the questions before all the answers, and
    a queued turn did not see the answer to the message queued before it.

    With `upto` (the user message a turn answers), the history is what was answered
    before that turn, then that message: messages still waiting (queued behind it,
    or left waiting by an interrupt that runs first) are not part of its question,
    as they are not when they are answered in their turn.
    """
    active_id = state.active.turn_id if state.active else None
    latest = [m for m in latest_messages(state) if m.message_id != active_id]
    by_id = {m.message_id: m for m in latest}
    out: list[HistoryMessage] = []
    answered: set[str] = set()  # the questions placed before their answers
    for m in latest:  # creation order: an answer is made as its turn starts
        if m.role == "system":
            out.append(_as_history(m))
        elif m.role == "assistant":
            question = by_id.get(m.parent_message_id or "")
            if question is not None and question.message_id not in answered:
                answered.add(question.message_id)
                if question.message_id != upto:
                    out.append(_as_history(question))
            out.append(_as_history(m))
    if upto is not None:
        return [*out, _as_history(by_id[upto])] if upto in by_id else out
    waiting = [m for m in latest if m.role == "user" and m.message_id not in answered]
    return [*out, *(_as_history(m) for m in waiting)]


def _as_history(m: Message) -> HistoryMessage:
    if m.role == "assistant":
        return HistoryMessage(role="assistant", assistant_blocks=m.blocks)
    return HistoryMessage(role=m.role, blocks=(m.text,), assistant_blocks=m.blocks)


def partial_content(state: Conversation) -> list[ContentBlock]:
    """The merged content of the active turn so far."""
    if state.active is None:
        return []
    return merge_blocks(pieces_in_order(state.active.last_piece))


def descendants(state: Conversation, message_id: str) -> list[str]:
    """Messages that grew from `message_id` (its answers, the messages after them, ...)."""
    found: set[str] = {message_id}
    out: list[str] = []
    for m in state.messages:  # creation order: a parent comes before its children
        if m.parent_message_id in found and m.message_id not in found:
            found.add(m.message_id)
            out.append(m.message_id)
    return out
