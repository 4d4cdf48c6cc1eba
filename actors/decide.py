"""The conversation's decisions: which events a command or a step of a turn causes.

Every function here takes the folded state (`actors.state`), the clock reading
and the id maker as arguments and returns events (or why not); none does I/O,
reads a clock or makes ids of its own, so every rule is tested without a server.

A turn request (send, edit, regenerate) is first *accepted*: a `user_message`
or `answer_requested` event puts it in the conversation's queue, or a
`command_rejected` refuses it (busy and `on_busy: reject`, a broken log, an
unknown message). The queue's head then *starts* (`started`, `title`) as soon
as no turn runs. `on_busy: interrupt` accepts the request at the head of the
queue; the shell then cancels the running turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from actors.content import (
    announced_title,
    auto_title,
    build_history,
    needs_title,
    without_oldest,
)
from actors.model_stream import ToolCallRequest
from actors.state import (
    ActiveTurn,
    Conversation,
    Message,
    Piece,
    QueuedTurn,
    descendants,
    history_of,
    latest_messages,
    message,
    partial_content,
    pieces_in_order,
)
from actors.tools import ToolOutcome
from events.billing import project_account, user_account
from events.vocabulary import (
    AnswerRequested,
    BillingRejected,
    Cancelled,
    CommandRejected,
    ConversationDeleted,
    DeleteConversation,
    Done,
    EditMessage,
    Event,
    Failed,
    Prices,
    Regenerate,
    RenameConversation,
    SendMessage,
    Started,
    Title,
    ToolCall,
    ToolResult,
    TurnCommand,
    UnsentEnd,
    UserMessage,
)

NewId = Callable[[], str]
# Rough characters per token, used only when a provider never reported usage
# (a stream cut short, a worker that died): the estimate is flagged as such.
CHARS_PER_TOKEN = 4


class ModelChoice(msgspec.Struct, frozen=True):
    """The model settings in force for a turn, resolved by the shell from configuration."""

    name: str
    version_id: str = ""
    prices: Prices = Prices()
    max_tokens: int | None = None
    temperature: float = 0.7


class Rejected(msgspec.Struct, frozen=True):
    """A command that produces no turn, and why."""

    code: str
    message: str
    turn_id: str | None = None  # code "busy": the running turn
    # code "repeated": the earlier request's command and message
    repeats: str = ""
    message_id: str | None = None


class TurnTotals(msgspec.Struct, frozen=True):
    """What a turn consumed so far, across its tool rounds."""

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    input_bytes: int = 0  # what the calls whose usage was reported sent
    history_omitted: int = 0  # the most earlier messages a call left out of its history


# ---------------------------------------------------------------- requests


def decide_request(
    state: Conversation, cmd: TurnCommand, now: int, new_id: NewId
) -> list[Event] | Rejected:
    """Accept a turn request into the queue, or refuse it.

    A command already in the log (redelivered by JetStream) decides nothing:
    `commands_seen` is folded from the requests and rejections it caused.
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
    repeated = _repeated(state, cmd, now)
    if repeated is not None:
        return repeated
    if state.busy and cmd.on_busy == "reject":
        running = state.active.turn_id if state.active else None
        what = f"turn {running} is running" if running else "earlier messages are waiting"
        return Rejected("busy", f"{what}; send with on_busy enqueue or interrupt", turn_id=running)
    interrupts = state.busy and cmd.on_busy == "interrupt"
    match cmd:
        case SendMessage():
            return [_send(state, cmd, interrupts, now, new_id)]
        case EditMessage():
            return _edit(state, cmd, interrupts, now, new_id)
        case Regenerate():
            return _regenerate(state, cmd, interrupts, now, new_id)


def _repeated(state: Conversation, cmd: TurnCommand, now: int) -> Rejected | None:
    """The same request again (its idempotency key, user and content) while its key
    lasts: the edge lost its record of the key (Redis flushed or restarted empty),
    and the retry is answered with the earlier request's turn, not given a second."""
    earlier = state.keyed.get(cmd.request_key) if cmd.request_key else None
    if earlier is None or now - earlier.at >= cmd.request_key_ttl_s * 1_000_000_000:
        return None
    return Rejected(
        "repeated",
        f"the request with this idempotency key was accepted already (command {earlier.command_id})",
        repeats=earlier.command_id,
        message_id=earlier.message_id,
    )


def _send(
    state: Conversation, cmd: SendMessage, interrupts: bool, now: int, new_id: NewId
) -> UserMessage:
    latest = list(latest_messages(state))
    return UserMessage(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        message_id=cmd.message_id,
        content=cmd.content,
        user_id=cmd.user_id,
        parent_message_id=latest[-1].message_id if latest else None,
        version_group_id=cmd.message_id,
        version_number=1,
        command_id=cmd.command_id,
        model=cmd.model,
        interrupts=interrupts,
        request_key=cmd.request_key,
    )


