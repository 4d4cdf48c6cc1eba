"""Turn-end webhooks: every turn's end POSTed once to PARLEY_WEBHOOK_URL, signed, retried.

Driven from the log, not from the turn: a durable JetStream consumer reads the
conversations' events, and each turn's end (`done`, `cancelled`, `failed`,
`billing_rejected`) is POSTed as JSON with the Standard Webhooks headers
(`webhook-id`, `webhook-timestamp`, `webhook-signature`: `v1,` and the base64
HMAC-SHA256 of `id.timestamp.body` with PARLEY_WEBHOOK_SECRET). The event is
acknowledged to JetStream only once the receiver answered 2xx; until then it is
redelivered after a backoff with jitter, for as long as it takes. The id is the
end event's own id, so a receiver sees the same id on every attempt, a restart
of the dispatcher neither loses an end (it was not acknowledged) nor invents
one (the id does not change), and a receiver can drop duplicates by id.

Starts from the events that come after it is first set up (a new deployment is
not flooded with the past). Several workers share the one durable consumer.
`payload` and `sign` are pure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import random
import re
import time
from typing import Any, Literal, Protocol

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
import yarl
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from actors.sizing import assemble
from events.codec import Unreadable, decode_entry
from events.errors import EventLogUnavailable
from events.log import EventLog
from events.subjects import EVT_PREFIX, EVT_STREAM, conversation_of, event_subject
from events.vocabulary import (
    BillingRejected,
    Cancelled,
    ContentBlock,
    ContentPart,
    ConversationDeleted,
    Done,
    Failed,
    TurnEnd,
    UnsentEnd,
    event_type,
)

log = logging.getLogger(__name__)

DURABLE = "parley-webhooks"
# conversations' subjects only (accounts and projects live one level deeper)
_SUBJECTS = f"{EVT_PREFIX}.*"
# a turn's end, or a deleted conversation's tombstone (it carries the ends the purge took)
_ENDS = tuple(
    f'{{"type":"{name}"'.encode()
    for name in ("done", "cancelled", "failed", "billing_rejected", "conversation_deleted")
)
_FIRST_RETRY_S = 1.0
_LAST_RETRY_S = 3600.0
_TIMEOUT_S = 10.0
# how long a stopping dispatcher waits for receivers to answer what it sent
_STOP_GRACE_S = 2.0
# attempts awaiting their answers at once (each holds its end in memory)
_MOST_IN_FLIGHT = 1_000
# ends handed out and not acknowledged: in flight, or waiting for their next attempt
# (on the server, not here). Far above the ends in flight: ends waiting up to an hour
# for a retry must not stop the new ones from being read.
_MOST_WAITING = 100_000


# while attempts keep failing, one line in this long says so
_FAILURE_LINE_EVERY_S = 60.0


class FailureLog:
    """Failed attempts logged without a flood (a receiver down for an hour, with a
    thousand ends waiting, made a line for each of their attempts: thousands): the
    first at once with its reason, then at most a line a minute while they go on,
    saying how many failed since the line before; a line when an end is taken again
    after that. Every attempt is on `/metrics`, and at debug level in the log."""

    def __init__(self, clock: Any = time.monotonic, every_s: float = _FAILURE_LINE_EVERY_S):
        self._clock = clock
        self._every_s = every_s
        self._last_line: float | None = None
        self._unlogged = 0  # failed attempts since the last line
        self._failed = 0  # failed attempts since the last one taken
        self._told = False  # a failure was logged since the last line about one taken

    def failed(self, extra: dict[str, Any]) -> None:
        self._failed += 1
        now = self._clock()
        if self._last_line is not None and now - self._last_line < self._every_s:
            self._unlogged += 1
            log.debug("webhook not acknowledged; it will be sent again", extra=extra)
            return
        log.warning(
            "webhook not acknowledged; it will be sent again",
            extra={**extra, "failed_since_last_line": self._unlogged},
        )
        self._last_line, self._unlogged, self._told = now, 0, True

    def delivered(self) -> None:
        if self._told:
            log.info(
                "webhooks are taken again",
                extra={"failed_attempts_before": self._failed},
            )
            self._told = False
        self._failed = 0


# what became of one attempt: the receiver answered 2xx, answered something else
# (a 3xx, 4xx or 5xx), or did not answer (no connection, a timeout, a cut answer)
Outcome = Literal["delivered", "refused", "unanswered"]


class WebhookObserver(Protocol):
    """What the dispatcher tells about its attempts (the wiring counts it:
    parley/metrics.py). Calls are quick and never raise."""

    def webhook_attempt(self, outcome: Outcome, end_age_s: float) -> None:
        """One attempt ended; `end_age_s`: since the turn ended (how late it is)."""


class NoWebhookObserver:
    def webhook_attempt(self, outcome: Outcome, end_age_s: float) -> None:
        pass


class WebhookSettings(msgspec.Struct, frozen=True):
    url: str
    secret: str


# A signing key shorter than this is easy to guess (Standard Webhooks asks for 24-64 bytes).
MIN_SECRET_BYTES = 16


def secret_bytes(secret: str) -> bytes:
    """A Standard Webhooks secret is base64, `whsec_` in front or not, padded or not:
    the standard's libraries decode every secret so, and a receiver's library must
    come to the same key (ValueError when it is not base64; a receiver's decoder
    would skip what is not and sign with another key)."""
    encoded = secret.removeprefix("whsec_")
    encoded += "=" * (-len(encoded) % 4 if len(encoded) % 4 != 1 else 0)
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as err:
        raise ValueError(f"the secret is not base64: {err}") from err


def settings_problem(url: str, secret: str) -> str | None:
    """What is wrong with a webhook URL and secret, for the operator; None when nothing.
    Caught at start: a secret the receiver's library decodes otherwise would fail every
    delivery's check, an empty one would let anyone sign, and a URL that is not one
    would be retried for ever."""
    problem = _url_problem(url)
    if problem is not None:
        return f"PARLEY_WEBHOOK_URL {problem}"
    try:
        key = secret_bytes(secret)
    except ValueError as err:
        return (
            f"PARLEY_WEBHOOK_SECRET: {err} (a Standard Webhooks secret is whsec_ + base64 "
            "of 24-64 random bytes: whsec_$(openssl rand -base64 32))"
        )
    if len(key) < MIN_SECRET_BYTES:
        return (
            f"PARLEY_WEBHOOK_SECRET is a key of {len(key)} bytes: at least "
            f"{MIN_SECRET_BYTES} are needed (a Standard Webhooks secret is whsec_ + base64 "
            "of 24-64 random bytes: whsec_$(openssl rand -base64 32))"
        )
    return None


# A DNS name's label as the resolver takes it (underscores too: service names in
# a compose network have them); anything else fails in `getaddrinfo`, some of it
# (an empty label, one over 63 characters) with a UnicodeError, not an OSError.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _url_problem(url: str) -> str | None:
    """Read the URL as aiohttp will: what it cannot send to would fail every attempt
    for ever, and a host the resolver cannot encode raised out of the delivery."""
    refused = f"must be an http:// or https:// URL to a host, not {url!r}"
    try:
        parsed = yarl.URL(url)
        port = parsed.explicit_port
    except ValueError as err:
        return f"{refused} ({err})"
    host = parsed.raw_host
    if parsed.scheme not in ("http", "https") or not host:
        return refused
    if port == 0:
        return f"{refused} (port 0)"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    if not all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        return f"{refused} (not a host name: {host!r})"
    return None


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _header_safe(text: str) -> bool:
    """Whether `text` can be an HTTP header's value as it is: printable ASCII, no line
    break or other control character (the HTTP client refuses those)."""
    return bool(text) and text.isascii() and text.isprintable()


def payload(
    seq: int, end: TurnEnd, content: list[ContentBlock] | None = None, *, erased: bool = False
) -> bytes:
    """The body of a turn-end webhook: `{type, timestamp, data}` as Standard Webhooks suggests.
    `content`: the end's content when it came in `content_part` events (the end's own
    `content` is empty then); `erased`: an end of a deleted conversation, sent from its
    tombstone without the conversation's text."""
    if content is not None and isinstance(end, Done | Cancelled | Failed):
        end = msgspec.structs.replace(end, content=content)
    data: dict[str, Any] = {
        "conversation_id": end.conversation_id,
        "turn_id": end.turn_id,
        "event_id": end.event_id,
        "seq": seq,
    }
    match end:
        case Done():
            data |= {
                "stop_reason": end.stop_reason,
                "content": msgspec.to_builtins(end.content),
                "input_tokens": end.input_tokens,
                "output_tokens": end.output_tokens,
                "tokens_estimated": end.tokens_estimated,
            }
        case Cancelled():
            data |= {
                "reason": end.reason,
                "content": msgspec.to_builtins(end.content),
                "input_tokens": end.input_tokens,
                "output_tokens": end.output_tokens,
                "tokens_estimated": end.tokens_estimated,
            }
        case Failed():
            data |= {
                "code": end.code,
                "message": end.message,
                "content": msgspec.to_builtins(end.content),
                "input_tokens": end.input_tokens,
                "output_tokens": end.output_tokens,
                "tokens_estimated": end.tokens_estimated,
            }
        case BillingRejected():
            # refused before the model was called: no content, no tokens, but the
            # fields every end has, so a receiver reads each end alike
            data |= {
                "content": [],
                "input_tokens": 0,
                "output_tokens": 0,
                "tokens_estimated": False,
                "user_message_id": end.user_message_id,
                "account": end.account,
                "needed": end.needed,
                "available": end.available,
            }
    if erased:
        data["erased"] = True
    moment = dt.datetime.fromtimestamp(end.at / 1e9, tz=dt.UTC).isoformat()
    return msgspec.json.encode(
        {"type": f"turn.{event_type(end)}", "timestamp": moment, "data": data}
    )


