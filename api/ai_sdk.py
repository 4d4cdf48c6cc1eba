"""Routes for frontends built on the Vercel AI SDK's `useChat`, unchanged but for their API URL.

`POST /v1/ai-sdk/chat` takes useChat's default request body (`id`: the chat,
which is the conversation, created on first use; `messages`: the whole chat,
whose last message is the user's new one, or one sent before with new text: an
edit; `trigger`: `submit-message`, or `regenerate-message` with `messageId`, the
answer to regenerate, the latest when there is none) and answers with the turn
as a UI message stream (api/ai_sdk_stream.py translates).
`GET /v1/ai-sdk/chat/{id}/stream` is useChat's resume: the active turn from its
start (the SDK's resumed stream is a replay), or 204 when none runs.

What may not enter: the translation itself (pure, in api/ai_sdk_stream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from aiohttp import web

from api.access import owned_conversation, project_of_member
from api.ai_sdk_stream import DONE_FRAME, HEADERS, UiStream, frame
from api.context import CONFIG, HUBS, LOG, claims_of, token_good_until
from api.context import HEADERS as CONVERSATION_HEADERS
from api.errors import ApiError, bad_request, begin_stream, not_found
from api.hub import Delivery, Subscription, TurnFilter, watch
from api.sse import Envelope, Position
from api.streaming import bound_send_buffer, cut, running_turn, writes_wait
from api.turn_routes import (
    DECODE_ELSEWHERE_BYTES,
    IdempotencyRecord,
    RequestRepeated,
    check_text,
    earlier_request,
    read_body,
    request_digest,
    submit,
)
from api.validation import ID_RULE, Id, InvalidBody, ModelName, decode_body, invalid, refused
from events.errors import EventLogConflict
from events.ids import new_id
from events.log import StoredEvent
from events.subjects import valid_id
from events.turns import TurnRecord
from events.vocabulary import (
    ConversationCreated,
    EditMessage,
    OnBusy,
    Regenerate,
    SendMessage,
    TurnCommand,
)

# a viewer that falls this far behind is cut off (it can resume with GET .../stream)
_QUEUE_LIMIT = 10_000

log = logging.getLogger(__name__)


class UiMessage(msgspec.Struct, frozen=True):
    id: str
    role: str
    parts: list[dict[str, Any]] = []


Trigger = Annotated[
    Literal["submit-message", "regenerate-message"],
    refused("trigger must be submit-message or regenerate-message"),
]


class ChatRequest(msgspec.Struct, frozen=True):
    """useChat's default body (DefaultChatTransport), plus parley's optional fields: the
    shape the API documents. The route reads it as `_ChatBody` (see `_read_chat`)."""

    id: Id
    messages: Annotated[list[UiMessage], msgspec.Meta(min_length=1)]  # the last is the new one
    trigger: Trigger = "submit-message"
    messageId: str | None = None
    model: ModelName | None = None
    project_id: Id | None = None
    on_busy: OnBusy = "reject"


class _ChatBody(msgspec.Struct, frozen=True):
    """The body as it comes: the chat's messages left as their JSON, unread."""

    id: Id
    messages: list[msgspec.Raw]
    trigger: Trigger = "submit-message"
    messageId: str | None = None
    model: str | None = None
    project_id: Id | None = None
    on_busy: OnBusy = "reject"


def _read_chat(raw: bytes) -> tuple[_ChatBody, UiMessage | None]:
    """useChat sends the whole chat with every message, and only its last message is
    new: the others are skipped over as JSON (in msgspec's C), never made into Python
    objects or checked one string at a time (read in full, 16 MiB of history held
    the event loop 3.5 s); the last message, returned beside the body, gets every
    check a body gets."""
    try:
        body = msgspec.json.decode(raw, type=_ChatBody)
    except RecursionError as err:  # nested deeper than the interpreter's recursion limit
        raise InvalidBody("too_deep", "JSON nested too deeply") from err
    except msgspec.ValidationError as err:
        raise invalid(err, _ChatBody, "invalid request") from err
    except msgspec.DecodeError as err:
        decode_body(raw, _ChatBody)  # what exactly is wrong, said as for any body
        raise InvalidBody("invalid_json", f"malformed JSON: {err}") from err
    last = decode_body(bytes(body.messages[-1]), UiMessage) if body.messages else None
    return body, last