def _edit(
    state: Conversation, cmd: EditMessage, interrupts: bool, now: int, new_id: NewId
) -> list[Event] | Rejected:
    edited = message(state, cmd.edits)
    if edited is None or edited.role != "user":
        return Rejected("not_found", f"no user message {cmd.edits} in this conversation")
    group = [m for m in state.messages if m.version_group_id == edited.version_group_id]
    current = next((m for m in reversed(group) if m.is_latest), None)
    if current is None:
        return _off_branch(cmd.edits)
    return [
        UserMessage(
            conversation_id=state.conversation_id,
            at=now,
            event_id=new_id(),
            message_id=cmd.message_id,
            content=cmd.content,
            user_id=cmd.user_id,
            parent_message_id=current.parent_message_id,
            version_group_id=edited.version_group_id,
            version_number=max(m.version_number for m in group) + 1,
            command_id=cmd.command_id,
            model=cmd.model,
            interrupts=interrupts,
            request_key=cmd.request_key,
            # the old version and everything that grew from it leave the branch
            supersedes=[current.message_id, *descendants(state, current.message_id)],
            fork_origin=current.message_id,
        )
    ]


def _regenerate(
    state: Conversation, cmd: Regenerate, interrupts: bool, now: int, new_id: NewId
) -> list[Event] | Rejected:
    answer = message(state, cmd.message_id) if cmd.message_id else _latest_answer(state)
    if answer is None or answer.role != "assistant" or answer.parent_message_id is None:
        what = f"assistant message {cmd.message_id}" if cmd.message_id else "answer to regenerate"
        return Rejected("not_found", f"no {what} in this conversation")
    group = [m for m in state.messages if m.version_group_id == answer.version_group_id]
    current = next((m for m in reversed(group) if m.is_latest), None)
    if current is None or current.parent_message_id is None:
        return _off_branch(cmd.message_id)
    return [
        AnswerRequested(
            conversation_id=state.conversation_id,
            at=now,
            event_id=new_id(),
            user_message_id=current.parent_message_id,
            regenerates=answer.message_id,
            version_group_id=answer.version_group_id,
            command_id=cmd.command_id,
            user_id=cmd.user_id,
            model=cmd.model,
            interrupts=interrupts,
            request_key=cmd.request_key,
        )
    ]


def _latest_answer(state: Conversation) -> Message | None:
    """The last answer on the branch in force."""
    return next((m for m in reversed(list(latest_messages(state))) if m.role == "assistant"), None)


def _off_branch(message_id: str) -> Rejected:
    """Versions branch: a message whose every version left the branch in force (an
    earlier message was edited, or its answer regenerated) cannot grow a new one,
    which would put two branches in force at once."""
    return Rejected(
        "superseded",
        f"message {message_id} is on a branch that is no longer in force "
        "(an earlier message was edited or regenerated); act on the current versions",
    )


def decide_rejection(
    state: Conversation, cmd: TurnCommand, why: Rejected, now: int, new_id: NewId
) -> CommandRejected:
    """The record that a command started no turn, so its waiting viewer gets an end."""
    return CommandRejected(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        command_id=cmd.command_id,
        message_id=cmd.message_id if why.message_id is None else why.message_id,
        code=why.code,
        message=why.message,
        turn_id=why.turn_id,
        idle=state.active is None and not state.queue,
        repeats=why.repeats,
    )


# ---------------------------------------------------------------- starting a turn


def next_turn(state: Conversation) -> QueuedTurn | None:
    """The request whose turn starts next, if none is running."""
    if state.active is not None or state.broken is not None or not state.queue:
        return None
    return state.queue[0]


def decide_start(
    state: Conversation,
    queued: QueuedTurn,
    model: ModelChoice,
    now: int,
    new_id: NewId,
    turn_id: str | None = None,
    payer: str | None = None,
) -> list[Event]:
    """`started` for the queue's head, then `title`. The turn's id may be chosen
    beforehand (the shell announces the turn before it appends it); `payer` is
    the account billed for it (none in personal scope).

    A request whose user message left the branch in force while it waited (an
    earlier message was edited) is refused instead: its answer would hang off a
    branch nobody sees."""
    asked = message(state, queued.user_message_id)
    if asked is None or not asked.is_latest:
        why = _off_branch(queued.user_message_id)
        # this one was the last waiting
        return [_queued_refused(state, queued, why, len(state.queue) == 1, now, new_id)]
    turn_id = turn_id or new_id()
    group, number, supersedes, fork_origin = turn_id, 1, list[str](), None
    if queued.answer_group is not None:
        versions = [m for m in state.messages if m.version_group_id == queued.answer_group]
        current = next((m for m in reversed(versions) if m.is_latest), None)
        group = queued.answer_group
        number = max((m.version_number for m in versions), default=0) + 1
        if current is not None:
            supersedes = [current.message_id, *descendants(state, current.message_id)]
            fork_origin = current.message_id
    started = Started(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=turn_id,
        user_message_id=queued.user_message_id,
        model=model.name,
        model_version_id=model.version_id,
        prices=model.prices,
        max_tokens=model.max_tokens,
        temperature=model.temperature,
        parent_message_id=queued.user_message_id,
        version_group_id=group,
        version_number=number,
        command_id=queued.command_id,
        supersedes=supersedes,
        fork_origin=fork_origin,
        user_id=queued.user_id,
        payer=payer,
    )
    return [started, decide_title(state, asked.text, turn_id, now, new_id)]