def backoff(attempt: int, first_s: float = _FIRST_RETRY_S) -> float:
    """Before attempt `attempt + 1`: 1 s, 2 s, 4 s, ... up to an hour, with jitter."""
    # The exponent stops growing long after the hour is reached: 2 ** 1024 is no
    # float, and a receiver away for a month (an attempt every 30-60 min) reaches
    # attempt 1025; the OverflowError raised out of every delivery of that end.
    ceiling = min(_LAST_RETRY_S, first_s * 2 ** min(max(0, attempt - 1), 64))
    return random.uniform(ceiling / 2, ceiling)


class WebhookDispatcher:
    def __init__(
        self,
        js: JetStreamContext,
        settings: WebhookSettings,
        http: aiohttp.ClientSession,
        *,
        clock: Any = time.time,
        first_retry_s: float = _FIRST_RETRY_S,
        observer: WebhookObserver | None = None,
        log: EventLog | None = None,
    ) -> None:
        self._js = js
        # reads back the content of an end too big for one event (its content_parts)
        self._log = log if log is not None else EventLog(js)
        self._settings = settings
        self._secret = secret_bytes(settings.secret)
        self._http = http
        self._clock = clock
        self._first_retry_s = first_retry_s
        self._observer = observer if observer is not None else NoWebhookObserver()
        self.delivered = 0
        self.ready = asyncio.Event()
        self._failures = FailureLog()

    async def run(self, stopping: asyncio.Event) -> None:
        config = api.ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=_TIMEOUT_S * 3,
            max_deliver=-1,
            max_ack_pending=_MOST_WAITING,
            deliver_policy=api.DeliverPolicy.NEW,
            filter_subject=_SUBJECTS,
        )
        try:
            # made, or brought up to this configuration (a consumer made by an earlier
            # version: `pull_subscribe` takes an existing one as it is)
            await self._js.add_consumer(EVT_STREAM, config=config)
        except nats.js.errors.APIError as err:
            log.warning(
                "the webhooks' consumer could not be updated; it is used as it is",
                extra={"error": str(err)},
            )
        sub = await self._js.pull_subscribe(
            _SUBJECTS, durable=DURABLE, stream=EVT_STREAM, config=config
        )
        self.ready.set()
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as sending:
                while not stopping.is_set():
                    room = _MOST_IN_FLIGHT - len(in_flight)
                    if room <= 0:
                        await asyncio.wait(
                            set(in_flight), timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                        )
                        continue
                    try:
                        msgs = await sub.fetch(min(64, room), timeout=1.0)
                    except (nats.errors.TimeoutError, TimeoutError):
                        continue
                    for msg in msgs:
                        if not msg.data.startswith(_ENDS):
                            await msg.ack()  # not a turn's end (chunks, mostly)
                            continue
                        task = sending.create_task(self._deliver(msg))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                # Stopping: a receiver that is slow to answer does not hold the worker
                # for its whole timeout; what it has not answered is handed back, and
                # sent again (by whichever worker reads next; receivers drop duplicates).
                if in_flight:
                    await asyncio.wait(set(in_flight), timeout=_STOP_GRACE_S)
                for task in in_flight:
                    task.cancel()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _parts(self, end: Done | Cancelled | Failed, seq: int) -> list[ContentBlock] | None:
        """The content of an end that came in `content_parts` pieces before it (at `seq`),
        read back from the conversation's log: they were appended with it, so they are
        looked for just before it first, then from the conversation's start. None when
        they are not all there any more (the conversation was deleted, or retention
        cut them): the end is sent with what it carries."""
        subject = event_subject(end.conversation_id)
        for after in (max(0, seq - 1 - 4 * (end.content_parts + 64)), 0):
            parts: dict[int, ContentPart] = {}
            position, done = after, False
            while not done:
                batch, pending = await self._log.read_events(subject, position)
                for raw in batch:
                    if raw.seq >= seq:
                        done = True
                        break
                    part = decode_entry(raw.data)
                    if isinstance(part, ContentPart) and part.turn_id == end.turn_id:
                        parts[part.index] = part
                done = done or not batch or pending == 0
                if batch:
                    position = batch[-1].seq
            if len(parts) == end.content_parts:
                return assemble(list(parts.values()))
            if after == 0:
                break
        log.warning(
            "turn end sent without its content: the pieces it came in are no longer in the log",
            extra={"conversation_id": end.conversation_id, "webhook_id": end.event_id},
        )
        return None

    async def _deliver(self, msg: Msg) -> None:
        event = decode_entry(msg.data)
        seq = int(msg.metadata.sequence.stream)
        if isinstance(event, ConversationDeleted):
            # The ends the purge took before they were delivered, without their content.
            sendable = [u for u in event.unsent_ends if _header_safe(u.end.event_id)]
            await self._send(msg, [(u.end, payload(u.seq, u.end, erased=True)) for u in sendable])
            return
        if not isinstance(event, Done | Cancelled | Failed | BillingRejected):
            # An end's tag on an entry that does not decode as one: damage, nothing to
            # send. Said where the operator sees it (DESIGN: no single event stops the
            # system, none is skipped silently): the receiver will never hear of it.
            log.error(
                "turn end in the log cannot be read; no webhook is sent for it",
                extra={
                    "conversation_id": conversation_of(msg.subject),
                    "seq": seq,
                    "error": event.error if isinstance(event, Unreadable) else type(event).__name__,
                },
            )
            await msg.ack()
            return
        if not _header_safe(event.event_id):
            # Its id is the `webhook-id` header: one no header can carry (a line break)
            # made the HTTP client raise, which ended the dispatcher, and every restart
            # met the same entry again. It can never be sent: say so once, pass it over.
            log.error(
                "turn end not sent as a webhook: its event id cannot be a header",
                extra={"conversation_id": event.conversation_id, "seq": seq},
            )
            await msg.ack()
            return
        content: list[ContentBlock] | None = None
        if isinstance(event, Done | Cancelled | Failed) and event.content_parts > 0:
            # Its content is in the `content_part` events just before it: the end
            # alone has `content: []`, and a receiver was sent an empty answer.
            try:
                content = await self._parts(event, seq)
            except EventLogUnavailable as err:
                delay = backoff(int(msg.metadata.num_delivered), self._first_retry_s)
                log.warning(
                    "webhook not sent yet: its content could not be read; it will be tried again",
                    extra={"webhook_id": event.event_id, "reason": str(err), "retry_in_s": delay},
                )
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak(delay=delay)
                return
        await self._send(msg, [(event, payload(seq, event, content))])

    async def _send(self, msg: Msg, webhooks: list[tuple[TurnEnd, bytes]]) -> None:
        """POST each webhook in turn; the entry is acknowledged once every one was taken
        (2xx), else handed back to be tried again after a backoff (all of them: those
        taken already arrive again under the same ids, which receivers drop)."""
        attempt = int(msg.metadata.num_delivered)
        for sent, (event, body) in enumerate(webhooks):
            if sent:
                # The entry is handed out again once `ack_wait` passes without an answer
                # (three attempts' timeouts): a tombstone's hundreds of ends, sent one
                # after another to a receiver taking 100 ms each, were all sent again by
                # a second task, then a third, every 30 s, while the first went on.
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
            reason = await self._post(msg, event, body)
            if reason is None:
                continue
            delay = backoff(attempt, self._first_retry_s)
            self._failures.failed(
                {
                    "conversation_id": event.conversation_id,
                    "turn_id": event.turn_id,
                    "webhook_id": event.event_id,
                    "attempt": attempt,
                    "reason": reason,
                    "retry_in_s": round(delay, 2),
                }
            )
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=delay)
            return
        await msg.ack()

    async def _post(self, msg: Msg, event: TurnEnd, body: bytes) -> str | None:
        """One attempt: None when the receiver took it (2xx), else why not."""
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, event.event_id, timestamp, body),
        }
        try:
            # A redirect is not followed: aiohttp would turn a 301/302/303 into a GET
            # without the body, and an answer of 200 to that GET acknowledged an end
            # the receiver never saw; a 307/308 would send the signed body to any host
            # the Location names. A 3xx is an attempt that failed, like any non-2xx.
            async with self._http.post(
                self._settings.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S),
                allow_redirects=False,
            ) as response:
                status = response.status
                location = response.headers.get("Location")
        except (aiohttp.ClientError, TimeoutError) as err:
            status, reason = 0, repr(err)
        except asyncio.CancelledError:
            with contextlib.suppress(nats.errors.Error):
                await asyncio.shield(msg.nak())
            raise
        else:
            reason = f"HTTP {status}"
            if 300 <= status < 400:
                reason += f", a redirect (not followed) to {location!r}"
        end_age_s = max(0.0, self._clock() - event.at / 1e9)
        if 200 <= status < 300:
            self._failures.delivered()
            self.delivered += 1
            self._observer.webhook_attempt("delivered", end_age_s)
            return None
        self._observer.webhook_attempt("refused" if status else "unanswered", end_age_s)
        return reason


