"""The routes that ask for a turn or stop one: messages, edits, regenerations, cancel.

Each request becomes a command on the conversation's partition of CHAT_CMD,
published with its idempotency key as `Nats-Msg-Id`. Whether the conversation
is busy is decided by its actor, from its state, not here: the edge waits
(briefly) for the actor's answer in the log, the request accepted
(`user_message`, `answer_requested`) or refused (`command_rejected`), and
answers 409 to a refusal for being busy. Then it streams the turn (SSE) or
answers 202.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import msgspec
import nats.errors
from aiohttp import web

from api.access import owned_conversation
from api.context import (
    COMMANDS,
    CONFIG,
    HEADERS,
    HUBS,
    LOG,
    NATS,
    REDIS,
    STORE,
    claims_of,
    wants_json,
)
from api.errors import POSTGRES_AWAY, UNAVAILABLE, ApiError, bad_request, not_found
from api.hub import Delivery, Subscription, opens_turn, read_range, watch
from api.limits import at_turns_cap, hold_turn, refuse_at_cap
from api.responses import CancelAnswer, Deleted, Renamed, TurnAccepted, answer
from api.sse import Envelope, Position, parse_position
from api.streaming import PendingCommand, TurnFilter, open_sse, running_turn, stream_log
from api.validation import (
    Content,
    IdempotencyKey,
    InvalidBody,
    ModelName,
    decode_body,
    decode_params,
    refused,
)
from events.codec import encode
from events.errors import EventLogError
from events.ids import new_id
from events.subjects import CMD_STREAM, command_subject, valid_id
from events.tracing import REQUEST_ID
from events.turns import idempotency_prefix
from events.vocabulary import (
    TITLE_LIMIT,
    AnswerRequested,
    AnyCommand,
    CancelTurn,
    CommandRejected,
    ConversationCreated,
    ConversationDeleted,
    DeleteConversation,
    EditMessage,
    OnBusy,
    Regenerate,
    RenameConversation,
    SendMessage,
    Started,
    TurnCommand,
    UserMessage,
)
from projections.store import ReadStore, bounded

T = TypeVar("T")
# A key is reserved this long before its command is published, then kept for
# the full TTL: a crash in between frees it within a minute, not a day.
_RESERVE_S = 60
# how long a command's publish waits for CHAT_CMD's ack (nats.py's own default)
COMMAND_PUBLISH_WAIT_S = 5.0


class PostMessage(msgspec.Struct, frozen=True):
    content: Content
    model: ModelName | None = None
    idempotency_key: IdempotencyKey | None = None
    on_busy: OnBusy = "reject"


class RenameBody(msgspec.Struct, frozen=True):
    title: Annotated[
        str,
        refused(
            f"title must be 1-{TITLE_LIMIT} characters, not blank",
            min_length=1,
            max_length=TITLE_LIMIT,
            pattern=r"\S",
            description="the conversation's new name",
        ),
    ]


class EditBody(msgspec.Struct, frozen=True):
    content: Content
    model: ModelName | None = None
    idempotency_key: IdempotencyKey | None = None
    on_busy: OnBusy = "reject"


class RegenerateBody(msgspec.Struct, frozen=True):
    model: ModelName | None = None
    idempotency_key: IdempotencyKey | None = None
    on_busy: OnBusy = "reject"


class IdempotencyRecord(msgspec.Struct, frozen=True):
    message_id: str
    command_id: str
    after: int
    digest: str


class Decision(msgspec.Struct, frozen=True):
    """What the actor made of a request: accepted, refused, or not known yet."""

    accepted: bool = False
    rejected: CommandRejected | None = None
    # the conversation was deleted before the actor took the request: it was dropped
    deleted: bool = False


# A body larger than this is decoded and checked in a thread, not on the event loop:
# a pathological 256 KiB one (a hundred thousand empty arrays) took 90 ms to check,
# and a request may not stall every other stream for that long.
DECODE_ELSEWHERE_BYTES = 64 * 1024


async def read_json(request: web.Request, kind: type[T], *, empty_ok: bool = False) -> T:
    body = await read_body(request)
    if empty_ok and not body.strip():
        body = b"{}"
    try:
        if len(body) > DECODE_ELSEWHERE_BYTES:
            return await asyncio.to_thread(decode_body, body, kind)
        return decode_body(body, kind)
    except InvalidBody as err:
        raise ApiError(err.status, err.code, err.message) from err


async def read_body(request: web.Request) -> bytes:
    """The request's body, within the size and time limits: 413, 408 or 400 else."""
    declared, most = request.content_length, request.client_max_size
    if declared is not None and declared > most:
        # refused before a byte of it is read: not after the body came, or timed out
        raise ApiError(
            413, "body_too_large", f"request body of {declared} bytes; at most {most}", close=True
        )
    timeout = request.app[CONFIG].limits.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            body = await request.read()
    except TimeoutError as err:
        # a client trickling its body must not hold a handler (and its memory) for long
        raise ApiError(
            408,
            "body_timeout",
            f"the request body did not arrive within {timeout:g} s",
            close=True,
        ) from err
    except ConnectionResetError as err:
        # the client went away mid-body: nobody reads an answer, and it is no fault here
        raise ApiError(
            400, "body_incomplete", "the connection closed before the body arrived", close=True
        ) from err
    return body


