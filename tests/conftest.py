"""Shared fixtures: one real embedded stack per test session, parley's roles on it.

Tests are isolated by fresh ids (every test makes its own conversations and
users) or by their own Postgres schema; never by mocks. The only double is the
model server, our demo model, which speaks the real OpenAI streaming format.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NatsClient
from playwright.async_api import Browser, async_playwright

from actors.models import ModelCatalog, ModelSpec, ModelVersion
from api.app import create_app
from api.auth import mint
from api.config import EdgeConfig, EdgeLimits
from api.listener import EagerTCPSite, EdgeRequestHandler, edge_runner
from events.broker import DirectClient, connect_client
from events.ids import new_id
from events.log import EventLog, ensure_streams
from parley.config import DEMO_SPEC
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services
from parley.stack import EmbeddedStack
from projections.db import create_pool, drop_schema
from projections.projector import Projector
from tests.sse import SseClient
from tests.tool_plugin import LIVE_TOOLS

# where every task waits, written before a hung test hits the suite's time limit
pytest_plugins = ["tests.hang_watch"]

SECRET = "test-secret-" + "x" * 32
MAIN_PROVIDER_KEY = "sk-main-provider"
# The demo model streams at this rate in tests: fast, yet a 100-token answer
# still takes long enough to disconnect and reconnect in the middle of it.
TEST_TOKENS_PER_S = 400.0


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop parley's processes run on (parley/loops.py): uvloop. On asyncio's own
    loop a viewer's closed socket raised OSError where uvloop raises ValueError,
    and the suite passed while `make run` broke (tests/test_hub_viewers.py)."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    data = Path(os.environ.get("PARLEY_TEST_DATA") or tmp_path_factory.mktemp("stack"))
    with EmbeddedStack(data) as running:
        yield running.urls


@pytest.fixture(scope="session")
async def demo_model_url() -> AsyncIterator[str]:
    runner, url = await start_demo_model("127.0.0.1", 0, DemoConfig(tokens_per_s=TEST_TOKENS_PER_S))
    yield url
    await runner.cleanup()


# A recorded OpenAI stream with text and usage (tests/data/openai-stream/SOURCES.md).
RECORDED_REPLY = (
    Path(__file__).parent
    / "data"
    / "openai-stream"
    / "openai-python__e2aad469b71d_text-with-usage.sse"
)


class Recorder:
    """A model server for tests that keeps every request body it gets and answers
    by replaying a recorded OpenAI transcript (tests/data/openai-stream).

    A test makes it answer as a given server would with `script`: the bytes each
    model call of a turn gets, for the turn whose user message is `message` (the
    first call the first bytes, the call after one tool round the second, ...).
    Bytes that are one JSON object go as `application/json`, as a server that
    ignores `stream: true` answers; any others as an event stream. A reply given
    as (status, bytes) is an error answer: that status, the bytes as JSON.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.keys: list[str | None] = []  # each request's Authorization header
        self.reply = RECORDED_REPLY.read_bytes()
        self._scripts: dict[str, list[bytes | tuple[int, bytes]]] = {}

    def script(self, message: str, *replies: bytes | tuple[int, bytes]) -> None:
        self._scripts[message] = list(replies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.keys.append(request.headers.get("Authorization"))
        reply: bytes | tuple[int, bytes] = self.reply
        users = [i for i, m in enumerate(body["messages"]) if m.get("role") == "user"]
        if users and body["messages"][users[-1]].get("content") in self._scripts:
            replies = self._scripts[body["messages"][users[-1]]["content"]]
            rounds = sum(1 for m in body["messages"][users[-1] :] if m.get("tool_calls"))
            reply = replies[min(rounds, len(replies) - 1)]
        if isinstance(reply, tuple):
            status, error = reply
            return web.Response(status=status, body=error, content_type="application/json")
        whole = reply.startswith(b"{")
        content_type = "application/json" if whole else "text/event-stream"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(reply)
        return response


async def demo_streams(http: aiohttp.ClientSession, demo_model_url: str) -> dict[str, int]:
    """The demo model's streams open now, and how many clients left one mid-answer."""
    async with http.get(demo_model_url + "/demo/streams") as response:
        stats: dict[str, int] = await response.json()
        return stats


@pytest.fixture(scope="session")
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    recording = Recorder()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", recording.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield recording, str(server.make_url("/v1"))
    await server.close()


def test_catalog(recorder_url: str = "http://127.0.0.1:1/v1") -> ModelCatalog:
    return ModelCatalog(
        models=[
            DEMO_SPEC,
            ModelSpec(name="other-demo", versions=DEMO_SPEC.versions),
            # nothing listens on port 1: a dead model server
            ModelSpec(name="unreachable-model", base_url="http://127.0.0.1:1/v1"),
            # served by the demo model, but with no active version: no price
            ModelSpec(
                name="unpriced-model",
                upstream_name="demo",
                versions=[ModelVersion(version="2025-01", status="deprecated", input_price=1.0)],
            ),
            ModelSpec(
                name="recorder",
                base_url=recorder_url,
                upstream_name="gpt-4o-2024-08-06",
                max_output_tokens=1234,
                versions=DEMO_SPEC.versions,
            ),
            # a model whose context window is known: its history is trimmed to fit
            ModelSpec(
                name="recorder-windowed",
                base_url=recorder_url,
                upstream_name="gpt-4o-2024-08-06",
                max_output_tokens=100,
                context_window=4000,
                versions=DEMO_SPEC.versions,
            ),
            # an endpoint that refuses OpenAI's defaults, as OpenAI's reasoning models
            # (temperature 1 only, max_completion_tokens), Mistral (no stream_options)
            # and xAI (no null content beside tool calls) do
            ModelSpec(
                name="recorder-strict",
                base_url=recorder_url,
                upstream_name="o3",
                max_output_tokens=321,
                temperature=1.0,
                max_tokens_field="max_completion_tokens",
                include_usage=False,
                tool_call_content="empty",
                versions=DEMO_SPEC.versions,
            ),
        ],
        default_model="demo",
    )


@pytest.fixture(scope="session")
async def services(
    stack: Servers, demo_model_url: str, recorder: tuple[Recorder, str]
) -> AsyncIterator[Services]:
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=test_catalog(recorder[1]),
        model_base_url=demo_model_url,
        # PARLEY_MODEL_API_KEY: the demo model's; never sent to a model with its own endpoint
        model_api_key=MAIN_PROVIDER_KEY,
        db_schema="parley_test",
        port=0,
        ping_interval_s=0.5,
        model_idle_timeout_s=3.0,
        tools=LIVE_TOOLS,
        model_retry_base_s=0.05,
        # The suite sends hundreds of requests per user in seconds: limits this high
        # never bite here, but every request still goes through them. The limits
        # themselves are tested on edges of their own (tests/test_limits.py).
        limits=EdgeLimits(
            rate_per_s=10_000,
            rate_burst=10_000,
            max_streams_per_user=10_000,
            max_turns_per_user=10_000,
        ),
    )
    async with Services(stack, options) as running:
        assert running.projector is not None
        async with asyncio.timeout(30):
            await running.projector.ready.wait()
        yield running


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture(scope="session")
async def nc(stack: Servers) -> AsyncIterator[NatsClient]:
    client = await nats.connect(stack.nats_url)
    yield client
    await client.drain()