# The most unsent ends a tombstone carries (each some 300 bytes: it must fit in one event)
MOST_UNSENT_ENDS = 500


def without_content(end: TurnEnd) -> TurnEnd:
    """A turn end without the conversation's text: what a tombstone may keep of it."""
    match end:
        case Done() | Cancelled():
            return msgspec.structs.replace(end, content=[], content_parts=0)
        case Failed():
            return msgspec.structs.replace(end, content=[], content_parts=0, message="")
        case BillingRejected():
            return end


async def unsent_ends(events: EventLog, conversation_id: str) -> list[UnsentEnd]:
    """The conversation's turn ends the webhooks have not acknowledged yet, content-free,
    for its tombstone: each end after the webhook consumer's ack floor (some may have
    been delivered already: they are sent again under the same id). None when no
    webhooks were ever set up. Raises EventLogUnavailable."""
    floor = await events.acknowledged_up_to(DURABLE)
    if floor is None:
        return []
    ends = [
        UnsentEnd(seq=stored.seq, end=without_content(stored.event))
        for stored in await events.read(conversation_id, after=floor)
        if isinstance(stored.event, Done | Cancelled | Failed | BillingRejected)
    ]
    if len(ends) > MOST_UNSENT_ENDS:
        log.error(
            "deleted conversation: only its latest turn ends not yet sent as webhooks will be",
            extra={
                "conversation_id": conversation_id,
                "unsent": len(ends),
                "kept": MOST_UNSENT_ENDS,
            },
        )
    return ends[-MOST_UNSENT_ENDS:]
