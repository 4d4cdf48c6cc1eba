"""A server behind the edge that is down gives a clear 503, and nothing is half-done."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from api.app import create_app
from api.config import EdgeConfig
from api.request_ids import HEADER
from parley.logs import with_request_id
from parley.services import Servers, Services
from tests.conftest import SECRET, extra_edge, token_for
from tests.sse import SseClient

# Nothing listens on port 1 of the loopback interface.
DEAD_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
async def edge_without_redis(stack: Servers) -> AsyncIterator[str]:
    config = EdgeConfig(
        nats_url=stack.nats_url,
        database_url=stack.database_url,
        redis_url=DEAD_REDIS,
        jwt_secret=SECRET,
        db_schema="parley_test",
        models=["demo"],
    )
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_a_dead_redis_is_a_503_with_retry_after_not_a_crash(
    edge_without_redis: str, http: aiohttp.ClientSession, user: str, services: Services
) -> None:
    # `services`: the session's worker answers this edge's messages
    api = SseClient(http, edge_without_redis, token_for(user))
    created = await api.create_conversation()  # needs only NATS (and waits for the projection)
    cid = created["id"]
    async with http.get(
        f"{edge_without_redis}/v1/conversations/{cid}", headers=api.headers()
    ) as response:
        body = await response.json()
        assert response.status == 503, body
        assert body["error"]["code"] == "unavailable"
        assert response.headers["Retry-After"] == "1"
    # an idempotency key lives in Redis: without it, refused before anything is sent
    status, body = await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages",
        json={"content": "hello", "idempotency_key": "k-1"},
    )
    assert status == 503 and body["error"]["code"] == "unavailable", body
    status, log = await api.request("GET", f"/v1/conversations/{cid}/log")
    assert status == 200 and "user_message" not in str(log), "no command went out"
    # a message without a key needs no Redis at the edge: the turn runs
    events = await api.send_stream(cid, "hello anyway [[tokens=3]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events
    async with http.get(f"{edge_without_redis}/readyz") as response:
        body = await response.json()
        assert response.status == 503 and body["checks"]["redis"] == "down", body
    # the probe is public: it names the kind of failure, not the server's address
    assert body["reasons"] and not any("127.0.0.1" in r for r in body["reasons"]), body


async def test_readyz_tells_a_client_when_to_look_again_only_while_unready(
    edge_without_redis: str, http: aiohttp.ClientSession, services: Services
) -> None:
    """A 503 from /readyz came without Retry-After: a load balancer or a client that
    honours it had nothing to go by. Its body stays the report it was."""
    async with http.get(f"{edge_without_redis}/readyz") as response:
        body = await response.json()
        assert response.status == 503 and body["status"] == "not_ready", body
        assert response.headers.get("Retry-After") == "2", dict(response.headers)
    async with http.get(f"{services.edge_url}/readyz") as response:
        assert response.status == 200, await response.text()
        assert "Retry-After" not in response.headers


async def test_the_readiness_check_probes_share_names_none_of_them(
    edge_without_redis: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes that come together share one check (api/context.py SharedCheck); it ran
    with the request id of the probe that started it, so its `readiness check failed`
    named that one probe, though it answered them all."""
    caplog.set_level(logging.INFO, logger="api.routes")
    caplog.handler.addFilter(with_request_id)

    async def probe(request_id: str) -> int:
        async with http.get(f"{edge_without_redis}/readyz", headers={HEADER: request_id}) as r:
            assert r.headers[HEADER] == request_id  # each answer still names its own
            return r.status

    assert list(await asyncio.gather(probe("probe-a"), probe("probe-b"))) == [503, 503]
    lines = [r for r in caplog.records if r.getMessage() == "readiness check failed"]
    assert lines, caplog.text
    assert [r.__dict__.get("request_id", "") for r in lines] == [""] * len(lines), caplog.text


async def test_a_redis_that_hangs_does_not_hold_every_request(
    stack: Servers, http: aiohttp.ClientSession, user: str
) -> None:
    """A Redis that takes connections and never answers (stopped, swapping): the
    limits wait for it half a second, then let the request through unlimited."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # says nothing back, ever

    hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    try:
        async with extra_edge(stack, redis_url=f"redis://127.0.0.1:{port}/0") as base:
            async with asyncio.timeout(5):  # not 10 s a request
                for _ in range(3):
                    async with http.get(
                        f"{base}/v1/models", headers={"Authorization": f"Bearer {token_for(user)}"}
                    ) as response:
                        assert response.status == 200
    finally:
        hung.close()


async def test_a_line_the_edge_logs_while_serving_a_request_names_it(
    edge_without_redis: str,
    http: aiohttp.ClientSession,
    user: str,
    services: Services,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis away, a read that needs it is a 503 and a warning: the warning carries
    the id the answer gave, as every line does through parley's log handler."""
    caplog.set_level(logging.WARNING, logger="api.errors")
    caplog.handler.addFilter(with_request_id)
    api = SseClient(http, edge_without_redis, token_for(user))
    cid = (await api.create_conversation())["id"]
    async with http.get(api.url(f"/v1/conversations/{cid}"), headers=api.headers()) as response:
        assert response.status == 503
        answered = response.headers[HEADER]
    (line,) = [r for r in caplog.records if r.getMessage() == "dependency unavailable"]
    assert line.__dict__["request_id"] == answered
