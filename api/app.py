"""The aiohttp application: resources as cleanup contexts, auth, routes.

The keys it fills live in `api.context`, which the handlers import; nothing
imports this module but the wiring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
from aiohttp import web
from nats.aio.msg import Msg

from api import cors
from api.auth import InvalidToken, JwksKeys, Verifier
from api.config import EdgeConfig
from api.context import (
    CLAIMS,
    COMMANDS,
    CONFIG,
    HEADERS,
    HUBS,
    JS,
    LOG,
    METRICS,
    NATS,
    POOL,
    PROJECTS,
    READINESS,
    REDIS,
    STORE,
    TURNS,
    VERIFIER,
    EdgeMetrics,
    HeaderCache,
    NoMetrics,
    ProjectCache,
    SharedCheck,
)
from api.errors import CLIENT_GONE, SERVER_NAME, ApiError, Handler, error_middleware
from api.hub import Hubs, HubSettings
from api.limits import LIMITS, Limits, limits_middleware
from api.request_ids import name_the_request, request_id_middleware
from api.routes import add_routes
from events import broker
from events.log import EventLog, ensure_streams
from events.publisher import AckedPublisher
from events.subjects import GONE_SUBJECTS, valid_id
from events.turns import TurnRegistry, redis_client
from projections.db import close_pool, create_pool
from projections.store import ReadStore

log = logging.getLogger(__name__)

_DDL_ATTEMPTS = 5
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json"})
# A 401 names the scheme it wants (RFC 9110 15.5.2, RFC 6750 section 3): without
# bearer credentials, no error code; with a token that was refused, `invalid_token`.
# Why it was refused is in the JSON body, which may hold what a quoted-string cannot.
CHALLENGE = "Bearer"
REFUSED_TOKEN = 'Bearer error="invalid_token"'
# Other NATS connections' finishes (the followers', hubs_ctx), begun as their users
# stop and awaited beside the main connection's (nats_ctx): with NATS not answering,
# each waits out `broker.finish`'s bound, and one after the other a stop waited it
# once per connection.
_FINISHING: web.AppKey[list[asyncio.Task[None]]] = web.AppKey("nats_finishing")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request counted by route template (bounded labels), method and final status."""
    began = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        # the client went away first: nginx's word for it
        status = 499 if request.get(CLIENT_GONE) else response.status
        return response
    except web.HTTPException as err:
        status = err.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].http_request(
            route, request.method, status, time.perf_counter() - began
        )


# JSON bodies of at least this many bytes are compressed for a client that accepts it
# (Accept-Encoding: gzip or deflate): the messages of a long conversation are over a
# megabyte of JSON, which a page reads again after every turn, and compress 4-5x.
COMPRESS_FROM_BYTES = 8 * 1024


