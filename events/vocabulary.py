"""The vocabulary of parley: every command and every event, declared once.

These Structs are the wire format of the event log (JetStream CHAT_EVT) and of
the command stream (CHAT_CMD). A stored event is never rewritten, so the rules
for changing this file are strict:

- a new field gets a default, so events written before it still decode;
- never rename or retype a stored field: add a new one beside it;
- never `array_like=True` or `forbid_unknown_fields=True` here: an older reader
  must skip fields a newer writer added;
- a new event is a new tagged Struct added to `AnyEvent`;
- `tests/data/events_v1.jsonl` holds a frozen sample of every event as first
  written; `tests/test_vocabulary.py` decodes it, so a breaking change fails loudly.

`schema` on every event says which shape the writer used; readers branch on it
only if a field ever changes meaning (it has not yet).

Nothing here does I/O, reads a clock or makes ids: callers pass them in.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1

ChunkKind = Literal["thinking", "answer"]
BlockRole = Literal["thinking", "assistant"]
OnBusy = Literal["reject", "enqueue", "interrupt"]
TitleSource = Literal["auto", "tool", "user", "existing"]


class ContentBlock(msgspec.Struct, frozen=True):
    """One block of stored assistant content: merged consecutive chunks of one role."""

    role: BlockRole
    content: str


class Prices(msgspec.Struct, frozen=True):
    """Prices in force for a turn, credits per million tokens."""

    input_price: float = 0.0
    output_price: float = 0.0


# ---------------------------------------------------------------- events


class Event(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    conversation_id: str
    at: int  # ns since epoch, from the injected clock
    event_id: str
    schema: int = SCHEMA_VERSION


class ConversationCreated(Event, tag="conversation_created", frozen=True):
    user_id: str
    project_id: str | None = None
    title: str = ""
    model: str | None = None


class UserMessage(Event, tag="user_message", frozen=True):
    """A user message was accepted. Its turn starts now, or later when it was
    queued behind a running turn (`on_busy: enqueue`): `started` names it then."""

    message_id: str
    content: str
    user_id: str = ""
    parent_message_id: str | None = None
    version_group_id: str = ""
    version_number: int = 1
    # the command that produced this message (its idempotency key): a redelivered
    # command finds its own message in the log and is not applied twice
    command_id: str = ""
    model: str | None = None  # the model asked for, for a turn that starts later
    interrupts: bool = False  # on_busy=interrupt: answered before anything queued
    # the client's idempotency key, hashed with its user and request (TurnRequest)
    request_key: str = ""
    # An edit replaces these messages (the old version and what followed it) as
    # the latest; `fork_origin` is the version the new branch grew from.
    supersedes: list[str] = []
    fork_origin: str | None = None


class AnswerRequested(Event, tag="answer_requested", frozen=True):
    """A new answer to an existing user message was asked for (regenerate); its
    turn starts now, or later when queued behind a running turn."""

    user_message_id: str
    regenerates: str  # the assistant message whose group gets a new version
    version_group_id: str
    command_id: str
    user_id: str = ""
    model: str | None = None
    interrupts: bool = False
    request_key: str = ""  # as UserMessage's


class Started(Event, tag="started", frozen=True):
    turn_id: str  # also the assistant message id
    user_message_id: str
    model: str
    model_version_id: str = ""
    prices: Prices = Prices()
    max_tokens: int | None = None
    temperature: float = 0.7
    parent_message_id: str | None = None
    version_group_id: str = ""
    version_number: int = 1
    command_id: str = ""  # the request (user_message or answer_requested) this turn answers
    supersedes: list[str] = []  # a regenerated answer replaces these as the latest
    fork_origin: str | None = None
    user_id: str = ""  # who asked
    payer: str | None = None  # the account billed for this turn ("project:<id>" / "user:<id>")
    # how many earlier messages the turn's first model call left out of its history, the
    # oldest first, for the rest to fit in the model's context window
    history_omitted: int = 0


class Chunk(Event, tag="chunk", frozen=True):
    turn_id: str
    kind: ChunkKind
    text: str


class ToolCall(Event, tag="tool_call", frozen=True):
    turn_id: str
    call_id: str
    name: str
    arguments: str  # JSON text as the model produced it (may be invalid JSON)


class ToolResult(Event, tag="tool_result", frozen=True):
    turn_id: str
    call_id: str
    name: str = ""
    result: str | None = None
    error: str | None = None
    duration_ms: float = 0.0


class ContentPart(Event, tag="content_part", frozen=True):
    """A piece of a turn's final content, when the whole would not fit in one event.

    Written just before the turn's end event, which then carries `content=[]` and
    `content_parts` = how many. Pieces of one block share `block`; `index` orders
    them all.
    """

    turn_id: str
    index: int
    block: int
    role: BlockRole
    text: str


class Done(Event, tag="done", frozen=True):
    turn_id: str
    content: list[ContentBlock]
    stop_reason: str
    input_tokens: int
    output_tokens: int
    tokens_estimated: bool = False
    content_parts: int = 0  # > 0: the content is in that many content_part events before this
    # The bytes of what the model calls sent (messages and tool schemas) for the
    # input_tokens the provider reported (0: not known, or the tokens were estimated):
    # the next turn's history is measured at this rate (actors.content.tokens_per_byte).
    input_bytes: int = 0
    # the most earlier messages any model call of the turn left out of its history
    # (more than `started` says when the provider refused the first call as too long)
    history_omitted: int = 0
    # No other turn waited to run when it ended (the actor's state as the end was
    # decided, so every viewer, on any edge, reads the same from the log: a viewer of
    # the whole conversation ends its stream here or goes on); None in logs written
    # before it was recorded. Every turn end carries it.
    idle: bool | None = None


class Cancelled(Event, tag="cancelled", frozen=True):
    turn_id: str
    content: list[ContentBlock]
    reason: str = "user"
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_estimated: bool = False
    content_parts: int = 0
    history_omitted: int = 0  # as a `done`'s
    idle: bool | None = None  # as a `done`'s


class Failed(Event, tag="failed", frozen=True):
    turn_id: str
    code: str
    message: str
    content: list[ContentBlock] = []
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_estimated: bool = False
    content_parts: int = 0
    history_omitted: int = 0  # as a `done`'s
    idle: bool | None = None  # as a `done`'s


class BillingRejected(Event, tag="billing_rejected", frozen=True):
    turn_id: str
    user_message_id: str
    account: str
    needed: int  # micro-credits
    available: int
    idle: bool | None = None  # as a `done`'s


# The longest title a user (the edge) or a tool (`set_title`) may set, and the most
# of one a turn announces again.
TITLE_LIMIT = 200


class Title(Event, tag="title", frozen=True):
    title: str
    source: TitleSource
    turn_id: str | None = None
    # the rename that set it (source "user"): a rename delivered again once a later
    # one landed (its acknowledgement lost) must not bring its name back
    command_id: str = ""


class CommandRejected(Event, tag="command_rejected", frozen=True):
    """A command that started no turn, and why: a viewer waiting for its answer
    gets an end instead of waiting for ever, and a redelivery is not refused twice."""

    command_id: str
    code: str
    message: str
    message_id: str = ""
    turn_id: str | None = None  # code "busy": the turn that is running
    # No turn ran or waited to run when it was refused (the actor's state, so a
    # viewer reads the same from the log live or later); None in logs written
    # before it was recorded.
    idle: bool | None = None
    # code "repeated": the command of the earlier request this one repeats (its
    # idempotency key again, the edge's record of it lost); `message_id` is that
    # request's message
    repeats: str = ""


class UnsentEnd(msgspec.Struct, frozen=True):
    """A turn end a deleted conversation's tombstone carries for the turn-end webhooks:
    one their dispatcher had not acknowledged yet, without its content (the end's
    `content` empty, a failure's `message` too), and its position in the log."""

    seq: int
    end: Done | Cancelled | Failed | BillingRejected


class ConversationDeleted(Event, tag="conversation_deleted", frozen=True):
    """The conversation was deleted: its tombstone, the last entry its subject ever gets.

    Right after it is appended, every earlier entry of the subject is purged (the
    conversation's content is erased, not hidden); this event is what stays. It
    holds no content: who deleted it and when, the command that did, the
    conversation's project, and the ids of its turns, so that the billing audit
    knows a charge on an account's subject for one of them as a turn erased with
    its conversation (its tokens and prices are gone with it). The charges
    themselves, and every other account event, stay on the accounts' subjects."""

    user_id: str  # who deleted it
    command_id: str
    project_id: str | None = None
    turn_ids: list[str] = []
    # The conversation's turn ends that the webhooks had not delivered yet, without
    # their content: the purge takes the ends themselves, and a receiver still hears
    # of every turn (actors.webhooks). Empty when no webhooks are set up.
    unsent_ends: list[UnsentEnd] = []


class CreditsGranted(Event, tag="credits_granted", frozen=True):
    """Written to the account's subject (`conversation_id` is empty)."""

    account: str  # "user:<id>" or "project:<id>"
    amount: int  # micro-credits
    note: str = ""
    granted_by: str = ""


# ---------------------------------------------------------------- accounts and projects
#
# An account (a user's or a project's) is written like a conversation: its own
# subject (`chat.evt.account.<kind>.<id>`) and single-writer appends, so two
# turns can never both reserve the last credits, and every balance can be
# recomputed from the log alone. A project's membership lives on its own
# subject too (`chat.evt.project.<id>`). `conversation_id` names the turn's
# conversation where there is one, and is empty otherwise.


class CreditsReserved(Event, tag="credits_reserved", frozen=True):
    """A turn's estimated cost held back before the model is called (the pre-flight)."""

    account: str
    turn_id: str
    amount: int  # micro-credits: 500 input + 250 output tokens at the prices in force


class TurnCharged(Event, tag="turn_charged", frozen=True):
    """A turn's real cost, at the prices recorded in its `started`; its reservation ends.

    Exactly one per billed turn (`done`, `cancelled`, `failed`), also when it
    consumed nothing (`cost` 0: the reservation is simply released). A cost
    above what the account had makes its balance negative: debt, never dropped.
    """

    account: str
    turn_id: str
    cost: int  # micro-credits
    reserved: int
    input_tokens: int
    output_tokens: int
    input_price: float
    output_price: float
    tokens_estimated: bool = False
    end: str = "done"  # done | cancelled | failed
    user_id: str = ""  # who asked for the turn
    project_id: str | None = None  # the conversation's project


class ProjectCreated(Event, tag="project_created", frozen=True):
    project_id: str
    name: str
    created_by: str  # the first member


class MemberAdded(Event, tag="member_added", frozen=True):
    project_id: str
    user_id: str
    added_by: str


AnyEvent = (
    ConversationCreated
    | UserMessage
    | Started
    | Chunk
    | ToolCall
    | ToolResult
    | Done
    | Cancelled
    | Failed
    | BillingRejected
    | Title
    | CreditsGranted
    | CommandRejected
    | ContentPart
    | AnswerRequested
    | CreditsReserved
    | TurnCharged
    | ProjectCreated
    | MemberAdded
    | ConversationDeleted
)

TurnEnd = Done | Cancelled | Failed | BillingRejected


def event_type(event: Event) -> str:
    """The wire name of an event (its tag)."""
    tag: Any = type(event).__struct_config__.tag
    return str(tag)


# ---------------------------------------------------------------- commands


class Command(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    conversation_id: str
    command_id: str  # the idempotency key, also sent as Nats-Msg-Id
    user_id: str
    at: int
    # the HTTP request that sent it (api/request_ids.py), for the worker's log lines;
    # "" from an edge older than it
    request_id: str = ""


class TurnRequest(Command, frozen=True, kw_only=True):
    """A command that asks for a turn."""

    # the log's end as the edge read it before publishing: where this request's turn
    # begins at the earliest (the actor announces it from there)
    after: int | None = None
    # With an idempotency key: a hash of the user, the key and what is asked. The
    # edge keeps a key's request in Redis; this copy in the log lets the actor know
    # the same request again for `request_key_ttl_s` when Redis lost it (flushed,
    # restarted empty, evicted), so a retry is never a second turn.
    request_key: str = ""
    request_key_ttl_s: int = 0


class SendMessage(TurnRequest, tag="send_message", frozen=True):
    message_id: str
    content: str
    model: str | None = None
    on_busy: OnBusy = "reject"


class EditMessage(TurnRequest, tag="edit_message", frozen=True):
    """A new version of a user message, and a new turn that answers it."""

    message_id: str  # the new version's id
    edits: str  # the id of the user message (any version) being edited
    content: str
    model: str | None = None
    on_busy: OnBusy = "reject"


class Regenerate(TurnRequest, tag="regenerate", frozen=True):
    """A new version of an assistant answer: a new turn for the same user message."""

    # the assistant message (any version) to answer again; "": the latest answer
    message_id: str
    model: str | None = None
    on_busy: OnBusy = "reject"


class CancelTurn(Command, tag="cancel_turn", frozen=True):
    """Stop the running turn (the one named, or whichever runs when none is)."""

    turn_id: str | None = None


class RenameConversation(Command, tag="rename_conversation", frozen=True):
    """The user names the conversation: a `title` event with source "user"."""

    title: str


class DeleteConversation(Command, tag="delete_conversation", frozen=True):
    """Delete the conversation: its running turn is stopped (and billed), its queued
    turns refused, a `conversation_deleted` tombstone appended, and every earlier
    entry of its subject purged from the log."""


AnyCommand = (
    SendMessage | EditMessage | Regenerate | CancelTurn | RenameConversation | DeleteConversation
)
TurnCommand = SendMessage | EditMessage | Regenerate
