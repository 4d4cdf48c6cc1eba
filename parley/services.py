"""Running parley's roles (edge, worker, projector) in one process.

`Services` is an async context manager: entering starts the chosen roles
against the given servers and returns once each is ready (the edge listens,
the worker's consumer and the projector's subscription exist); leaving stops
them, each finishing or recording what it was doing. `parley dev`, `parley
serve`, the benchmark and the test suite all run parley through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext

from actors.billing import Accounts
from actors.builtin_tools import BUILTIN_TOOLS
from actors.models import ModelCatalog
from actors.snapshots import SNAPSHOT_EVERY, SnapshotStore
from actors.tools import Tool, ToolRunner, load_tools, merge_tools
from actors.turn import ActorContext
from actors.webhooks import WebhookDispatcher, WebhookSettings
from actors.worker import WorkerHost
from actors.writer import AppendTick
from api.app import create_app
from api.config import LISTEN_BACKLOG, EdgeConfig, EdgeLimits
from api.listener import EagerTCPSite, EdgeRequestHandler, edge_runner
from events import broker
from events.broker import NatsSecurity, security_problem
from events.errors import EventLogUnavailable, describe, without_userinfo
from events.ids import new_id
from events.log import EventLog, ensure_streams
from events.turns import TurnRegistry, redis_client
from parley.awaits import where_waiting
from parley.config import ConfigError, Settings
from parley.metrics import Metrics, metrics_app
from parley.stack import StackUrls, running_stack_urls
from parley.stalls import StallWatch
from projections import feed
from projections.catalog import PROJECTIONS
from projections.db import close_pool, create_pool
from projections.handlers import READ_MODELS
from projections.models import ModelRow, VersionRow, store_models
from projections.projector import Projector

log = logging.getLogger(__name__)

ROLES = ("edge", "worker", "projector")

# Restarting a role that failed (`supervise`).
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
PROJECTOR_BACKOFF_MAX_S = 5.0
# A role that ran this long before failing starts its backoff afresh.
HEALTHY_RUN_S = 60.0
# A role cancelled at the stop's deadline gets this long to end.
ROLE_CANCELLED_WITHIN_S = 5.0

# Where NATS, Postgres and Redis are: the same three URLs whether the embedded
# stack started them or the environment named them.
Servers = StackUrls


def resolve_servers(settings: Settings) -> Servers:
    """The servers named in the environment, else the dev stack running on the data folder."""
    named = {
        "PARLEY_NATS_URL": settings.nats_url,
        "PARLEY_DATABASE_URL": settings.database_url,
        "PARLEY_REDIS_URL": settings.redis_url,
    }
    if any(named.values()):
        missing = [name for name, value in named.items() if not value]
        if missing:
            raise ConfigError(
                f"set {', '.join(missing)} too, or none of the PARLEY_*_URL variables"
            )
        problem = security_problem(settings.nats_security)
        if problem is not None:
            raise ConfigError(problem)
        return Servers(
            nats_url=settings.nats_url or "",
            database_url=settings.database_url or "",
            redis_url=settings.redis_url or "",
            nats_security=settings.nats_security,
        )
    if settings.nats_security != NatsSecurity():
        raise ConfigError(
            "PARLEY_NATS_TLS_*, PARLEY_NATS_CREDS and PARLEY_NATS_NKEY apply to the servers "
            "of PARLEY_NATS_URL: set it (and the other PARLEY_*_URL) too"
        )
    urls = running_stack_urls(settings.data_dir)
    if urls is None:
        raise ConfigError(
            f"no servers configured (PARLEY_NATS_URL, PARLEY_DATABASE_URL, PARLEY_REDIS_URL) "
            f"and no `parley dev` running on {settings.data_dir}"
        )
    return urls


class ServiceOptions(msgspec.Struct, frozen=True, kw_only=True):
    catalog: ModelCatalog
    model_base_url: str
    # tokens the edge accepts (api/auth.py): the HS256 secret and/or an identity provider's JWKS
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    model_api_key: str | None = None
    db_schema: str = "parley"
    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port
    ping_interval_s: float = 15.0
    limits: EdgeLimits = EdgeLimits()
    model_idle_timeout_s: float = 120.0
    # tools beyond the built-ins: `module:attribute` specs (PARLEY_TOOLS), the
    # `parley.tools` entry points, and Tool objects handed in directly (tests)
    tool_specs: tuple[str, ...] = ()
    tool_entry_points: bool = True
    tools: tuple[Tool, ...] = ()
    # how long a stopping worker lets running turns finish
    shutdown_grace_s: float = 10.0
    # streamed text waits up to this long to share an append (actors.writer.AppendTick)
    append_window_s: float = 0.005
    # ... and this long while the worker has CPU to spare
    append_window_light_s: float = 0.001
    # a conversation's snapshot is written every this many entries (actors.snapshots; 0: never)
    snapshot_every: int = SNAPSHOT_EVERY
    model_retry_base_s: float = 0.5
    decision_wait_s: float = 5.0  # how long a POST waits for the actor's accept/refuse
    # how long a worker's append waits for a broker that is away before its turn
    # ends as failed: long enough to ride out a restart or a leader election
    log_outage_s: float = 30.0
    # turn-end webhooks, sent by the worker role (actors/webhooks.py)
    webhook: WebhookSettings | None = None
    max_projection_lag: int = 10_000  # /readyz bound, events behind the log (0: never unready)
    # where a process without the edge role serves GET /metrics (None: nowhere)
    metrics_port: int | None = None
    # replicas of the streams and the lease bucket, when this process creates them
    stream_replicas: int = 1
    # origins whose pages may call the edge from a browser (api/cors.py)
    cors_origins: frozenset[str] = frozenset()


# how often a starting process asks a JetStream that did not answer again
_STREAMS_RETRY_FIRST_S = 0.5
_STREAMS_RETRY_MAX_S = 5.0


def _freeze_startup_heap() -> None:
    """Leave what start-up made (modules, classes, the catalog: ~70,000 objects) out
    of every later collection. A full collection in `parley dev` scanned them each
    time and stopped the loop for 45-70 ms mid-burst (bench burst, gc callbacks);
    these objects live as long as the process anyway."""
    gc.collect()
    gc.freeze()


class Services:
    def __init__(
        self, servers: Servers, options: ServiceOptions, roles: Collection[str] = ROLES
    ) -> None:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        self.servers = servers
        self.options = options
        self.roles = frozenset(roles)
        self.edge_url = ""
        self.worker: WorkerHost | None = None
        self.projector: Projector | None = None  # the read models' (what the edge reads)
        self.projectors: dict[str, Projector] = {}
        self.webhooks: WebhookDispatcher | None = None
        self._stopping = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        # finished once the roles that use them stopped (`__aexit__`)
        self._connections: list[NatsClient] = []
        self._tasks: list[asyncio.Task[None]] = []
        # the edge's listener, stopped first at a stop; each listener's stop once
        # begun (`_stop_serving`)
        self._edge_runners: list[web.AppRunner] = []
        self._runner_stops: dict[web.AppRunner, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}  # role -> times it was restarted after failing
        # one registry for every role of this process; the edge's /metrics shows it
        self.metrics = Metrics()
        self.metrics_url = ""
        # what the start waits for now, said when a process is stopped while it starts
        self.starting = ""

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        # The edge stops listening now, and its streams end while the roles stop: a
        # turn that a worker of this process finishes in its grace reaches its viewers.
        # (A process without the edge serves /metrics until its roles stopped: the
        # drain of a worker's turns shows there.)
        for runner in self._edge_runners:
            self._runner_stops.setdefault(runner, asyncio.create_task(runner.cleanup()))
        # Roles watch `stopping` and end within the grace (a worker's running turns) and
        # a few seconds more; cancel is the backstop, one deadline for all of them.
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self.options.shutdown_grace_s + 10)
            for task in late:
                log.warning(
                    "role did not stop in time; cancelled",
                    extra={"role": task.get_name(), "waiting_in": where_waiting(task)},
                )
                task.cancel()
            if late:
                # a role that does not end even now is left to the process's end
                # (parley.loops.run), and the connections it uses are finished under it
                _, deaf = await asyncio.wait(late, timeout=ROLE_CANCELLED_WITHIN_S)
                for task in deaf:
                    log.error(
                        "role did not end when cancelled; stopping without it",
                        extra={"role": task.get_name(), "waiting_in": where_waiting(task)},
                    )
            ended = [task for task in self._tasks if task.done()]
            for outcome in await asyncio.gather(*ended, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.error("role ended with an error", exc_info=outcome)
        self._tasks.clear()
        # The roles are done with this process's own NATS connections: they finish side
        # by side with the edge's stop (which finishes the edge's), not after it.
        await asyncio.gather(self._finish_connections(), self._stack.aclose())

    async def _stop_serving(self, runner: web.AppRunner) -> None:
        """Stop `runner` (in the exit stack's order), or wait for its stop begun in
        `__aexit__`."""
        stop = self._runner_stops.pop(runner, None)
        await (stop if stop is not None else runner.cleanup())

    def _count_stall(self, held_s: float) -> None:
        self.metrics.loop_stalls.inc()
        self.metrics.loop_stalled_seconds.inc(held_s)

    async def wait(self) -> None:
        """Until the services are stopped. A role that fails is restarted, never the process."""
        await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()

    async def _start(self) -> None:
        stalls = StallWatch(counted=self._count_stall, lagged=self.metrics.loop_lag_seconds.observe)
        stalls.start()
        self._stack.callback(stalls.stop)
        # A deployment's tools are loaded first: one that cannot be (a spec naming no
        # module, a bad name) stops the worker at once, not after the servers answered.
        tools = self._load_tools() if "worker" in self.roles else None
        nc = await self._nats("parley-roles")
        js = nc.jetstream()
        self.starting = "JetStream (the streams)"
        for note in await self._ensure_streams(js):
            log.info(note)
        if self.roles & {"edge", "worker"}:
            self.starting = "Redis"
            await check_redis(self.servers.redis_url)
        if "projector" in self.roles:
            # one projector per projection: each its own position, lock and restarts
            self.starting = "Postgres"
            pool = await create_pool(
                self.servers.database_url, self.options.db_schema, max_size=2 + 2 * len(PROJECTIONS)
            )
            self._stack.push_async_callback(close_pool, pool)
            for name, projection in PROJECTIONS.items():
                # each reads the log through a connection of its own, one that leaves
                # entries' headers unparsed (projections/feed.py), to the same nodes
                self.starting = f"NATS (parley-projector-{name})"
                reader = await feed.connect(
                    self.servers.nats_url,
                    name=f"parley-projector-{name}",
                    security=self.servers.nats_security,
                )
                self._connections.append(reader)
                projector = Projector(reader.jetstream(), pool, projection=projection)
                self.projectors[name] = projector
                # Postgres away fails a projector at once: try again often enough that
                # it catches up within seconds of Postgres coming back
                self._spawn(
                    _runner(projector, self._stopping),
                    f"projector-{name}",
                    max_backoff_s=PROJECTOR_BACKOFF_MAX_S,
                )
            self.projector = self.projectors[READ_MODELS.name]
        if tools is not None:
            await self._start_worker(nc, tools)
        if "edge" in self.roles:
            await self._start_edge()
        elif self.options.metrics_port is not None:
            metrics = metrics_app(self.metrics)
            self.metrics_url = await self._serve(metrics, self.options.metrics_port) + "/metrics"
        self.starting = ""
        _freeze_startup_heap()

    async def _ensure_streams(self, js: JetStreamContext) -> list[str]:
        """The streams, as `ensure_streams`, waited for: JetStream that does not answer
        yet (a cluster electing its leader, a node still starting, a server without
        JetStream about to be replaced) stops no role, as NATS away stops none. A
        stream parley cannot use still stops the process, with its reason."""
        delay = _STREAMS_RETRY_FIRST_S
        while True:
            try:
                return await ensure_streams(js, replicas=self.options.stream_replicas)
            except EventLogUnavailable as err:
                log.warning(
                    "JetStream did not answer at start; trying again",
                    extra={"error": describe(err), "retry_in_s": delay},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _STREAMS_RETRY_MAX_S)

    async def _nats(self, name: str) -> NatsClient:
        self.starting = f"NATS ({name})"
        nc = await broker.connect(
            self.servers.nats_url,
            name=name,
            report=_report,
            security=self.servers.nats_security,
        )
        self._connections.append(nc)
        return nc

    async def _finish_connections(self) -> None:
        """Every NATS connection drained, side by side: with NATS away, each waits out
        `broker.finish`'s bound, and a process told to stop must stop in time."""
        connections, self._connections = self._connections, []
        await asyncio.gather(*(broker.finish(nc, report=_report) for nc in connections))

    def _load_tools(self) -> ToolRunner:
        return ToolRunner(
            merge_tools(
                BUILTIN_TOOLS,
                load_tools(
                    self.options.tool_specs, use_entry_points=self.options.tool_entry_points
                ),
                self.options.tools,
            )
        )

    async def _start_worker(self, nc: NatsClient, tools: ToolRunner) -> None:
        js = nc.jetstream()
        redis = redis_client(self.servers.redis_url)
        self._stack.push_async_callback(redis.aclose)
        http = outbound_session()
        self._stack.push_async_callback(http.close)
        event_log = EventLog(js, retry_for_s=self.options.log_outage_s, observer=self.metrics)
        ctx = ActorContext(
            log=event_log,
            accounts=Accounts(event_log, time.time_ns, new_id),
            turns=TurnRegistry(redis),
            http=http,
            catalog=self.options.catalog,
            default_base_url=self.options.model_base_url,
            default_api_key=self.options.model_api_key,
            worker_id=f"{socket.gethostname()}-{new_id()}",
            tools=tools,
            retry_base_s=self.options.model_retry_base_s,
            idle_timeout=self.options.model_idle_timeout_s,
            first_byte_timeout=self.options.model_idle_timeout_s,
            # half the server's limit: headers and a margin ride in the same message
            max_event_bytes=min(512 * 1024, nc.max_payload // 2),
            observer=self.metrics,
            append_tick=AppendTick(
                self.options.append_window_s, self.options.append_window_light_s
            ),
            snapshots=SnapshotStore(redis, every=self.options.snapshot_every),
        )
        worker = self.worker = WorkerHost(
            js,
            ctx,
            grace_s=self.options.shutdown_grace_s,
            replicas=self.options.stream_replicas,
        )
        if self.options.webhook is not None:
            webhooks = self.webhooks = WebhookDispatcher(
                js, self.options.webhook, http, observer=self.metrics, log=event_log
            )
            self._spawn(lambda: webhooks.run(self._stopping), "webhooks")
        self._spawn(lambda: worker.run(self._stopping), "worker")
        self.starting = "the worker's consumers"
        async with asyncio.timeout(30):
            await self.worker.ready.wait()

    async def _start_edge(self) -> None:
        options = self.options
        self.starting = "Postgres (the models)"
        await self._store_catalog()
        config = EdgeConfig(
            nats_url=self.servers.nats_url,
            nats_security=self.servers.nats_security,
            database_url=self.servers.database_url,
            redis_url=self.servers.redis_url,
            jwt_secret=options.jwt_secret,
            jwks_url=options.jwks_url,
            jwt_issuer=options.jwt_issuer,
            jwt_audience=options.jwt_audience,
            db_schema=options.db_schema,
            models=[m.name for m in options.catalog.models],
            default_model=options.catalog.default_model,
            ping_interval_s=options.ping_interval_s,
            decision_wait_s=options.decision_wait_s,
            limits=options.limits,
            max_projection_lag=options.max_projection_lag,
            stream_replicas=options.stream_replicas,
            cors_origins=options.cors_origins,
            # a little past a worker's grace: a turn it ends then still reaches its viewers
            stop_grace_s=options.shutdown_grace_s + 2.0,
        )
        self.starting = "the edge's connections (NATS, Postgres, Redis)"
        self.edge_url = await self._serve(create_app(config, self.metrics), options.port, edge=True)

    async def _serve(self, app: web.Application, port: int, *, edge: bool = False) -> str:
        """Listen with `app` on the configured host; its base URL."""
        options = self.options
        runner = edge_runner(app, idle_timeout_s=options.limits.idle_timeout_s)
        await runner.setup()
        self._stack.push_async_callback(self._stop_serving, runner)
        if edge:
            self._edge_runners.append(runner)
        site = EagerTCPSite(
            runner, options.host, port, backlog=LISTEN_BACKLOG, protocol=EdgeRequestHandler
        )
        await site.start()
        host = f"[{options.host}]" if ":" in options.host else options.host
        return f"http://{host}:{_bound_port(runner)}"

    async def _store_catalog(self) -> None:
        """The models file, into the models tables the edge answers GET /v1/models from."""
        pool = await create_pool(self.servers.database_url, self.options.db_schema, max_size=1)
        try:
            await store_models(pool, catalog_rows(self.options.catalog))
        finally:
            await pool.close()

    def _spawn(
        self,
        role: Callable[[], Awaitable[None]],
        name: str,
        *,
        max_backoff_s: float = BACKOFF_MAX_S,
    ) -> None:
        supervised = supervise(role, name, self._stopping, self.restarts, max_backoff_s)
        self._tasks.append(asyncio.create_task(supervised, name=name))


def outbound_session() -> aiohttp.ClientSession:
    """The worker's HTTP client, for the models and the webhooks' receiver.

    No cap on connections: every running turn holds one stream open (aiohttp's
    default, 100, queued the 101st turn and failed it after the connect timeout at
    500 turns at once; a provider that wants fewer says 429). No cookies: a server
    calling others on everyone's behalf keeps no state between its requests, and a
    cookie a model host set would otherwise go to a webhook receiver of the same
    domain, and back to the host with every other conversation's request.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    )


# Every command parley's Lua scripts call (api/limits.py, events/turns.py), each
# once on a key of parley's, through pcall: a command the user may not run is
# named (Redis says only "The user executing the script can't run this command").
_PROBE_SCRIPT = """
local k = KEYS[1]
local calls = {
  {'TIME'}, {'SET', k, '1', 'PX', '10000'}, {'GET', k}, {'PEXPIRE', k, '10000'},
  {'DEL', k}, {'HSET', k, 'tokens', '1', 'ts', '1'}, {'HMGET', k, 'tokens', 'ts'},
  {'DEL', k}, {'ZADD', k, '1', 'm'}, {'ZADD', k, 'XX', '2', 'm'}, {'ZSCORE', k, 'm'},
  {'ZCARD', k}, {'ZREMRANGEBYSCORE', k, '-inf', '0'}, {'ZREM', k, 'm'}, {'DEL', k},
}
for _, call in ipairs(calls) do
  local answer = redis.pcall(unpack(call))
  if type(answer) == 'table' and answer.err then
    redis.pcall('DEL', k)
    return call[1] .. ': ' .. answer.err
  end
end
return ''
"""
# the redis-py parameters of a rediss:// URL that name files
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")
# how long a TLS handshake may take before parley asks whether the server speaks
# plain RESP instead (one that does never answers a ClientHello: it waits for a
# line end that may never come)
_TLS_ANSWER_S = 0.5


async def check_redis(url: str) -> None:
    """At start: what in PARLEY_REDIS_URL cannot work stops the process (ConfigError).

    A Redis that is away is waited out as "Faults" says (limits let requests
    through, idempotency keys answer 503). Configuration is not an outage, and
    would have the same effects for as long as the process runs: a URL redis-py
    cannot use, TLS files that are missing or not PEM, a rediss:// URL to a Redis
    without TLS, credentials Redis refuses, an ACL user that may not run a
    command parley needs or touch its keys (`parley:*`).
    """
    problem = redis_url_problem(url)
    if problem is not None:
        raise ConfigError(f"PARLEY_REDIS_URL: {problem}")
    client = redis_client(url, max_connections=1, wait_s=1.0)
    try:
        async with asyncio.timeout(3):
            await _first_use(client, url)
    except redis.exceptions.AuthenticationError as err:
        raise ConfigError(
            f"Redis refused the credentials of PARLEY_REDIS_URL ({describe(err)}): give it "
            "the password Redis has (`requirepass`), redis://:password@host:6379/0, or "
            "redis://user:password@host:6379/0 for an ACL user"
        ) from err
    except redis.exceptions.ResponseError as err:
        refusal = _acl_refusal(err)
        if refusal is None:
            log.warning("Redis answered an error at start", extra={"error": describe(err)})
        else:
            raise ConfigError(refusal) from err
    except (redis.exceptions.RedisError, OSError, TimeoutError) as err:
        log.warning(
            "Redis not reachable at start; limits let requests through until it is",
            extra={"error": describe(err)},
        )
    finally:
        await client.aclose()


def redis_url_problem(url: str) -> str | None:
    """What redis-py cannot use in `url`, in one line, or None. Checked before
    connecting; never quotes the URL (it holds the password) nor a file's content."""
    try:
        pool = aioredis.ConnectionPool.from_url(url)
        connection = pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError, redis.exceptions.RedisError) as err:
        # a misspelt parameter, a value of the wrong kind, an unknown scheme, a
        # password with a / # ? not percent-encoded (then quoted as the port)
        return (
            f"redis-py cannot use it ({without_userinfo(describe(err), url)}); a password "
            "holding / # ? @ must be percent-encoded (%2F %23 %3F %40)"
        )
    if not isinstance(connection, aioredis.SSLConnection):
        return None
    options = pool.connection_kwargs
    for name in _TLS_FILES:
        path = options.get(name)
        if not path:
            continue
        if not os.path.exists(path):
            return f"{name}: {path} does not exist"
        if not os.access(path, os.R_OK):
            return f"{name}: {path} cannot be read"
    try:
        connection.ssl_context.get()
    except (ssl.SSLError, OSError) as err:
        return (
            f"its TLS files ({', '.join(n for n in _TLS_FILES if options.get(n))}) cannot "
            f"be loaded as PEM certificates and an unencrypted key ({describe(err)})"
        )
    return None


async def _first_use(client: aioredis.Redis, url: str) -> None:
    """What parley does with Redis, once each; for a rediss:// URL, a server that
    speaks no TLS is told apart from one that does not answer."""
    use = asyncio.ensure_future(_use_once(client))
    try:
        options = aioredis.ConnectionPool.from_url(url).connection_kwargs
        if url.startswith("rediss://"):
            done, _ = await asyncio.wait({use}, timeout=_TLS_ANSWER_S)
            stuck = not done or isinstance(use.exception(), redis.exceptions.ConnectionError)
            host, port = options.get("host", "localhost"), int(options.get("port", 6379))
            if stuck and await _speaks_plain_resp(host, port):
                raise ConfigError(
                    f"PARLEY_REDIS_URL is rediss:// (TLS) and the Redis at {host}:{port} "
                    "speaks no TLS: write redis:// for it, or give the server TLS "
                    "(tls-port, tls-cert-file, tls-key-file)"
                )
        await use
    finally:
        if not use.done():
            use.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await use


async def _use_once(client: aioredis.Redis) -> None:
    key = f"parley:probe:{new_id()}"
    await client.ping()
    sha = await client.script_load(_PROBE_SCRIPT)  # the limits' scripts: EVALSHA
    refused = await client.evalsha(sha, 1, key)
    if not refused:
        refused = await client.eval(_PROBE_SCRIPT, 1, key)  # the turn records': EVAL
    if refused:
        # whatever a command of the script answered: a refusal (NOPERM, a renamed
        # command) is configuration, anything else (OOM at maxmemory, READONLY on a
        # replica, MISCONF after a failed save) is Redis's state of the moment
        raise redis.exceptions.ResponseError(f"in a Lua script, {refused.decode()}")
    await client.set(key, b"1", nx=True, px=10_000)
    await client.mget([key, key])
    await client.get(key)
    await client.expire(key, 10)
    await client.delete(key)
    await client.scan(0, match=f"{key}*", count=1)


async def _speaks_plain_resp(host: str, port: int) -> bool:
    """Whether the server answers a plain-text PING as Redis does (+PONG, or an error
    such as -NOAUTH): only then is the TLS failure before it the URL's fault."""
    try:
        async with asyncio.timeout(1):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return line[:1] in (b"+", b"-") and line.endswith(b"\r\n")


def _acl_refusal(err: redis.exceptions.ResponseError) -> str | None:
    """The line to stop with when `err` is Redis refusing the user what parley needs."""
    text = str(err)
    lowered = text.lower()
    if not (
        isinstance(err, redis.exceptions.NoPermissionError)
        or "noperm" in lowered
        or "no permissions" in lowered
        or "can't run this command" in text
        or "can't access" in text
        or "unknown command" in lowered
        or "unknown redis command" in lowered
    ):
        return None
    return (
        f"Redis refused the user of PARLEY_REDIS_URL a command parley needs "
        f"({describe(err)}): parley runs GET, SET, MGET, DEL, EXPIRE, SCAN, TIME, hashes, "
        "sorted sets and Lua scripts (EVAL, EVALSHA, SCRIPT LOAD) on keys parley:*; for "
        "an ACL user, e.g. ACL SETUSER <user> on ><password> ~parley:* +@read +@write "
        "+@scripting +@connection +time"
    )


def catalog_rows(catalog: ModelCatalog) -> list[ModelRow]:
    return [
        ModelRow(
            name=spec.name,
            base_url=spec.base_url,
            max_output_tokens=spec.max_output_tokens,
            is_default=spec.name == catalog.default_model,
            versions=[
                VersionRow(
                    version=v.version,
                    status=v.status,
                    is_default=v.is_default,
                    release_date=v.release_date,
                    input_price=v.input_price,
                    output_price=v.output_price,
                )
                for v in spec.versions
            ],
        )
        for spec in catalog.models
    ]


def _report(level: int, message: str, fields: dict[str, str]) -> None:
    log.log(level, message, extra=fields)


def _runner(projector: Projector, stopping: asyncio.Event) -> Callable[[], Awaitable[None]]:
    return lambda: projector.run(stopping)


async def supervise(
    role: Callable[[], Awaitable[None]],
    name: str,
    stopping: asyncio.Event,
    restarts: dict[str, int],
    max_backoff_s: float = BACKOFF_MAX_S,
) -> None:
    """Run `role` until `stopping`; when it raises (or returns early), log why and
    start it again after an exponential backoff with jitter (up to `max_backoff_s`).
    Only `stopping` ends it."""
    loop = asyncio.get_running_loop()
    delay = BACKOFF_FIRST_S
    last_failure: type[BaseException] | None = None
    while not stopping.is_set():
        began = loop.time()
        try:
            await role()
        except Exception as err:
            if stopping.is_set():
                # a server that is away fails what a stopping role still asks of it
                log.warning(
                    "role stopped with an error", extra={"role": name, "error": describe(err)}
                )
                return
            # The traceback once per kind of failure in a row: a role that fails every
            # few seconds while a server is away says the same thing each time.
            log.error(
                "role failed; restarting it",
                exc_info=err if type(err) is not last_failure else None,
                extra={"role": name, "error": describe(err), "retry_in_s": round(delay, 2)},
            )
            last_failure = type(err)
        else:
            if stopping.is_set():
                return
            log.error("role ended by itself; restarting it", extra={"role": name})
        restarts[name] = restarts.get(name, 0) + 1
        if loop.time() - began > HEALTHY_RUN_S:
            delay = BACKOFF_FIRST_S
            last_failure = None
        try:
            async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):
                await stopping.wait()
        except TimeoutError:
            pass
        delay = min(delay * 2, max_backoff_s)


def _bound_port(runner: web.AppRunner) -> int:
    address: Any = runner.addresses[0]
    return int(address[1])