def read_params(source: Mapping[str, str], kind: type[T]) -> T:
    """A query's (or headers') parameters as `kind`; a 400 naming the bad one."""
    try:
        return decode_params(source, kind)
    except InvalidBody as err:
        raise ApiError(err.status, err.code, err.message) from err


# ---------------------------------------------------------------- routes


async def post_message(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    body = await read_json(request, PostMessage)
    check_text(request, body.content)
    _check_common(request, body.model)

    def build(record: IdempotencyRecord) -> TurnCommand:
        return SendMessage(
            conversation_id=header.conversation_id,
            command_id=record.command_id,
            user_id=claims_of(request).sub,
            at=time.time_ns(),
            message_id=record.message_id,
            content=body.content,
            model=body.model,
            on_busy=body.on_busy,
        )

    return await _submit(
        request, header, body.idempotency_key, ("send", body.content, body.model), build
    )


async def edit_message(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    edited = _message_id(request)
    body = await read_json(request, EditBody)
    check_text(request, body.content)
    _check_common(request, body.model)

    def build(record: IdempotencyRecord) -> TurnCommand:
        return EditMessage(
            conversation_id=header.conversation_id,
            command_id=record.command_id,
            user_id=claims_of(request).sub,
            at=time.time_ns(),
            message_id=record.message_id,
            edits=edited,
            content=body.content,
            model=body.model,
            on_busy=body.on_busy,
        )

    return await _submit(
        request, header, body.idempotency_key, ("edit", edited, body.content, body.model), build
    )


async def regenerate(request: web.Request) -> web.StreamResponse:
    header = await owned_conversation(request, request.match_info["id"])
    answer = _message_id(request)
    body = await read_json(request, RegenerateBody, empty_ok=True)
    _check_common(request, body.model)

    def build(record: IdempotencyRecord) -> TurnCommand:
        return Regenerate(
            conversation_id=header.conversation_id,
            command_id=record.command_id,
            user_id=claims_of(request).sub,
            at=time.time_ns(),
            message_id=answer,
            model=body.model,
            on_busy=body.on_busy,
        )

    return await _submit(
        request, header, body.idempotency_key, ("regenerate", answer, body.model), build
    )


async def cancel_turn(request: web.Request) -> web.Response:
    """Stop the running turn. Idle: a plain answer that nothing was running."""
    header = await owned_conversation(request, request.match_info["id"])
    conversation_id = header.conversation_id
    turn_id: str | None = None
    try:
        _, active = await running_turn(request.app, conversation_id)
    except UNAVAILABLE:
        idle = False  # Redis is away: let the actor decide what runs
    else:
        idle = active is None
        # a record without a turn id: a request accepted, its turn about to start
        turn_id = (active.turn_id or None) if active else None
    if idle:
        # No record, but the log shows a turn under way: the record is a hint that
        # Redis may have lost (FLUSHALL, an eviction, a restart without its data; the
        # worker writes it again within its heartbeat). The log is the truth: the
        # actor decides, as when Redis is away.
        last = await request.app[LOG].last(conversation_id)
        idle = last is None or not opens_turn(last.event)
    if idle:
        return answer(CancelAnswer(cancelled=False, turn_id=None, message="no turn is running"))
    command = CancelTurn(
        conversation_id=conversation_id,
        command_id=new_id(),
        user_id=claims_of(request).sub,
        at=time.time_ns(),
        turn_id=turn_id,
    )
    await publish_command(request, command)
    return answer(CancelAnswer(cancelled=True, turn_id=turn_id), status=202)


async def rename_conversation(request: web.Request) -> web.Response:
    """Name the conversation: a `title` event (source "user") that viewers get, and that
    later turns announce rather than replace. The conversation's actor appends it,
    beside a running turn if one runs; the answer waits a moment for the read models
    to show it, as a create waits for its row: a frontend that renames and then
    reads the list back must not be shown the old name."""
    header = await owned_conversation(request, request.match_info["id"])
    body = await read_json(request, RenameBody)
    title = body.title.strip()
    command = RenameConversation(
        conversation_id=header.conversation_id,
        command_id=new_id(),
        user_id=claims_of(request).sub,
        at=time.time_ns(),
        title=title,
    )
    await publish_command(request, command)
    headers = request.app[HEADERS]

    async def titled(store: ReadStore) -> bool:
        if headers.gone(header.conversation_id):
            return True  # deleted as it was renamed: the actor drops the rename
        row = await store.conversation(header.conversation_id)
        return row is not None and row.title == title

    # not shown in time (the log, the worker or Postgres slow, another rename after
    # it): the answer is the same, and the `title` event follows on the stream
    await shown_within(request, titled)
    if headers.gone(header.conversation_id):
        # the worker's announcement came (the conversation was deleted through another
        # edge as this request passed): 404, as every request for it is from now on
        raise not_found("conversation")
    return answer(Renamed(id=header.conversation_id, title=title), status=202)


async def delete_conversation(request: web.Request) -> web.Response:
    """Delete the conversation, for whoever may write it: its actor stops the running
    turn (billed as a Stop is), refuses the queued ones, appends the tombstone and
    erases the rest of its log. The answer waits a moment for the read models to
    drop it (a frontend that deletes and reads the list back must not see it), then
    answers anyway: the command is in CHAT_CMD and is carried out. From now on this
    edge answers 404 for it; the others once the worker announces it, or the log's
    tombstone tells them."""
    header = await owned_conversation(request, request.match_info["id"])
    command = DeleteConversation(
        conversation_id=header.conversation_id,
        command_id=new_id(),
        user_id=claims_of(request).sub,
        at=time.time_ns(),
    )
    await publish_command(request, command)
    request.app[HEADERS].forget(header.conversation_id)

    async def dropped(store: ReadStore) -> bool:
        return await store.conversation(header.conversation_id) is None

    await shown_within(request, dropped)
    return answer(Deleted(id=header.conversation_id, deleted=True), status=202)


async def shown_within(request: web.Request, shown: Callable[[ReadStore], Awaitable[bool]]) -> bool:
    """Read-your-writes for the common case: whether the read models show what a
    request just wrote (`shown`) within a moment, a create's wait; False when not, or
    when Postgres does not answer."""
    deadline = time.monotonic() + request.app[CONFIG].create_wait_s
    store = request.app[STORE]
    while (left := deadline - time.monotonic()) > 0:
        try:
            if await bounded(shown(store), left):
                return True
        except POSTGRES_AWAY:  # TimeoutError too
            return False
        await asyncio.sleep(0.01)
    return False


async def publish_command(request: web.Request, command: AnyCommand) -> int:
    """Put a command on its conversation's partition of CHAT_CMD; its position there.

    Refused at once (503) while NATS is away: the client would buffer it and send
    it once reconnected, long after this request answered, and a client that
    tried again (as told) would find its request applied twice."""
    if not request.app[NATS].is_connected:
        raise ApiError(
            503, "unavailable", "the event log (NATS) is unavailable; try again", retry_after=1
        )
    if request_id := REQUEST_ID.get():
        command = msgspec.structs.replace(command, request_id=request_id)
    try:
        return await request.app[COMMANDS].publish(
            command_subject(command.conversation_id),
            encode(command),
            {"Nats-Expected-Stream": CMD_STREAM, "Nats-Msg-Id": command.command_id},
            COMMAND_PUBLISH_WAIT_S,
        )
    except (nats.errors.TimeoutError, TimeoutError) as err:
        # Sent, but never acknowledged (a NATS that hangs while connected): it may
        # still be stored and run. Not "try again": that could run it twice.
        raise ApiError(
            504,
            "outcome_unknown",
            f"NATS did not confirm the {_UNCONFIRMED.get(type(command), _UNCONFIRMED_COMMAND)}",
            retry_after=1,
        ) from err


# What a 504 `outcome_unknown` says of each command: a request for a turn is applied
# once only when sent again with its key; a rename has none, and needs none (sent
# twice, the second finds the name in force and adds nothing); a cancel sent again
# could stop a turn started since.
_UNCONFIRMED_COMMAND = f"command within {COMMAND_PUBLISH_WAIT_S:g} s; it may still be applied"
_UNCONFIRMED: dict[type[AnyCommand], str] = {
    **dict.fromkeys(
        (SendMessage, EditMessage, Regenerate),
        f"message within {COMMAND_PUBLISH_WAIT_S:g} s; it may still be applied. Send it "
        "again with the same idempotency_key to have it applied exactly once",
    ),
    RenameConversation: f"rename within {COMMAND_PUBLISH_WAIT_S:g} s; it may still be "
    "applied. Sending it again is safe: a rename to the name in force changes nothing",
    DeleteConversation: f"delete within {COMMAND_PUBLISH_WAIT_S:g} s; it may still be "
    "applied. Sending it again is safe: a conversation is deleted once",
    CancelTurn: f"cancel within {COMMAND_PUBLISH_WAIT_S:g} s; it may still be applied: "
    "the conversation's active_turn shows whether its turn still runs",
}


# ---------------------------------------------------------------- submitting


class RequestRepeated(Exception):
    """`submit(..., follow_repeat=False)`: the actor knew the request from the log (its
    key's record in Redis was lost), so it reached parley before; `record` is the
    earlier request's, kept again under its key."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__(record.command_id)
        self.record = record


class Submitted(msgspec.Struct, frozen=True):
    """A request published and accepted (or not yet answered) by its actor."""

    record: IdempotencyRecord
    command_seq: int  # its position in CHAT_CMD
    accepted: bool
    fresh: bool  # a new request (not a repeated idempotency key): record.after was just read


async def submit(
    request: web.Request,
    conversation_id: str,
    idempotency_key: str | None,
    digest_of: tuple[Any, ...],
    build: Callable[[IdempotencyRecord], TurnCommand],
    *,
    follow_repeat: bool = True,
) -> Submitted:
    """Publish the request's command and wait (briefly) for its actor's decision; a
    refusal is raised as the error the client gets (409 busy, 404, ...). A repeat of
    a keyed request is answered with the earlier request, or, with `follow_repeat`
    false, raised as RequestRepeated (the caller wanted to know whether it was sent)."""
    digest = request_digest(digest_of)
    # At the turns cap a new message waits up to a second for a slot before its 429,
    # with its key not taken yet. Taken, a retry with it meanwhile (a client whose
    # connection dropped) was a repeat of a message whose turn counts already, which
    # it did not: it started a turn over the cap; and the first one's 429 then freed
    # the key of that running turn, so the next retry was refused as a new message.
    waited = False
    if at_turns_cap(request) and (
        idempotency_key is None
        or await earlier_request(request, conversation_id, idempotency_key) is None
    ):
        await refuse_at_cap(request)
        waited = True
    record, fresh = await _idempotency(request, conversation_id, idempotency_key, digest)
    if fresh and not waited:  # not at the cap (no wait), or the key's record just lapsed
        try:
            await refuse_at_cap(request)
        except ApiError:
            # nothing was sent: the key is free for the retry the 429 asks for
            await _forget_idempotency(request, conversation_id, idempotency_key)
            raise
    command = msgspec.structs.replace(build(record), after=record.after)
    if idempotency_key is not None:
        command = msgspec.structs.replace(
            command,
            request_key=request_key(claims_of(request).sub, idempotency_key, digest),
            request_key_ttl_s=request.app[CONFIG].idempotency_ttl_s,
        )
    # Published again for a repeated key too: whether or not the first request
    # got as far as publishing, the command is applied exactly once in effect.
    # Nats-Msg-Id drops a copy within the duplicate window, and the actor drops
    # a later one by its command_id in the log.
    try:
        command_seq = await publish_command(request, command)
    except BaseException as err:
        if isinstance(err, ApiError) and err.code == "outcome_unknown":
            # It may land: the key keeps its command, so a retry with it is the same
            # command (Nats-Msg-Id, and the actor's commands seen), applied once.
            await _keep_idempotency(request, conversation_id, idempotency_key, record)
        elif fresh:  # not sent: a retry with the same key must be free to send it
            await _forget_idempotency(request, conversation_id, idempotency_key)
        raise
    await _keep_idempotency(request, conversation_id, idempotency_key, record)

    decision = await _decision(request, conversation_id, record, fresh)
    if decision.rejected is not None and decision.rejected.repeats:
        # The key's record was lost and the actor knew the request from the log: this
        # is a repeat of it, answered as one (its stream, its message id).
        record = await _earlier(
            request, conversation_id, idempotency_key, decision.rejected, digest
        )
        fresh = False
        if not follow_repeat:
            raise RequestRepeated(record)
        decision = await _decision(request, conversation_id, record, fresh)
    if decision.deleted:
        # Dropped by the actor (nothing is appended after a tombstone): no turn will
        # answer it, and the conversation is 404 from now on, here as everywhere.
        await _forget_idempotency(request, conversation_id, idempotency_key)
        request.app[HEADERS].forget(conversation_id)
        raise not_found("conversation")
    if decision.rejected is not None:
        # A refused request had no effect: its key is free again, so the retry the
        # refusal asks for (later, or with another on_busy) is not refused for ever.
        await _forget_idempotency(request, conversation_id, idempotency_key)
        raise refusal_error(decision.rejected)
    # counts against the user's active turns until this request's turn ends
    hold_turn(request, conversation_id, record.command_id, record.after, command_seq)
    return Submitted(
        record=record, command_seq=command_seq, accepted=decision.accepted, fresh=fresh
    )


async def _submit(
    request: web.Request,
    header: ConversationCreated,
    idempotency_key: str | None,
    digest_of: tuple[Any, ...],
    build: Callable[[IdempotencyRecord], TurnCommand],
) -> web.StreamResponse:
    conversation_id = header.conversation_id
    done = await submit(request, conversation_id, idempotency_key, digest_of, build)
    record = done.record
    if wants_json(request):
        return answer(
            TurnAccepted(
                message_id=None if digest_of[0] == "regenerate" else record.message_id,
                command_id=record.command_id,
                conversation_id=conversation_id,
                after=record.after,
                accepted=done.accepted,
            ),
            status=202,
        )
    turn = TurnFilter(record.command_id, record.message_id)
    command: PendingCommand | None = PendingCommand(stream_seq=done.command_seq)
    position = Position(seq=record.after)
    if not done.fresh:
        resumed = await _resumed(request, conversation_id, position, turn)
        if resumed is None:  # it saw its turn to the end: nothing more will come
            return web.Response(status=204)
        position = resumed
        if turn.turn_id is not None:
            command = None  # its turn began before the resumed position: nothing to wait for
    response = await open_sse(request)
    await stream_log(
        request,
        response,
        conversation_id,
        position,
        turn=turn,
        command=command,
        fresh=done.fresh,
    )
    if turn.repeated is None:
        return response
    # The actor refused it as a repeat after `submit` stopped waiting for its answer
    # (no worker up for a while): answered as `submit` answers a repeat, with the
    # earlier request's turn, on the same stream.
    record = await _earlier(request, conversation_id, idempotency_key, turn.repeated, record.digest)
    earlier = TurnFilter(record.command_id, record.message_id)
    return await stream_log(
        request, response, conversation_id, Position(seq=record.after), turn=earlier
    )


async def resume_position(request: web.Request, conversation_id: str, raw: str) -> Position:
    """A client's resume id (`Last-Event-ID`, `?after=`) as a position in the
    conversation: 400 `bad_position` for one that is not an id, or is beyond its end."""
    position = parse_position(raw)
    if position is None:
        raise bad_request(f"not an event id: {raw!r}", "bad_position")
    last = await request.app[LOG].last_seq(conversation_id)
    if position.seq > last:
        raise bad_request(
            f"event id {raw} is beyond the end of this conversation ({last})", "bad_position"
        )
    return position


async def _resumed(
    request: web.Request, conversation_id: str, start: Position, turn: TurnFilter
) -> Position | None:
    """Where a repeated request's stream goes on: after its `Last-Event-ID`, if it sent one;
    None when that id is at its turn's `done` or later (204: nothing more will come).

    The same POST sent again with its key is a reconnect (fetch-based SSE
    clients resume a POST so): its turn's events up to the last id it saw are
    not sent twice. What lies between is shown to `turn`, which learns there
    which turn answers the request."""
    raw = request.headers.get("Last-Event-ID")
    if not raw:
        return start
    seen = await resume_position(request, conversation_id, raw)
    if seen.seq <= start.seq:
        return start
    async for stored in read_range(request.app[LOG], conversation_id, start.seq, seen.seq):
        if turn.admit(stored):
            delivery = Delivery.of(stored)
            if delivery.ends_turn and not delivery.wanted_by(seen):
                return None
    return seen


class _DecisionWatcher(Subscription):
    """Waits, through the conversation's hub, for the actor's answer to one request."""

    __slots__ = ("command_id", "rejected")

    def __init__(self, position: Position, command_id: str) -> None:
        super().__init__(position)
        self.command_id = command_id
        self.rejected: CommandRejected | None = None

    def take(self, delivery: Delivery) -> None:
        event = delivery.stored.event
        if isinstance(event, CommandRejected) and event.command_id == self.command_id:
            self.rejected = event
            self.end("rejected")
        elif (
            isinstance(event, UserMessage | AnswerRequested | Started)
            and event.command_id == self.command_id
        ):
            self.end("accepted")
        elif isinstance(event, ConversationDeleted):
            # the tombstone before any answer: the actor drops the request
            self.end("deleted")

    def take_stall(self, error: Envelope) -> None:
        pass  # a watcher with no turn: nothing to stall


async def _decision(
    request: web.Request, conversation_id: str, record: IdempotencyRecord, fresh: bool
) -> Decision:
    """The actor's answer to the request, read from the log, or Decision() after a while
    (no worker up yet: the request waits in CHAT_CMD and its stream waits with it).

    Read through the conversation's hub, which the turn's stream then joins too: one
    subscription per conversation, not one consumer per request. A new request's
    `after` was read from the log's end a moment ago: a hub it starts starts there.
    """
    watcher = _DecisionWatcher(Position(seq=record.after), record.command_id)
    head = record.after if fresh else None
    try:
        async with asyncio.timeout(request.app[CONFIG].decision_wait_s):
            outcome = await watch(request.app[HUBS], conversation_id, watcher, head)
    except TimeoutError:
        # Published after a tombstone this watcher started past (the edge had not
        # heard of the deletion yet): dropped, and no answer ever comes.
        try:
            last = await request.app[LOG].last(conversation_id)
        except EventLogError:
            return Decision()  # not known: the request waits in CHAT_CMD, as it would
        return Decision(deleted=last is not None and isinstance(last.event, ConversationDeleted))
    if outcome == "deleted":
        return Decision(deleted=True)
    if outcome == "rejected":
        return Decision(rejected=watcher.rejected)
    return Decision(accepted=outcome == "accepted")


async def _earlier(
    request: web.Request,
    conversation_id: str,
    key: str | None,
    repeated: CommandRejected,
    digest: str,
) -> IdempotencyRecord:
    """The record of the request a `repeated` refusal names, as the edge had kept it,
    kept again under `key`: its command and message; its turn is looked for from the
    conversation's start (the position it was sent at was in the record that was lost)."""
    first = await request.app[LOG].first(conversation_id)
    record = IdempotencyRecord(
        message_id=repeated.message_id,
        command_id=repeated.repeats,
        after=0 if first is None else first.seq - 1,
        digest=digest,
    )
    await _keep_idempotency(request, conversation_id, key, record)
    return record


def refusal_error(rejected: CommandRejected) -> ApiError:
    status = {"busy": 409, "conversation_unreadable": 409, "not_found": 404}.get(rejected.code, 409)
    error = ApiError(status, rejected.code, rejected.message)
    if rejected.code == "busy":
        # null between two queued turns: the next has no id until it starts
        error.extra["turn_id"] = rejected.turn_id
    return error


def _message_id(request: web.Request) -> str:
    message_id = request.match_info["mid"]
    if not valid_id(message_id):
        raise ApiError(404, "not_found", "message not found")
    return message_id


def check_text(request: web.Request, content: str) -> None:
    """A message's text as this edge takes it: not blank (a body's `content` was
    checked so as it was decoded; the AI SDK's text is joined from its parts), and
    within the configured length."""
    config = request.app[CONFIG]
    if not content.strip():
        raise bad_request("content is empty")
    if len(content) > config.max_message_chars:
        raise bad_request(
            f"content longer than {config.max_message_chars} characters", "content_too_long"
        )


def _check_common(request: web.Request, model: str | None) -> None:
    config = request.app[CONFIG]
    if model is not None and model not in config.models:
        raise bad_request(
            f"unknown model {model!r}; known: {', '.join(config.models)}", "unknown_model"
        )


# ---------------------------------------------------------------- idempotency


def request_digest(parts: tuple[Any, ...]) -> str:
    """What a repeated idempotency key must ask for again (else 422)."""
    return hashlib.sha256(msgspec.json.encode(parts)).hexdigest()


def request_key(user_id: str, key: str, digest: str) -> str:
    """A keyed request as the actor knows it again from the log (TurnRequest.request_key):
    the user's key and what it asked for, hashed (the key itself is the client's)."""
    return hashlib.sha256(f"{user_id}\x00{key}\x00{digest}".encode()).hexdigest()[:32]


def idem_key(user_id: str, conversation_id: str, key: str) -> str:
    """The Redis key of one user's idempotency key in one conversation (a project's
    conversation is shared: another member's key of the same text is another key)."""
    scope = hashlib.sha256(f"{user_id}\x00{key}".encode()).hexdigest()[:32]
    return f"{idempotency_prefix(conversation_id)}{scope}"


async def _idempotency(
    request: web.Request, conversation_id: str, key: str | None, digest: str
) -> tuple[IdempotencyRecord, bool]:
    """The request's ids and start position; the same ones again for a repeated key.

    The start position is the log's end before the request is published (no event
    of its turn can come earlier), or a position before it, which saves a read of the
    log on the way to the first token: what this edge's hub of the conversation handed
    out last, when there is one (a viewer has it open), or, for the first request of a
    conversation made through this edge, where its header is."""
    after = request.app[HUBS].following(conversation_id)
    if after is None:
        after = request.app[HEADERS].made_at(conversation_id)
    if after is None:
        after = await request.app[LOG].last_seq(conversation_id)
    record = IdempotencyRecord(message_id=new_id(), command_id=new_id(), after=after, digest=digest)
    if key is None:
        return record, True
    redis_key = idem_key(claims_of(request).sub, conversation_id, key)
    if await request.app[REDIS].set(redis_key, msgspec.json.encode(record), nx=True, ex=_RESERVE_S):
        return record, True
    previous = await earlier_request(request, conversation_id, key)
    if previous is None:  # expired between the two calls: treat as new
        return record, True
    if previous.digest != digest:
        raise ApiError(
            422, "idempotency_mismatch", "idempotency_key was already used with a different request"
        )
    return previous, False


async def earlier_request(
    request: web.Request, conversation_id: str, key: str
) -> IdempotencyRecord | None:
    """What an idempotency key of this user's was last used for, if it still is."""
    raw = await request.app[REDIS].get(idem_key(claims_of(request).sub, conversation_id, key))
    return None if raw is None else msgspec.json.decode(raw, type=IdempotencyRecord)


async def _keep_idempotency(
    request: web.Request, conversation_id: str, key: str | None, record: IdempotencyRecord
) -> None:
    if key is not None:
        await request.app[REDIS].set(
            idem_key(claims_of(request).sub, conversation_id, key),
            msgspec.json.encode(record),
            ex=request.app[CONFIG].idempotency_ttl_s,
        )


async def _forget_idempotency(request: web.Request, conversation_id: str, key: str | None) -> None:
    if key is not None:
        await request.app[REDIS].delete(idem_key(claims_of(request).sub, conversation_id, key))