def decide_title(
    state: Conversation, new_user_text: str, turn_id: str, now: int, new_id: NewId
) -> Title:
    """Every turn announces the title: made from the first user message while the
    conversation is untitled, otherwise the existing one."""
    if needs_title(state.title):
        # the first in force: an edit of the first message replaces it here too
        first_user = next(
            (m.text for m in latest_messages(state) if m.role == "user"), new_user_text
        )
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
        title=announced_title(state.title),
        source="existing",
        turn_id=turn_id,
    )


def decide_billing_rejected(
    state: Conversation, account: str, needed: int, available: int, now: int, new_id: NewId
) -> BillingRejected:
    """The pre-flight refused the turn: it ends before the model is called."""
    turn = _require_active(state)
    return BillingRejected(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=turn.turn_id,
        user_message_id=turn.user_message_id,
        account=account,
        needed=needed,
        available=available,
        idle=not state.queue,
    )


def choose_payer(state: Conversation, requester: str, project_funded: bool) -> str | None:
    """Who pays for a turn (DESIGN section 4): nobody in personal scope; in a project,
    the project's account when it has one (it was ever granted credits), else the
    member who asked."""
    if state.project_id is None:
        return None
    if project_funded:
        return project_account(state.project_id)
    return user_account(requester or state.user_id)


def decide_rename(
    state: Conversation, cmd: RenameConversation, now: int, new_id: NewId
) -> list[Event]:
    """The user named the conversation. Nothing when it is already so named, or when
    this command named it before: delivered again (its title landed, its
    acknowledgement did not), after a later rename, it would bring the old name back.
    A later turn announces the name as the existing title, never replaces it."""
    if not state.exists or state.title == cmd.title or cmd.command_id in state.commands_seen:
        return []
    return [
        Title(
            conversation_id=state.conversation_id,
            at=now,
            event_id=new_id(),
            title=cmd.title,
            source="user",
            turn_id=None,
            command_id=cmd.command_id,
        )
    ]


def decide_queue_refused(state: Conversation, now: int, new_id: NewId) -> list[Event]:
    """The conversation is being deleted: every request still waiting for its turn is
    refused (`command_rejected`), so its viewer gets an end and no turn starts."""
    why = Rejected(
        "conversation_deleted", "the conversation was deleted before this request's turn started"
    )
    last = len(state.queue) - 1
    # no other request waits behind the last one, and none runs once it is refused
    # only if no turn runs either
    return [
        _queued_refused(state, queued, why, state.active is None and i == last, now, new_id)
        for i, queued in enumerate(state.queue)
    ]


def _queued_refused(
    state: Conversation, queued: QueuedTurn, why: Rejected, idle: bool, now: int, new_id: NewId
) -> CommandRejected:
    """A request that waited in the queue, refused: no turn of it starts."""
    return CommandRejected(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        command_id=queued.command_id,
        message_id=queued.regenerates or queued.user_message_id,
        code=why.code,
        message=why.message,
        idle=idle,
    )


def decide_delete(
    state: Conversation,
    cmd: DeleteConversation,
    now: int,
    new_id: NewId,
    unsent_ends: Sequence[UnsentEnd] = (),
) -> list[Event]:
    """The conversation's tombstone, once no turn runs or waits (the shell stops the
    running one and refuses the queue first). Nothing for a conversation that does
    not exist or was deleted already (a redelivered delete), nor while a turn still
    runs or waits: its tombstone would leave that turn open for ever, and unbilled.

    The tombstone names every turn the conversation had (an assistant message's id
    is its turn's): once the rest of the log is purged, the billing audit knows
    their charges by these ids. `unsent_ends`: the turn ends the webhooks have not
    delivered yet, content-free (actors.webhooks.unsent_ends), sent from the
    tombstone once the ends themselves are purged."""
    if not state.exists or state.active is not None or state.queue:
        return []
    return [
        ConversationDeleted(
            conversation_id=state.conversation_id,
            at=now,
            event_id=new_id(),
            user_id=cmd.user_id,
            command_id=cmd.command_id,
            project_id=state.project_id,
            turn_ids=[m.message_id for m in state.messages if m.role == "assistant"],
            unsent_ends=list(unsent_ends),
        )
    ]


