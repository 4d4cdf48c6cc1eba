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
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Collection
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec
import nats
from aiohttp import web
from nats.aio.client import Client as NatsClient

from actors.actor import ActorContext
from actors.models import ModelCatalog
from actors.tools import BUILTIN_TOOLS
from actors.worker import WorkerHost
from api.app import create_app
from api.config import EdgeConfig
from events.ids import new_id
from events.log import EventLog, ensure_streams
from events.turns import TurnRegistry, redis_client
from parley.stack import StackUrls
from projections import feed
from projections.db import create_pool
from projections.projector import Projector

log = logging.getLogger(__name__)

ROLES = ("edge", "worker", "projector")

# Where NATS, Postgres and Redis are: the same three URLs whether the embedded
# stack started them or the environment named them.
Servers = StackUrls


class ServiceOptions(msgspec.Struct, frozen=True):
    jwt_secret: str
    catalog: ModelCatalog
    model_base_url: str
    model_api_key: str | None = None
    db_schema: str = "parley"
    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port
    ping_interval_s: float = 15.0
    model_idle_timeout_s: float = 120.0
    max_projection_lag: int = 10_000  # /readyz bound, events behind the log (0: never unready)


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
        self.projector: Projector | None = None
        self._stopping = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self.restarts: dict[str, int] = {}  # role -> times it was restarted after failing

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
        for task in self._tasks:
            # Loops watch `stopping` and end within a second; cancel is the backstop.
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception:
                log.exception("role ended with an error")
        self._tasks.clear()
        await self._stack.aclose()

    async def wait(self) -> None:
        """Until the services are stopped. A role that fails is restarted, never the process."""
        await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()

    async def _start(self) -> None:
        nc = await self._nats("parley-roles")
        js = nc.jetstream()
        await ensure_streams(js)
        if "projector" in self.roles:
            pool = await create_pool(self.servers.database_url, self.options.db_schema, max_size=4)
            self._stack.push_async_callback(pool.close)
            # its own connection, one that leaves entries' headers unparsed (feed.py)
            reader = await feed.connect(self.servers.nats_url, name="parley-projector")
            self._stack.push_async_callback(reader.drain)
            self.projector = Projector(reader.jetstream(), pool)
            projector = self.projector
            self._spawn(lambda: projector.run(self._stopping), "projector")
        if "worker" in self.roles:
            await self._start_worker(nc)
        if "edge" in self.roles:
            await self._start_edge()

    async def _nats(self, name: str) -> NatsClient:
        nc = await nats.connect(self.servers.nats_url, name=name, max_reconnect_attempts=-1)
        self._stack.push_async_callback(nc.drain)
        return nc

    async def _start_worker(self, nc: NatsClient) -> None:
        js = nc.jetstream()
        redis = redis_client(self.servers.redis_url)
        self._stack.push_async_callback(redis.aclose)
        http = aiohttp.ClientSession()
        self._stack.push_async_callback(http.close)
        ctx = ActorContext(
            log=EventLog(js),
            turns=TurnRegistry(redis),
            http=http,
            catalog=self.options.catalog,
            default_base_url=self.options.model_base_url,
            default_api_key=self.options.model_api_key,
            worker_id=f"{socket.gethostname()}-{new_id()}",
            tools={tool.name: tool for tool in BUILTIN_TOOLS},
            idle_timeout=self.options.model_idle_timeout_s,
            first_byte_timeout=self.options.model_idle_timeout_s,
            # half the server's limit: headers and a margin ride in the same message
            max_event_bytes=min(512 * 1024, nc.max_payload // 2),
        )
        worker = self.worker = WorkerHost(js, ctx)
        self._spawn(lambda: worker.run(self._stopping), "worker")
        async with asyncio.timeout(30):
            await self.worker.ready.wait()

    async def _start_edge(self) -> None:
        options = self.options
        config = EdgeConfig(
            nats_url=self.servers.nats_url,
            database_url=self.servers.database_url,
            redis_url=self.servers.redis_url,
            jwt_secret=options.jwt_secret,
            db_schema=options.db_schema,
            models=[m.name for m in options.catalog.models],
            default_model=options.catalog.default_model,
            ping_interval_s=options.ping_interval_s,
            max_projection_lag=options.max_projection_lag,
        )
        runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        port = _bound_port(runner)
        host = f"[{options.host}]" if ":" in options.host else options.host
        self.edge_url = f"http://{host}:{port}"

    def _spawn(self, role: Callable[[], Awaitable[None]], name: str) -> None:
        self._tasks.append(
            asyncio.create_task(supervise(role, name, self._stopping, self.restarts), name=name)
        )


BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# A role that ran this long before failing starts its backoff afresh.
HEALTHY_RUN_S = 60.0


async def supervise(
    role: Callable[[], Awaitable[None]],
    name: str,
    stopping: asyncio.Event,
    restarts: dict[str, int],
) -> None:
    """Run `role` until `stopping`; when it raises (or returns early), log why and
    start it again after an exponential backoff with jitter. Only `stopping` ends it."""
    loop = asyncio.get_running_loop()
    delay = BACKOFF_FIRST_S
    while not stopping.is_set():
        began = loop.time()
        try:
            await role()
        except Exception as err:
            log.error(
                "role failed; restarting it",
                exc_info=err,
                extra={"role": name, "error": repr(err), "retry_in_s": round(delay, 2)},
            )
        else:
            if stopping.is_set():
                return
            log.error("role ended by itself; restarting it", extra={"role": name})
        restarts[name] = restarts.get(name, 0) + 1
        if loop.time() - began > HEALTHY_RUN_S:
            delay = BACKOFF_FIRST_S
        try:
            async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):
                await stopping.wait()
        except TimeoutError:
            pass
        delay = min(delay * 2, BACKOFF_MAX_S)


def _bound_port(runner: web.AppRunner) -> int:
    address: Any = runner.addresses[0]
    return int(address[1])