async def chat(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    # useChat sends the whole chat every time: a long one outgrows the API's body limit
    request = request.clone(client_max_size=config.ai_sdk_max_body_bytes)
    raw = await read_body(request)
    try:
        if len(raw) > DECODE_ELSEWHERE_BYTES:
            body, last = await asyncio.to_thread(_read_chat, raw)
        else:
            body, last = _read_chat(raw)
    except InvalidBody as err:
        raise ApiError(err.status, err.code, err.message) from err
    if not valid_id(body.id):  # a trailing newline passes the pattern
        raise bad_request(ID_RULE.format(field="id"))
    if body.model is not None and body.model not in config.models:
        raise bad_request(f"unknown model {body.model!r}", "unknown_model")
    if body.trigger == "regenerate-message":
        done = await _regenerate(request, body, last)
    else:
        done = await _submit_message(request, body, last)
    record = done.record
    return await _stream(
        request,
        done.conversation_id,
        Position(seq=record.after),
        TurnFilter(record.command_id, record.message_id),
    )


class _Submitted(NamedTuple):
    conversation_id: str
    record: IdempotencyRecord


async def _regenerate(request: web.Request, body: _ChatBody, last: UiMessage | None) -> _Submitted:
    """A new version of the answer `messageId` names, or, without one (useChat's
    `regenerate()`, its retry after an error), of the chat's latest answer; or the
    first answer to the chat's last message when that never reached parley (it
    was refused: the conversation was busy, say)."""
    answer = body.messageId or ""
    if answer and not valid_id(answer):
        raise bad_request("messageId must be the id of the answer to regenerate")
    header = await owned_conversation(request, body.id)
    key = _key_of(last) if last is not None and last.role == "user" else None
    if not answer and key is not None and await earlier_request(request, body.id, key) is None:
        # Not known to Redis: refused before (it never reached parley), or sent and its
        # key lost with Redis. The log tells: sent again, a repeat of a message that
        # reached parley is refused as one, and its answer is regenerated after all
        # (answered as a repeat, the retry showed the same failed answer again).
        try:
            return await _submit_message(request, body, last, follow_repeat=False)
        except RequestRepeated:
            pass
    user = claims_of(request).sub

    def regenerate(record: IdempotencyRecord) -> TurnCommand:
        return Regenerate(
            conversation_id=header.conversation_id,
            command_id=record.command_id,
            user_id=user,
            at=time.time_ns(),
            message_id=answer,
            model=body.model,
            on_busy=body.on_busy,
        )

    cid = header.conversation_id
    done = await submit(request, cid, None, ("regenerate", answer, body.model), regenerate)
    return _Submitted(cid, done.record)


async def _submit_message(
    request: web.Request, body: _ChatBody, last: UiMessage | None, *, follow_repeat: bool = True
) -> _Submitted:
    """The chat's last message, the user's new one: sent; or, when useChat sends one it
    sent before with other text (`sendMessage` with that message's id), an edit of it."""
    asked, text = _new_message(request, last)
    header = await _conversation(request, body)
    cid = header.conversation_id
    user = claims_of(request).sub
    key = _key_of(asked)
    sent = ("send", text, body.model)
    versions = await _versions(request, cid, key) if key is not None else None
    if versions is not None:
        # sent before: as its latest version says (a retry of it), or an edit of it
        edits = versions.first.message_id
        edited = ("edit", edits, text, body.model)
        latest = sent if versions.edits == 0 else edited
        repeat = versions.latest.digest == request_digest(latest)
        number = versions.edits if repeat else versions.edits + 1

        def edit(record: IdempotencyRecord) -> TurnCommand:
            return EditMessage(
                conversation_id=cid,
                command_id=record.command_id,
                user_id=user,
                at=time.time_ns(),
                message_id=record.message_id,
                edits=edits,
                content=text,
                model=body.model,
                on_busy=body.on_busy,
            )

        if number > 0:
            done = await submit(request, cid, f"{key}:edit:{number}", edited, edit)
            return _Submitted(cid, done.record)

    def send(record: IdempotencyRecord) -> TurnCommand:
        return SendMessage(
            conversation_id=cid,
            command_id=record.command_id,
            user_id=user,
            at=time.time_ns(),
            message_id=record.message_id,
            content=text,
            model=body.model,
            on_busy=body.on_busy,
        )

    done = await submit(request, cid, key, sent, send, follow_repeat=follow_repeat)
    return _Submitted(cid, done.record)


class _Versions(NamedTuple):
    first: IdempotencyRecord  # the message as first sent
    edits: int  # how many edits of it were sent since
    latest: IdempotencyRecord  # the last of them (`first` when none was)


async def _versions(request: web.Request, conversation_id: str, key: str) -> _Versions | None:
    """What the client's message id was sent as so far: its first send, under its key,
    then each edit under `{key}:edit:N`, numbered. The request that repeats the latest
    is a retry of it; any other text is an edit of the latest, even the text of an
    earlier version (keyed by that text, an edit back to it was taken for a retry of the
    earlier request: its old answer was replayed while the conversation went on from
    the edit in between)."""
    first = await earlier_request(request, conversation_id, key)
    if first is None:
        return None
    edits, latest = 0, first
    while edit := await earlier_request(request, conversation_id, f"{key}:edit:{edits + 1}"):
        edits, latest = edits + 1, edit
    return _Versions(first, edits, latest)


def _key_of(message: UiMessage) -> str | None:
    """The client's own message id, when it is one of ours to use, keys the request: a
    retried POST of the same message is the same request (exactly once)."""
    return f"ai-sdk:{message.id}" if 0 < len(message.id) <= 180 else None


def _new_message(request: web.Request, asked: UiMessage | None) -> tuple[UiMessage, str]:
    """The new user message (the chat's last) and its text, checked before anything is
    made of the request (a refused first message leaves no empty conversation)."""
    if asked is None or asked.role != "user":
        raise bad_request("the chat's last message must be the new user message")
    texts: list[str] = []
    for part in asked.parts:
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request("a text part's text must be a string", "invalid_request")
            texts.append(text)
        elif kind == "file":
            raise bad_request(
                "file parts are not supported: the message's text parts are what is sent",
                "unsupported_part",
            )
    text = "\n".join(texts)
    check_text(request, text)
    return asked, text


# How long a resume waits for an announced turn (a record with no id yet: a
# request accepted, or a turn queued behind one ending) to be named.
_NAMING_WAIT_S = 2.0


async def resume(request: web.Request) -> web.StreamResponse:
    chat = request.match_info["id"]
    try:
        header = await owned_conversation(request, chat)
    except ApiError as err:
        if err.status == 404 and await _not_begun(request, chat):
            # useChat's `resume: true` asks on mount, a new chat's page too: no turn
            # runs there (a 404 was an error on a page where nothing went wrong)
            return web.Response(status=204)
        raise
    active = await _named_turn(request.app, header.conversation_id)
    if active is None:
        return web.Response(status=204)
    turn = TurnFilter("")
    turn.turn_id = active.turn_id  # replay this turn from its start
    return await _stream(request, header.conversation_id, Position(seq=active.after), turn)


async def _not_begun(request: web.Request, chat: str) -> bool:
    """Whether a chat id names no conversation at all, nor one deleted: its first
    message makes it. (Another user's answers 404, as the POST does.)"""
    cache = request.app[CONVERSATION_HEADERS]
    if not valid_id(chat) or cache.gone(chat) or cache.get(chat) is not None:
        return False
    return await request.app[LOG].first(chat) is None


async def _named_turn(app: web.Application, conversation_id: str) -> TurnRecord | None:
    """The running turn, once its worker has named it. A filter on a turn not named
    yet admitted nothing (it matches a request by its command, and a resume has
    none), and the stream sent pings for ever; the worker names a turn moments
    after announcing it, so a resume waits for that, then follows the named turn,
    or answers that none runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _NAMING_WAIT_S
    while True:
        _, active = await running_turn(app, conversation_id)
        if active is None or active.turn_id:
            return active
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(0.05)


async def _conversation(request: web.Request, body: _ChatBody) -> ConversationCreated:
    """The chat's conversation: the caller's, or a new one under the chat's id."""
    event_log = request.app[LOG]
    if request.app[CONVERSATION_HEADERS].get(body.id) is not None:
        return await owned_conversation(request, body.id)  # known here: no read of the log
    first = await event_log.first(body.id)
    if first is not None:
        return await owned_conversation(request, body.id)
    if body.project_id is not None:
        await project_of_member(request, body.project_id)
    header = ConversationCreated(
        conversation_id=body.id,
        at=time.time_ns(),
        event_id=new_id(),
        user_id=claims_of(request).sub,
        project_id=body.project_id,
        title="",
        model=body.model,
    )
    try:
        seq = await event_log.append(body.id, [header], expected_seq=0)
    except EventLogConflict:
        return await owned_conversation(request, body.id)  # created just now by another request
    request.app[CONVERSATION_HEADERS].put(header, made_at=seq)
    return header


class _Chunks(Subscription):
    """One turn, from the hub, queued for the response as log events."""

    __slots__ = ("_protocol", "_transport", "queue")

    def __init__(self, request: web.Request, position: Position, turn: TurnFilter) -> None:
        super().__init__(position, turn=turn)
        self.queue: asyncio.Queue[StoredEvent | Envelope] = asyncio.Queue()
        self._transport = request.transport
        self._protocol = request.protocol

    def cut_at_stop(self) -> None:
        log.info("slow stream disconnected at stop", extra=self.named())
        self.cut()

    def cut(self) -> None:
        """Drop the connection (the transport taken when the stream opened: aiohttp may
        have let go of it). A write that waited `write_timeout_s` on a client that does
        not read is given up; left open, the connection kept what its socket holds, and
        aiohttp's own last write (the body's end) waited on it for as long as the client
        kept it open, holding an edge that stops too."""
        if self._transport is not None:
            cut(self._transport)

    def backed_up(self) -> bool:
        return writes_wait(self._transport, self._protocol)

    def take(self, delivery: Delivery) -> None:
        assert self.turn is not None
        if not self.turn.admit(delivery.stored):
            return
        if self.queue.qsize() >= _QUEUE_LIMIT:
            self.end("slow")
            return
        self.queue.put_nowait(delivery.stored)
        if delivery.ends_turn:
            self.end("done")

    def take_stall(self, error: Envelope) -> None:
        self.queue.put_nowait(error)
        self.end("stalled")

    def finishes_at_stop(self) -> bool:
        return True  # one turn's stream: its end is near


async def _stream(
    request: web.Request, conversation_id: str, position: Position, turn: TurnFilter
) -> web.StreamResponse:
    response = web.StreamResponse(headers=HEADERS)
    bound_send_buffer(request)  # as an SSE stream's: a client that stops reading fills less
    await begin_stream(request, response)
    subscription = _Chunks(request, position, turn)
    with request.app[HUBS].writing(subscription):
        return await _stream_to(request, response, conversation_id, subscription)


async def _stream_to(
    request: web.Request, response: web.StreamResponse, conversation_id: str, subscription: _Chunks
) -> web.StreamResponse:
    """`_stream` from the hub's join to the response's last byte."""
    config = request.app[CONFIG]
    expires = token_good_until(request)
    feeding = asyncio.create_task(watch(request.app[HUBS], conversation_id, subscription))
    ui = UiStream()
    try:
        while not ui.finished:
            left = expires - time.time()
            if left <= 0:  # what a new request with the token would be: refused
                await _write(request, response, frame(_cut_off(conversation_id, "expired")))
                break
            getter = asyncio.ensure_future(subscription.queue.get())
            done, _ = await asyncio.wait(
                {getter, feeding},
                timeout=min(config.ping_interval_s, left),
                return_when="FIRST_COMPLETED",
            )
            if getter not in done:
                getter.cancel()
                if feeding.done() and subscription.queue.empty():
                    # Cut off (it fell behind, or this edge is stopping) or the feed
                    # broke: the turn goes on, and the client is told so, not left with
                    # an answer that looks whole.
                    why = _ended(feeding)
                    await _write(request, response, frame(_cut_off(conversation_id, why)))
                    break
                if not done and time.time() < expires:
                    await _write(request, response, b": ping\n\n")
                continue
            item = getter.result()
            chunks = (
                ui.stalled(str(item.data)) if isinstance(item, Envelope) else ui.feed(item.event)
            )
            for chunk in chunks:
                await _write(request, response, frame(chunk))
        if ui.finished:
            await _write(request, response, DONE_FRAME)
    except ConnectionResetError:
        return response  # the client left; the turn goes on
    except TimeoutError:
        # the client stopped reading (it resumes with GET .../stream); the turn goes on
        log.info("slow stream disconnected", extra=subscription.named())
        subscription.cut()
        return response
    finally:
        subscription.end("gone")
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeding
    try:
        async with asyncio.timeout(config.limits.write_timeout_s):
            await response.write_eof()
    except TimeoutError:
        subscription.cut()
    except ConnectionResetError:
        pass
    return response


def _ended(feeding: asyncio.Task[str]) -> str:
    """Why the feed of a stream ended (`Subscription.ended`), "broken" if it failed."""
    if feeding.cancelled() or feeding.exception() is not None:
        return "broken"
    return feeding.result()


def _cut_off(conversation_id: str, why: str) -> dict[str, Any]:
    what = {
        "slow": "this stream fell behind the answer and was cut off",
        "stopping": "this server is stopping",
        "expired": "your token expired",
    }.get(why, "this stream's feed of the answer broke")
    fresh = " with a fresh token" if why == "expired" else ""
    return {
        "type": "error",
        "errorText": f"{what}; the answer goes on: resume it{fresh} "
        f"(GET /v1/ai-sdk/chat/{conversation_id}/stream)",
    }


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(request.app[CONFIG].limits.write_timeout_s):
        await response.write(data)


__all__ = ["ApiError", "chat", "not_found", "resume"]