def decide_tool_title(state: Conversation, title: str, now: int, new_id: NewId) -> Title:
    """A tool named the conversation (the `set_title` tool)."""
    return Title(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        title=title,
        source="tool",
        turn_id=state.active.turn_id if state.active else None,
    )


# ---------------------------------------------------------------- ending a turn


def decide_done(
    state: Conversation, stop_reason: str, totals: TurnTotals, now: int, new_id: NewId
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
        input_bytes=0 if totals.estimated else totals.input_bytes,
        history_omitted=_omitted(turn, totals),
        idle=not state.queue,
    )


def decide_failed(
    state: Conversation, code: str, message: str, totals: TurnTotals, now: int, new_id: NewId
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
        history_omitted=_omitted(turn, totals),
        idle=not state.queue,
    )


def decide_cancelled(
    state: Conversation, reason: str, totals: TurnTotals, now: int, new_id: NewId
) -> Cancelled:
    """Stopped by its user ("user") or by a newer message ("superseded"): the partial
    content is kept and every token consumed so far is counted."""
    turn = _require_active(state)
    return Cancelled(
        conversation_id=state.conversation_id,
        at=now,
        event_id=new_id(),
        turn_id=turn.turn_id,
        content=partial_content(state),
        reason=reason,
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        tokens_estimated=totals.estimated,
        history_omitted=_omitted(turn, totals),
        idle=not state.queue,
    )


def _omitted(turn: ActiveTurn, totals: TurnTotals) -> int:
    """The most earlier messages the turn's calls left out: never fewer than its first
    call left out (`started` says how many). Totals that do not know (a turn cancelled
    before its first call answered, an orphan's estimate, a turn ended before its
    call was sent) say 0."""
    return max(turn.history_omitted, totals.history_omitted)


def estimated_totals(state: Conversation) -> TurnTotals:
    """What the running turn consumed, as far as the log shows, when its worker died
    before the provider's usage arrived, at CHARS_PER_TOKEN and flagged as an
    estimate (a billed call is billed also then).

    Every model call sent the history (as a live turn without usage counts it: the
    same messages, system prompt and all), and each call after a tool round sent
    that round's calls and results too. A call is counted when the log shows it
    answered: each answer that asked for tools, and the last call if it wrote
    anything (or if it was the only one). Written: the text of every call and the
    tool calls the model wrote. (A live turn counts what it wrote in the model's
    deltas, which the log does not keep.) The history is what its first call sent:
    without the earlier messages `started` says it left out."""
    turn = _require_active(state)
    messages = without_oldest(
        build_history(history_of(state, upto=turn.user_message_id), personal=state.personal),
        turn.history_omitted,
    )
    history = sum(len(str(m.get("content") or "")) for m in messages)
    sent = added = 0
    for round_chars in turn.round_chars:  # the calls that asked for tools
        sent += history + added
        added += round_chars
    if not turn.round_chars or _wrote_after_tools(turn.last_piece):
        sent += history + added
    written = sum(len(text) for _, text in pieces_in_order(turn.last_piece)) + turn.call_chars
    return TurnTotals(
        input_tokens=math.ceil(sent / CHARS_PER_TOKEN),
        output_tokens=math.ceil(written / CHARS_PER_TOKEN),
        estimated=True,
    )


def _wrote_after_tools(last: Piece | None) -> bool:
    """Whether the call after the last tool round wrote anything (a tool call leaves a
    boundary, a piece of no kind, in the turn's pieces)."""
    node = last
    while node is not None and node.kind is not None:
        if node.text:
            return True
        node = node.previous
    return False


OrphanCause = Literal["worker_lost", "log_conflict", "log_unreadable"]


def decide_orphan_end(
    state: Conversation, now: int, new_id: NewId, cause: OrphanCause = "worker_lost"
) -> Failed:
    """A turn left open that no runner runs: ended with its partial content and the
    tokens the log shows it consumed (estimated), so what it used is billed.

    Why it was left: its worker is gone (`worker_lost`); another writer's entry
    in the conversation's log stopped it (`log_conflict`: the single-writer
    check); or an entry that cannot be read did (`log_unreadable`: the
    conversation takes no new work, but the turn it was running still ends).
    """
    message = {
        "worker_lost": "the worker running this turn stopped before it finished",
        "log_conflict": "another writer appended to this conversation's log while the turn "
        "ran; the turn was stopped",
        "log_unreadable": f"this conversation's log holds an entry that cannot be read "
        f"({state.broken}); the turn was stopped",
    }[cause]
    return decide_failed(state, cause, message, estimated_totals(state), now, new_id)


# ---------------------------------------------------------------- tools


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