@web.middleware
async def compression_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Large JSON answers compressed as the client accepts. Streams (SSE, the AI SDK's)
    are written as they go, by their handler, and never held back for a compressor."""
    response = await handler(request)
    body = response.body if isinstance(response, web.Response) else None
    if (
        isinstance(body, bytes)
        and len(body) >= COMPRESS_FROM_BYTES
        and not response.prepared
        and response.content_type == "application/json"
    ):
        response.enable_compression()  # the coding the client asked for, or none
        response.headers.add("Vary", "Accept-Encoding")  # a cache keys on it
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
        return await handler(request)
    if request.match_info.http_exception is not None:
        # no such route (404), or not with this method (405): said as it is, token
        # or not, rather than 401 for a path that would not answer with one either
        return await handler(request)
    given = request.headers.getall("Authorization", [])
    if len(given) > 1:
        # which one counts would be a guess (a proxy's own, or the client's?): neither
        raise ApiError(400, "bad_request", "more than one Authorization header")
    scheme, _, token = (given[0] if given else "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": CHALLENGE},
        )
    try:
        request[CLAIMS] = await request.app[VERIFIER].verify(token.strip())
    except InvalidToken as err:
        raise ApiError(
            401, "unauthorized", str(err), headers={"WWW-Authenticate": REFUSED_TOKEN}
        ) from err
    return await handler(request)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    http: aiohttp.ClientSession | None = None
    jwks = None
    if config.jwks_url:
        http = aiohttp.ClientSession()
        jwks = JwksKeys(config.jwks_url, http)
    app[VERIFIER] = Verifier(
        secret=config.jwt_secret,
        jwks=jwks,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    yield
    if http is not None:
        await http.close()


async def nats_ctx(app: web.Application) -> AsyncIterator[None]:
    nc = await broker.connect(
        app[CONFIG].nats_url,
        name="parley-edge",
        report=_report,
        security=app[CONFIG].nats_security,
    )
    app[NATS] = nc
    app[JS] = nc.jetstream()
    for note in await ensure_streams(app[JS], replicas=app[CONFIG].stream_replicas):
        log.info(note)
    app[LOG] = EventLog(app[JS])
    # the commands' acks come back on the log's inbox: one per connection
    app[COMMANDS] = AckedPublisher(app[LOG].replies)
    others = app[_FINISHING] = []
    headers = app[HEADERS]

    async def deleted(msg: Msg) -> None:
        # a worker deleted a conversation: its header leaves this edge's cache (the
        # DELETE's own edge dropped it already; a missed announcement is made up for
        # by the tombstone, read with the header: api.access)
        conversation_id = msg.subject.rpartition(".")[2]
        if valid_id(conversation_id):
            headers.forget(conversation_id)

    await nc.subscribe(GONE_SUBJECTS, cb=deleted)
    yield
    await asyncio.gather(broker.finish(nc, report=_report), *others)


def _report(level: int, message: str, fields: dict[str, str]) -> None:
    log.log(level, message, extra=fields)


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    for attempt in range(_DDL_ATTEMPTS):
        try:
            pool = await create_pool(app[CONFIG].database_url, app[CONFIG].db_schema)
            break
        except asyncpg.exceptions.DeadlockDetectedError:
            # The schema check's DDL can deadlock with a projector writing rows at
            # that moment; Postgres aborts one side, and trying again is the cure.
            if attempt + 1 == _DDL_ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    app[POOL] = pool
    app[STORE] = ReadStore(pool, timeout_s=app[CONFIG].postgres_timeout_s)
    yield
    await close_pool(pool)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    client = redis_client(app[CONFIG].redis_url)
    app[REDIS] = client
    app[TURNS] = TurnRegistry(client)
    yield
    await client.aclose()


async def hubs_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    settings = HubSettings(
        stall_check_s=config.stall_check_s,
        linger_s=config.hub_linger_s,
        orphan_grace_s=config.orphan_grace_s,
    )
    # The followers only read entries: a connection of their own, whose entries go
    # straight from its read loop to the followers with no header parsed (py-spy,
    # bench capacity at 250 turns: nats.py's header parsing was 5.8% of the edge's
    # time; events.broker).
    reader = await broker.connect_client(
        broker.EntryClient(),
        config.nats_url,
        name="parley-edge-followers",
        report=_report,
        security=config.nats_security,
    )
    hubs = app[HUBS] = Hubs(reader.jetstream(), app[LOG], app[TURNS], settings)
    yield
    await hubs.close()
    # begun now, as it always was, and awaited beside the main connection's (nats_ctx)
    app[_FINISHING].append(asyncio.ensure_future(broker.finish(reader, report=_report)))


async def limits_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    limits = app[LIMITS] = Limits(
        app[REDIS],
        app[HUBS],
        rate_per_s=config.limits.rate_per_s,
        burst=config.limits.rate_burst,
        lease_s=config.limits.lease_s,
    )
    limits.start()
    yield
    await limits.close()


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME
    # a JSON answer holding text users wrote is never run as a page or a script
    response.headers["X-Content-Type-Options"] = "nosniff"


async def _end_streams(app: web.Application) -> None:
    """The edge stops: it listens no more and serves no new request (aiohttp closed
    the connections that wait for one); its open streams end (`Hubs.drain`) before
    aiohttp waits for the requests under way, which would otherwise hold the stop
    for its whole timeout and then drop every stream with no word."""
    await app[HUBS].drain(app[CONFIG].stop_grace_s)


def create_app(config: EdgeConfig, metrics: EdgeMetrics | None = None) -> web.Application:
    middlewares = [
        request_id_middleware,
        metrics_middleware,
        compression_middleware,
        error_middleware,
        auth_middleware,
        limits_middleware,
    ]
    if config.cors_origins:
        # a browser's preflight carries no token: answered before authentication
        middlewares.insert(2, cors.preflight_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    if config.cors_origins:
        app.on_response_prepare.append(cors.allow_origin)
    app[CONFIG] = config
    app[HEADERS] = HeaderCache()
    app[PROJECTS] = ProjectCache()
    app[METRICS] = metrics if metrics is not None else NoMetrics()
    app[READINESS] = SharedCheck(fresh_s=1.0)
    app.on_response_prepare.append(_server_header)
    app.on_response_prepare.append(name_the_request)
    app.on_shutdown.append(_end_streams)
    app.cleanup_ctx.extend([auth_ctx, nats_ctx, postgres_ctx, redis_ctx, hubs_ctx, limits_ctx])
    add_routes(app)
    return app