@pytest.fixture(scope="session")
async def event_log(nc: NatsClient) -> EventLog:
    await ensure_streams(nc.jetstream())
    return EventLog(nc.jetstream())


@pytest.fixture(params=["callback", "direct"])
async def plain_or_direct(
    request: pytest.FixtureRequest, nc: NatsClient, stack: Servers, event_log: EventLog
) -> AsyncIterator[NatsClient]:
    """A connection of either kind, once the streams exist: the plain client (messages
    through a subscription's callback) or a DirectClient, every role's (straight from
    the read loop, events.broker)."""
    if request.param == "callback":
        yield nc
        return
    client = await connect_client(DirectClient(), stack.nats_url, name="test-direct")
    yield client
    await client.close()


def token_for(user: str, *, admin: bool = False) -> str:
    return mint(SECRET, user, admin=admin)


@pytest.fixture
def user() -> str:
    """A fresh user per test: its conversations are its own."""
    return f"u-{new_id()}"


Projected = Callable[[str], Awaitable[None]]


async def caught_up(projector: Projector, position: int) -> None:
    async with asyncio.timeout(30), projector.applied:
        await projector.applied.wait_for(lambda: projector.position >= position)


@pytest.fixture
def projected(services: Services, event_log: EventLog) -> Projected:
    """Wait until the session's projection has applied a conversation's whole log."""

    async def wait(conversation_id: str) -> None:
        """Every projection has applied the conversation's log, and whatever came before
        its last event (the accounts' and projects' events of its turns included)."""
        last = await event_log.last_seq(conversation_id)
        for projector in services.projectors.values():
            await caught_up(projector, last)

    return wait


@pytest.fixture
def api(services: Services, http: aiohttp.ClientSession, user: str) -> SseClient:
    return SseClient(http, services.edge_url, token_for(user))


@contextlib.asynccontextmanager
async def extra_edge(stack: Servers, **overrides: Any) -> AsyncIterator[str]:
    """One more edge on the session's servers, configured differently (limits, token
    sources): its base URL. It shares the read models of the `services` fixture, and
    listens as `parley serve` does (`EagerTCPSite`: what a closed connection looks
    like to a handler differs from aiohttp's test server)."""
    config = _edge_config(stack, overrides)
    runner = edge_runner(create_app(config), idle_timeout_s=config.limits.idle_timeout_s)
    await runner.setup()
    try:
        site = EagerTCPSite(runner, "127.0.0.1", 0, backlog=128, protocol=EdgeRequestHandler)
        await site.start()
        address: Any = runner.addresses[0]
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        await runner.cleanup()


def _edge_config(stack: Servers, overrides: dict[str, Any]) -> EdgeConfig:
    fields: dict[str, Any] = {
        "nats_url": stack.nats_url,
        "database_url": stack.database_url,
        "redis_url": stack.redis_url,
        "jwt_secret": SECRET,
        "db_schema": "parley_test",
        "models": ["demo"],
        **overrides,
    }
    return EdgeConfig(**fields)


@contextlib.asynccontextmanager
async def extra_edge_server(stack: Servers, **overrides: Any) -> AsyncIterator[TestServer]:
    """As `extra_edge`, on aiohttp's test server, for a test that looks into the
    edge's application too."""
    server = TestServer(create_app(_edge_config(stack, overrides)), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


# Debian's chromium, driven by Playwright (never a browser build Playwright would
# download): one browser for the session (tests/test_page.py, tests/test_cors.py).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        # `make test` installs it; a run without it must fail, never skip
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="session")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # launch() gives the browser a fresh temporary user data dir of its own
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        await launched.close()


@pytest.fixture
async def scratch(stack: Servers) -> AsyncIterator[tuple[str, Any]]:
    """A schema of its own (its name and a pool on it) for a test's projector or edge,
    dropped after the test."""
    schema = f"scratch_{new_id().lower()}"
    pool = await create_pool(stack.database_url, schema, max_size=4)
    yield schema, pool
    await pool.close()
    await drop_schema(stack.database_url, schema)
