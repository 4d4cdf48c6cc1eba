"""The aiohttp application: resources as cleanup contexts, typed keys, auth, routes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import nats
import redis.asyncio as aioredis
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from api.auth import Claims, InvalidToken, verify
from api.config import EdgeConfig
from api.errors import ApiError, Handler, error_middleware
from events.log import EventLog, ensure_streams
from events.projects import ProjectState, evolve_project
from events.subjects import project_subject
from events.turns import TurnRegistry, redis_client
from events.vocabulary import ConversationCreated
from projections.db import create_pool
from projections.store import ReadStore

CONFIG = web.AppKey("config", EdgeConfig)
NATS = web.AppKey("nats", NatsClient)
JS = web.AppKey("js", JetStreamContext)
LOG = web.AppKey("log", EventLog)
POOL = web.AppKey("pool", Any)
STORE = web.AppKey("store", ReadStore)
REDIS = web.AppKey("redis", aioredis.Redis)
TURNS = web.AppKey("turns", TurnRegistry)

_CLAIMS = web.RequestKey("claims", Claims)
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json"})


class HeaderCache:
    """conversation id -> its `conversation_created` event. Immutable facts, so a plain LRU."""

    def __init__(self, size: int = 10_000) -> None:
        self._items: OrderedDict[str, ConversationCreated] = OrderedDict()
        self._size = size

    def get(self, conversation_id: str) -> ConversationCreated | None:
        item = self._items.get(conversation_id)
        if item is not None:
            self._items.move_to_end(conversation_id)
        return item

    def put(self, header: ConversationCreated) -> None:
        self._items[header.conversation_id] = header
        self._items.move_to_end(header.conversation_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


HEADERS = web.AppKey("headers", HeaderCache)


class ProjectCache:
    """project id -> its folded state and log position."""

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


PROJECTS = web.AppKey("projects", ProjectCache)


def claims_of(request: web.Request) -> Claims:
    claims: Claims = request[_CLAIMS]
    return claims


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
    try:
        request[_CLAIMS] = verify(request.app[CONFIG].jwt_secret, token.strip())
    except InvalidToken as err:
        raise ApiError(401, "unauthorized", str(err)) from err
    return await handler(request)


async def nats_ctx(app: web.Application) -> AsyncIterator[None]:
    nc = await nats.connect(app[CONFIG].nats_url, name="parley-edge", max_reconnect_attempts=-1)
    app[NATS] = nc
    app[JS] = nc.jetstream()
    await ensure_streams(app[JS])
    app[LOG] = EventLog(app[JS])
    yield
    await nc.drain()


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[CONFIG].database_url, app[CONFIG].db_schema)
    app[POOL] = pool
    app[STORE] = ReadStore(pool)
    yield
    await pool.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    client = redis_client(app[CONFIG].redis_url)
    app[REDIS] = client
    app[TURNS] = TurnRegistry(client)
    yield
    await client.aclose()


def create_app(config: EdgeConfig) -> web.Application:
    from api.routes import add_routes

    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=config.max_body_bytes
    )
    app[CONFIG] = config
    app[HEADERS] = HeaderCache()
    app[PROJECTS] = ProjectCache()
    app.cleanup_ctx.extend([nats_ctx, postgres_ctx, redis_ctx])
    add_routes(app)
    return app
