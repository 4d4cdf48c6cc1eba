"""A role starting while JetStream does not answer waits for it, as it waits for a NATS
that is away, instead of stopping: CI saw a 3-node cluster, busy on a loaded machine,
leave a starting edge's STREAM.INFO unanswered for 10 s, and the edge never started."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.config import EdgeLimits
from events import broker
from parley.services import Servers, ServiceOptions, Services
from parley.stack import free_ports
from tests.conftest import SECRET
from tests.conftest import test_catalog as catalog_for_tests

NATS_SERVER = Path(sysconfig.get_path("scripts")) / "nats-server"


def nats_server(port: int, store: Path | None) -> subprocess.Popen[bytes]:
    """A nats-server on `port`; with JetStream (stored in `store`) or without it."""
    args = [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port)]
    if store is not None:
        args += ["-js", "-sd", str(store)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return


@pytest.fixture
def stopped_at_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    servers: list[subprocess.Popen[bytes]] = []
    yield servers
    for server in servers:
        server.terminate()
        server.wait(10)


async def test_a_role_that_starts_before_jetstream_answers_waits_for_it(
    stack: Servers,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stopped_at_end: list[subprocess.Popen[bytes]],
) -> None:
    port = free_ports(1)[0]
    stopped_at_end.append(nats_server(port, store=None))  # NATS, but no JetStream
    await listening(port)
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=catalog_for_tests(),
        model_base_url="http://127.0.0.1:9/v1",  # the edge never asks a model
        db_schema="start_test",
        port=0,
        limits=EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0),
    )
    servers = Servers(
        nats_url=f"nats://127.0.0.1:{port}",
        database_url=stack.database_url,
        redis_url=stack.redis_url,
    )
    edge = Services(servers, options, ("edge",))
    caplog.set_level(logging.WARNING, logger="parley.services")
    starting = asyncio.create_task(edge.__aenter__())
    try:
        async with asyncio.timeout(15):
            while not any("JetStream did not answer" in r.message for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert not starting.done()

        # the operator's fix: the same address, now with JetStream
        stopped_at_end[0].terminate()
        stopped_at_end[0].wait(10)
        stopped_at_end.append(nats_server(port, store=tmp_path / "jetstream"))
        async with asyncio.timeout(30):
            await starting
        assert edge.edge_url
        host, edge_port = edge.edge_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(edge_port)), timeout=5):
            pass  # the edge listens
    finally:
        if not starting.done():
            starting.cancel()
        elif starting.exception() is None:
            await edge.__aexit__(None, None, None)


async def test_an_outage_that_lasts_is_said_as_it_lasts(
    monkeypatch: pytest.MonkeyPatch, stopped_at_end: list[subprocess.Popen[bytes]]
) -> None:
    """Once connected, a role said "NATS connection lost; reconnecting" and then
    nothing, however long NATS stayed away, whatever refused it (each failed attempt
    at debug level only). Now a failed attempt is said at warning level every
    `WAITING_REPORT_S` (here shortened), with how long NATS has been away."""
    monkeypatch.setattr(broker, "WAITING_REPORT_S", 0.3)
    (port,) = free_ports(1)
    server = nats_server(port, None)
    await listening(port)
    said: asyncio.Queue[tuple[int, str, dict[str, str]]] = asyncio.Queue()
    nc = await broker.connect(
        f"nats://127.0.0.1:{port}",
        name="outage",
        report=lambda level, message, fields: said.put_nowait((level, message, fields)),
    )
    try:
        server.terminate()
        server.wait(10)
        warnings: list[tuple[str, dict[str, str]]] = []
        async with asyncio.timeout(20):
            while len([m for m, _ in warnings if "still not reachable" in m]) < 2:
                level, message, fields = await said.get()
                if level >= logging.WARNING:
                    warnings.append((message, fields))
    finally:
        await nc.close()
    assert warnings[0][0] == "NATS connection lost; reconnecting", warnings
    away = [f for m, f in warnings if m == "NATS still not reachable; still trying"]
    assert all(f["client"] == "outage" and f["error"] for f in away), away
    assert float(away[0]["away_s"]) < float(away[1]["away_s"]), away
