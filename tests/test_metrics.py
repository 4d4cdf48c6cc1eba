"""GET /metrics and /readyz: what an operator scrapes and probes, on the live stack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import nats
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Done
from parley.metrics import Metrics, metrics_app
from parley.services import Servers, Services
from projections.db import create_pool
from tests.conftest import _edge_config as edge_config
from tests.conftest import extra_edge
from tests.sse import SseClient

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain", response.content_type
        return parsed(await response.text())


def parsed(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until_scraped(
    http: aiohttp.ClientSession, url: str, holds: Callable[[Samples], bool]
) -> Samples:
    """Scrape until `holds` (a counter has no signal to await), within 10 s."""
    async with asyncio.timeout(10):
        while not holds(samples := await scrape(http, url)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return samples


async def test_a_turn_moves_the_turn_token_latency_and_request_counters(
    api: SseClient, services: Services, http: aiohttp.ClientSession, event_log: EventLog
) -> None:
    url = services.edge_url
    done = {"model": "demo", "outcome": "done"}
    before = await scrape(http, url)
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "count with me [[tokens=12]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events[-3:]
    (end,) = [s.event for s in await event_log.read(cid) if isinstance(s.event, Done)]

    # The turn is counted as its runner returns, just after `done` is in the log:
    # await that moment (the counter), then read everything else from the same scrape.
    after = await until_scraped(
        http,
        url,
        lambda now: (
            value(now, "parley_turns_total", **done) > value(before, "parley_turns_total", **done)
        ),
    )

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("parley_tokens_total", model="demo", direction="input") >= end.input_tokens > 0
    assert moved("parley_tokens_total", model="demo", direction="output") >= end.output_tokens > 0
    assert moved("parley_time_to_first_token_seconds_count", model="demo") >= 1
    assert moved("parley_model_call_duration_seconds_count", model="demo") >= 1
    route = {"route": "/v1/conversations/{id}/messages", "method": "POST", "status": "200"}
    assert moved("parley_http_requests_total", **route) >= 1
    assert (
        moved("parley_http_requests_total", route="/v1/conversations", method="POST", status="201")
        >= 1
    )
    # the gauges exist, and the projection's are read at scrape time
    for gauge in ("parley_turns_active", "parley_sse_viewers", "parley_projection_lag_events"):
        assert any(name == gauge for name, _ in after), f"{gauge} missing"
    assert value(after, "parley_projection_errors") >= 0


async def test_each_projections_lag_is_scraped_the_billing_one_too(
    stack: Servers, api: SseClient, http: aiohttp.ClientSession
) -> None:
    """`parley_projection_lag_events` was the read models' lag alone: a billing
    projection 270,000 entries behind (its ledger and balances that far out of date)
    showed as a lag of 0. Each projection's lag is a sample of its own now. Here an
    edge on a schema of its own, where the billing projection's checkpoint is 7
    entries behind the read models'."""
    schema = f"lag_{new_id().lower()}"
    pool = await create_pool(stack.database_url, schema, max_size=2)
    try:
        cid = (await api.create_conversation())["id"]
        await api.send_stream(cid, "something to be behind on [[tokens=5]]")
        head = await _head(stack)
        await pool.execute(
            "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2), ($3, $4)",
            "read_models",
            head,
            "billing",
            head - 7,
        )
        edge = TestServer(create_app(edge_config(stack, {"db_schema": schema}), Metrics()))
        await edge.start_server()
        try:
            samples = await scrape(http, str(edge.make_url("")).rstrip("/"))
        finally:
            await edge.close()
        read_models = value(samples, "parley_projection_lag_events", projection="read_models")
        billing = value(samples, "parley_projection_lag_events", projection="billing")
        assert ("parley_projection_lag_events", frozenset()) not in samples, samples
        assert billing - read_models == 7, samples
    finally:
        await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


async def _head(stack: Servers) -> int:
    """CHAT_EVT's last sequence now."""
    nc = await nats.connect(stack.nats_url)
    try:
        return int((await nc.jetstream().stream_info("CHAT_EVT")).state.last_seq)
    finally:
        await nc.close()


async def test_an_open_stream_is_an_sse_viewer_until_it_closes(
    api: SseClient, services: Services, http: aiohttp.ClientSession
) -> None:
    cid = (await api.create_conversation())["id"]
    url = services.edge_url
    before = value(await scrape(http, url), "parley_sse_viewers")
    async with http.get(api.url(f"/v1/conversations/{cid}/events"), headers=api.headers()) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")  # `retry:`, written as the viewer joins
        await until_scraped(http, url, lambda now: value(now, "parley_sse_viewers") == before + 1)
    await until_scraped(http, url, lambda now: value(now, "parley_sse_viewers") == before)


async def test_a_process_without_an_edge_serves_its_metrics_alone() -> None:
    metrics = Metrics()
    metrics.turn_started("demo")
    metrics.chain_broken()  # a worker's, as events.log tells it
    server = TestServer(metrics_app(metrics), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            samples = await scrape(http, str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()
    assert value(samples, "parley_turns_active") == 1
    assert value(samples, "parley_append_chains_broken_total") == 1


def test_a_projection_lag_not_readable_now_is_left_out_not_kept_stale() -> None:
    """With NATS away the lag is unknown: a scrape that kept the last value showed a
    lag of 0 through the outage, and an alert on it could not fire."""
    metrics = Metrics()

    def rendered() -> Samples:
        return parsed(metrics.render()[0].decode())

    metrics.projection(lags={"read_models": 0, "billing": 2}, errors=3)
    read = rendered()
    assert value(read, "parley_projection_lag_events", projection="read_models") == 0, read
    assert value(read, "parley_projection_lag_events", projection="billing") == 2, read
    assert read[("parley_projection_errors", frozenset())] == 3, read
    metrics.projection(lags=None, errors=None)
    names = {name for name, _ in rendered()}
    assert not names & {"parley_projection_lag_events", "parley_projection_errors"}, names


# ---------------------------------------------------------------- readiness


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_readyz_says_which_server_does_not_answer_and_does_not_hang_with_it(
    stack: Servers, services: Services, http: aiohttp.ClientSession, silent_server: str
) -> None:
    async with extra_edge(stack, redis_url=silent_server, ready_timeout_s=0.5) as edge:
        began = time.monotonic()
        async with http.get(edge + "/readyz") as response:
            body = await response.json()
        took = time.monotonic() - began
    assert response.status == 503, body
    assert body["status"] == "not_ready"
    assert body["checks"] == {"nats": "ok", "postgres": "ok", "redis": "down"}, body
    assert body["reasons"] == ["redis: no answer within 0.5 s"], body
    assert took < 3, f"readyz took {took:.2f} s with a hung Redis"


async def test_readyz_is_ready_with_no_reasons_when_every_server_answers(
    services: Services, http: aiohttp.ClientSession
) -> None:
    async with http.get(services.edge_url + "/readyz") as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["status"] == "ready" and body["reasons"] == [], body
    assert isinstance(body["projection_errors"], int), body


async def test_the_event_loops_lateness_is_scraped(
    services: Services, http: aiohttp.ClientSession
) -> None:
    """Every process's loop says how late it runs (parley/stalls.py), ten times a second."""
    url = services.edge_url
    before = value(await scrape(http, url), "parley_event_loop_lag_seconds_count")
    await until_scraped(
        http, url, lambda now: value(now, "parley_event_loop_lag_seconds_count") > before
    )
