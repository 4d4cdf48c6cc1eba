"""What every edge module shares: the typed keys of the application and the request,
and the small helpers read through them.

This module is the bottom of `api/`: it imports no other edge module that could
import it back (only the pure ones: `api.auth`, `api.config`), so imports point
one way: `app` -> `routes` -> `streaming` -> `context`. What may not enter:
handlers, middlewares, anything that does I/O.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import redis.asyncio as aioredis
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST

from api.auth import Claims, Verifier
from api.config import EdgeConfig
from api.hub import Hubs
from events.log import EventLog
from events.projects import ProjectState, evolve_project
from events.publisher import AckedPublisher
from events.subjects import project_subject
from events.tracing import unnamed_context
from events.turns import TurnRegistry
from events.vocabulary import ConversationCreated
from projections.store import ReadStore


class HeaderCache:
    """conversation id -> its `conversation_created` event. Immutable facts, so a plain LRU.

    For a conversation made through this edge, until its first request here, it also
    keeps where its header is in the log (`made_at`)."""

    def __init__(self, size: int = 10_000, gone_size: int = 100_000) -> None:
        self._items: OrderedDict[str, ConversationCreated] = OrderedDict()
        self._made: dict[str, int] = {}
        self._size = size
        # conversations deleted (a DELETE here, or a worker's announcement): their
        # headers are never cached again; the oldest are forgotten first, and the
        # log's tombstone still answers for them (api.access)
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._gone_size = gone_size

    def get(self, conversation_id: str) -> ConversationCreated | None:
        item = self._items.get(conversation_id)
        if item is not None:
            self._items.move_to_end(conversation_id)
        return item

    def forget(self, conversation_id: str) -> None:
        """The conversation was deleted: drop its header, and keep it from coming back."""
        self._items.pop(conversation_id, None)
        self._made.pop(conversation_id, None)
        self._gone[conversation_id] = None
        while len(self._gone) > self._gone_size:
            self._gone.popitem(last=False)

    def gone(self, conversation_id: str) -> bool:
        """Whether this edge knows the conversation was deleted."""
        return conversation_id in self._gone

    def put(self, header: ConversationCreated, made_at: int | None = None) -> None:
        if header.conversation_id in self._gone:
            return  # read before its deletion was known: never cached again
        self._items[header.conversation_id] = header
        self._items.move_to_end(header.conversation_id)
        if made_at is not None:
            self._made[header.conversation_id] = made_at
        while len(self._items) > self._size:
            gone, _ = self._items.popitem(last=False)
            self._made.pop(gone, None)

    def made_at(self, conversation_id: str) -> int | None:
        """The log position of the header of a conversation made through this edge, once
        (its first request): a place to start that request's stream without a read of
        the log's end. Any position before the end is one; what lies between is read,
        and on a conversation just made there is little or nothing."""
        return self._made.pop(conversation_id, None)


class ProjectCache:
    """project id -> its folded state and log position (api.access refreshes it)."""

    def __init__(self, size: int = 10_000) -> None:
        self._items: dict[str, tuple[ProjectState, int]] = {}
        self._size = size

    async def get(
        self, event_log: EventLog, project_id: str, *, fresh: bool = False
    ) -> ProjectState:
        state, seq = self._items.get(project_id, (ProjectState(project_id=project_id), 0))
        if fresh or not state.exists:
            for stored in await event_log.read_subject(project_subject(project_id), after=seq):
                state = evolve_project(state, stored.event)
                seq = stored.seq
            if len(self._items) >= self._size:
                self._items.pop(next(iter(self._items)))
            self._items[project_id] = (state, seq)
        return state


class EdgeMetrics(Protocol):
    """What the edge reports; the wiring passes an implementation (parley/metrics.py)."""

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def sse_viewers(self, delta: int) -> None: ...

    def limited(self, limit: str) -> None: ...

    def projection(self, *, lags: dict[str, int] | None, errors: int | None) -> None:
        """The projections' state as read for this scrape: each one's lag by its name,
        and the errors recorded (None: could not be read)."""
        ...

    def render(self) -> tuple[bytes, str]:
        """The exposition for GET /metrics: body and content type."""
        ...


class NoMetrics:
    """An edge started without metrics (a test's extra edge): reports nothing."""

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        pass

    def sse_viewers(self, delta: int) -> None:
        pass

    def limited(self, limit: str) -> None:
        pass

    def projection(self, *, lags: dict[str, int] | None, errors: int | None) -> None:
        pass

    def render(self) -> tuple[bytes, str]:
        return b"", CONTENT_TYPE_LATEST


class SharedCheck:
    """A costly check whose answer (a response's body and status) callers share: one
    that comes while it runs, or within `fresh_s` of its end, gets that answer. A
    public probe answered this way costs the servers it checks the same whether one
    load balancer or ten thousand anonymous clients ask.

    The check runs as a task of its own, in a context that names no request: it
    serves every caller that shares it, and ran with the request id of the one
    that started it, so its log lines named that one probe among many."""

    def __init__(self, fresh_s: float) -> None:
        self._fresh_s = fresh_s
        self._running: asyncio.Future[tuple[bytes, int]] | None = None
        self._ended_at = float("-inf")

    async def answer(
        self, check: Callable[[], Coroutine[Any, Any, tuple[bytes, int]]]
    ) -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        if self._running is None or (
            self._running.done() and loop.time() - self._ended_at > self._fresh_s
        ):
            self._running = loop.create_task(check(), context=unnamed_context())
            self._running.add_done_callback(lambda _: self._mark_end(loop.time()))
        return await asyncio.shield(self._running)

    def _mark_end(self, at: float) -> None:
        self._ended_at = at


CONFIG = web.AppKey("config", EdgeConfig)
NATS = web.AppKey("nats", NatsClient)
JS = web.AppKey("js", JetStreamContext)
LOG = web.AppKey("log", EventLog)
COMMANDS = web.AppKey("commands", AckedPublisher)  # publishes commands to CHAT_CMD
POOL = web.AppKey("pool", Any)
STORE = web.AppKey("store", ReadStore)
REDIS = web.AppKey("redis", aioredis.Redis)
TURNS = web.AppKey("turns", TurnRegistry)
HEADERS = web.AppKey("headers", HeaderCache)
PROJECTS = web.AppKey("projects", ProjectCache)
VERIFIER = web.AppKey("verifier", Verifier)
HUBS = web.AppKey("hubs", Hubs)
METRICS = web.AppKey("metrics", EdgeMetrics)
READINESS = web.AppKey("readiness", SharedCheck)  # GET /readyz, shared for a second
OPENAPI = web.AppKey("openapi", bytes)  # the encoded document (api.openapi), made once

CLAIMS = web.RequestKey("claims", Claims)


def claims_of(request: web.Request) -> Claims:
    """The verified token of the request (set by the auth middleware on every non-public path)."""
    claims: Claims = request[CLAIMS]
    return claims


def token_good_until(request: web.Request) -> float:
    """When (wall clock) the request's token is refused: a stream it opened ends then
    (api.streaming, api.ai_sdk), as a new request with it would be refused."""
    return request.app[VERIFIER].good_until(claims_of(request))


def wants_json(request: web.Request) -> bool:
    """The client asked for a JSON answer rather than an event stream: JSON weighs
    more in its Accept header (q-values; a tie, or neither named, is the stream)."""
    return prefers_json(request.headers.get("Accept", ""))


def prefers_json(accept: str) -> bool:
    """Whether `Accept` weighs application/json above text/event-stream (RFC 9110
    12.5.1: each type takes the q of the most specific range that matches it, so
    `application/*` or `*/*;q=0.5, application/json` asks for JSON; a tie is the
    event stream, the default)."""
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if kind:
            ranges.append((kind.lower(), weight))
    return _quality(ranges, "application/json") > _quality(ranges, "text/event-stream")


def _quality(ranges: list[tuple[str, float]], media: str) -> float:
    family = media.split("/")[0] + "/*"
    best, quality = -1, 0.0
    for kind, weight in ranges:
        specific = 2 if kind == media else 1 if kind == family else 0 if kind == "*/*" else -1
        if specific > best or (specific == best and specific >= 0 and weight > quality):
            best, quality = specific, weight
    return quality if best >= 0 else 0.0
