"""An edge told to stop (a deploy, a scale-down) with streams open: the streams of running
turns reach their turn's end within the grace, every other stream ends at once with a
word and a clean end, and what a cut stream missed is there to resume from its last id.
Before, aiohttp waited out its shutdown timeout twice (10 s) and then dropped every
stream mid-body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from api.config import EdgeLimits
from api.context import HUBS
from api.hub import Delivery, Subscription, watch
from api.limits import TurnWatcher
from api.sse import Envelope, Position
from api.streaming import SseViewer
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Done
from parley.services import Servers, Services
from tests.conftest import SECRET, extra_edge, extra_edge_server, token_for
from tests.sse import SseClient, SseComment, SseEvent, read_sse
from tests.test_cli import server_env

STOPPING = "this server is stopping; reconnect with Last-Event-ID to go on"
# An edge whose sockets buffer little: a client that stops reading backs its writes up
# soon. No per-user limits, and a write timeout past what the tests wait.
SMALL_SEND_BUFFER = EdgeLimits(
    rate_per_s=0,
    max_streams_per_user=0,
    max_turns_per_user=0,
    socket_send_buffer_bytes=16 * 1024,
    write_timeout_s=20.0,
)


@contextlib.asynccontextmanager
async def edge_to_stop(
    stack: Servers, http: aiohttp.ClientSession, user: str, **overrides: Any
) -> AsyncIterator[tuple[SseClient, asyncio.Event]]:
    """An edge of its own, and an event that stops it (as SIGTERM does) while the test
    goes on; the stop is awaited when the block ends."""
    stop = asyncio.Event()
    edge = extra_edge(stack, **overrides)
    url = await edge.__aenter__()

    async def stopper() -> float:
        await stop.wait()
        began = time.monotonic()
        await edge.__aexit__(None, None, None)
        return time.monotonic() - began

    stopping = asyncio.create_task(stopper())
    try:
        yield SseClient(http, url, token_for(user)), stop
    finally:
        stop.set()
        await stopping


async def read_all(response: aiohttp.ClientResponse) -> list[SseEvent | SseComment]:
    """Every event and comment up to the stream's end; raises if it ends unclean."""
    return [item async for item in read_sse(response)]


async def first_token(response: aiohttp.ClientResponse, out: list[SseEvent | SseComment]) -> None:
    async for item in read_sse(response):
        out.append(item)
        if isinstance(item, SseEvent) and item.event == "token":
            return


async def test_a_stopping_edge_lets_a_running_turn_finish_and_ends_a_waiting_viewer_at_once(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    async with edge_to_stop(stack, http, user, stop_grace_s=60.0) as (client, stop):
        idle = (await client.create_conversation())["id"]
        busy = (await client.create_conversation())["id"]
        async with (
            client.events(idle) as viewer,
            client.http.post(
                client.url(f"/v1/conversations/{busy}/messages"),
                json={"content": "go [[tokens=30]] [[rate=20]]"},
                headers=client.headers(Accept="text/event-stream"),
            ) as turn,
        ):
            seen: list[SseEvent | SseComment] = []
            await first_token(turn, seen)
            stop.set()
            # the viewer waiting for turns ends first, told why, with a clean end
            said = await read_all(viewer)
            assert SseComment(STOPPING) in said, said
            assert not any(isinstance(e, SseEvent) for e in said), said
            # the turn's stream goes on to its end, well within the grace
            seen += await read_all(turn)
    events = [e for e in seen if isinstance(e, SseEvent)]
    assert events[-1].event == "done" and events[-1].data == "ok", events[-3:]
    assert SseComment(STOPPING) not in seen


async def test_a_turn_longer_than_the_grace_is_cut_with_a_word_and_resumes_whole_elsewhere(
    stack: Servers,
    services: Services,
    http: aiohttp.ClientSession,
    user: str,
    api: SseClient,
    event_log: EventLog,
) -> None:
    async with edge_to_stop(stack, http, user, stop_grace_s=0.2) as (client, stop):
        cid = (await client.create_conversation())["id"]
        async with client.http.post(
            client.url(f"/v1/conversations/{cid}/messages"),
            json={"content": "go [[tokens=40]] [[rate=20]]"},
            headers=client.headers(Accept="text/event-stream"),
        ) as turn:
            seen: list[SseEvent | SseComment] = []
            await first_token(turn, seen)
            stop.set()
            seen += await read_all(turn)
    assert seen[-1] == SseComment(STOPPING), seen[-3:]
    events = [e for e in seen if isinstance(e, SseEvent)]
    assert all(e.event != "done" for e in events)
    # the rest is in the log: another edge (the session's) gives it, from the last id
    async with api.events(cid, last_event_id=events[-1].id) as rest:
        later = [e async for e in read_sse(rest) if isinstance(e, SseEvent)]
    assert later[-1].event == "done" and later[-1].data == "ok"
    text = "".join(e.data for e in events + later if e.event == "token")
    log = [s.event for s in await event_log.read(cid)]
    done = next(e for e in log if isinstance(e, Done))
    answer = "".join(block.content for block in done.content if block.role == "assistant")
    assert text == answer  # nothing lost, nothing twice


async def test_a_use_chat_stream_cut_by_a_stop_says_the_server_is_stopping_and_how_to_resume(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    chat = new_id()
    async with (
        edge_to_stop(stack, http, user, stop_grace_s=0.2) as (client, stop),
        client.http.post(
            client.url("/v1/ai-sdk/chat"),
            json={
                "id": chat,
                "messages": [
                    {
                        "id": "m1",
                        "role": "user",
                        "parts": [{"type": "text", "text": "go [[tokens=40]] [[rate=20]]"}],
                    }
                ],
            },
            headers=client.headers(),
        ) as response,
    ):
        assert response.status == 200
        body = b""
        async for line in response.content:
            body += line
            if b'"text-delta"' in line:
                break
        stop.set()
        body += await response.read()
    text = body.decode()
    assert '"type":"error"' in text and "this server is stopping" in text, text[-300:]
    assert f"/v1/ai-sdk/chat/{chat}/stream" in text
    assert "[DONE]" not in text


class _TurnStream(Subscription):
    """As a client's stream of one turn: a stop waits for its end."""

    def finishes_at_stop(self) -> bool:
        return True

    def take(self, delivery: Delivery) -> None:
        pass

    def take_stall(self, error: Envelope) -> None:
        pass


class _Viewer(_TurnStream):
    """As a viewer of the whole conversation: a stop ends it at once."""

    def finishes_at_stop(self) -> bool:
        return False


async def test_a_drain_waits_for_turn_streams_and_ends_what_joins_meanwhile_at_once(
    stack: Servers, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream that joins once the drain began (its request was under way when the edge
    stopped listening) is not left open for the grace; the drain itself ends when the
    last turn's stream does, not at its deadline. The log says what the stop did."""
    caplog.set_level(logging.INFO, logger="api.hub")
    async with extra_edge_server(stack) as server:
        hubs = server.app[HUBS]
        cid = new_id()
        turn = _TurnStream(Position(seq=0))
        hub, _ = await hubs.join(cid, turn)
        viewer = _Viewer(Position(seq=0))
        await hubs.join(cid, viewer)
        slot = TurnWatcher(Position(seq=0))  # the edge's own: waited for, not a stream
        await hubs.join(cid, slot)
        draining = asyncio.create_task(hubs.drain(60.0))
        await asyncio.sleep(0)  # its first look, before the late one joins
        assert viewer.ended.done()
        late = _Viewer(Position(seq=0))
        async with asyncio.timeout(10):
            assert await watch(hubs, cid, late) == "stopping"
        assert not draining.done() and not turn.ended.done()
        turn.end("done")
        await asyncio.sleep(0)
        assert not draining.done()  # the turn's slot is held until its turn's end too
        slot.end("done")
        async with asyncio.timeout(10):
            await draining
        hub.leave(turn)
        hub.leave(viewer)
        hub.leave(slot)
    said = [r.getMessage() for r in caplog.records if r.name == "api.hub"]
    assert any(
        "1 stream(s) ended at once; 1 stream(s) and 1 turn slot(s) of running turns wait" in line
        for line in said
    ), said
    assert any(
        "1 ended at once; 1 stream(s) and 1 turn slot(s) waited for; 0 stream(s) cut and 0"
        " slot(s) left to lapse" in line
        for line in said
    ), said


async def test_a_turn_stream_that_joins_once_the_drain_is_over_ends_at_once(
    stack: Servers, services: Services
) -> None:
    """A POST that was waiting for its actor's decision when the edge stopped (its
    decision watcher ended at once) opens its turn's stream after a drain that had
    nothing to wait for: nothing would end that stream but aiohttp, which held the
    stop 10 s and then dropped it mid-body."""
    async with extra_edge_server(stack) as server:
        hubs = server.app[HUBS]
        async with asyncio.timeout(10):
            await hubs.drain(60.0)  # no stream to wait for: over at once
        late = _TurnStream(Position(seq=0))
        async with asyncio.timeout(10):
            assert await watch(hubs, new_id(), late) == "stopping"


def raw_post(path: str, token: str, body: dict[str, Any]) -> bytes:
    """A streamed POST of `body` as raw bytes, for a client that reads little or nothing."""
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Accept: text/event-stream\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


@contextlib.asynccontextmanager
async def client_that_stops_reading(port: int | None, request: bytes) -> AsyncIterator[None]:
    """A client with a small receive buffer: it sends `request`, reads the first bytes of
    the answer (a 200), then nothing more until the block ends."""
    assert port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        head = await loop.sock_recv(sock, 64)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield
    finally:
        sock.close()


async def stop_took(server: TestServer) -> float:
    """Seconds the edge took to stop."""
    began = time.monotonic()
    async with asyncio.timeout(30):
        await server.close()
    return time.monotonic() - began


async def test_a_stop_does_not_wait_for_a_viewer_that_stopped_reading(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """A viewer catching up on a long log that stopped reading has a write waiting on
    its full socket when the edge stops: its end is a cut, at once. Before, the write
    held the stop until aiohttp's shutdown timeout (or the write timeout) passed."""
    async with extra_edge_server(stack, limits=SMALL_SEND_BUFFER) as server:
        base = str(server.make_url("")).rstrip("/")
        token = token_for(user)
        client = SseClient(http, base, token)
        cid = (await client.create_conversation())["id"]
        await client.send_stream(cid, "a big one [[bulk=2000000]]")
        request = (
            f"GET /v1/conversations/{cid}/events?after=0 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        async with client_that_stops_reading(server.port, request):
            # the edge's write waits on it
            hubs = server.app[HUBS]
            for _ in range(1000):
                viewers = [s for hub in list(hubs._hubs.values()) for s in hub.subscriptions]
                if any(isinstance(s, SseViewer) and s.backed_up() for s in viewers):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the viewer's writes never backed up")
            assert await stop_took(server) < 3.0


@pytest.mark.parametrize("route", ["messages", "ai-sdk"])
async def test_a_stop_does_not_wait_for_an_ended_stream_still_writing_to_a_stuck_client(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, route: str
) -> None:
    """A turn's stream whose turn has ended, but whose client stopped reading, is still
    writing its last bytes when the edge stops: no longer in its hub, it is cut all the
    same. Before, its write held the stop 10 s (aiohttp's shutdown timeout, twice)."""
    async with extra_edge_server(stack, limits=SMALL_SEND_BUFFER) as server:
        base = str(server.make_url("")).rstrip("/")
        token = token_for(user)
        cid = (await SseClient(http, base, token).create_conversation())["id"]
        body: dict[str, Any]
        if route == "messages":
            path = f"/v1/conversations/{cid}/messages"
            body = {"content": "a big one [[bulk=2000000]]"}
        else:
            # more than the kernel takes: this stream leaves its socket's buffer as it is
            parts = [{"type": "text", "text": "a big one [[bulk=8000000]]"}]
            path = "/v1/ai-sdk/chat"
            body = {"id": cid, "messages": [{"id": "m1", "role": "user", "parts": parts}]}
        async with client_that_stops_reading(server.port, raw_post(path, token, body)):
            # the turn is over for its stream, which still waits to write the rest
            hubs = server.app[HUBS]
            for _ in range(2000):
                if any(s.ended.done() and s.backed_up() for s in list(hubs._writing)):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the stream never ended with its writes backed up")
            assert await stop_took(server) < 3.0


async def test_a_second_sigterm_does_not_cut_the_stop_short(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """`parley serve` given SIGTERM twice (a supervisor that signals the process and
    its group) still lets a running turn's stream reach its end and exits 0. The
    second one killed it at once: exit 143, every stream cut mid-body."""
    env = {**server_env(stack), "PARLEY_JWT_SECRET": SECRET, "PARLEY_DB_SCHEMA": "parley_test"}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "parley.cli", "serve", "--role", "edge", "--port", "0"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    stderr = process.stderr
    assert stderr is not None
    said: list[str] = []

    async def line() -> str:
        said.append((await stderr.readline()).decode())
        assert said[-1], "".join(said)
        return said[-1]

    try:
        async with asyncio.timeout(60):
            while "edge listening at" not in (await line()):
                pass
            url = said[-1].split(" at ", 1)[1].strip().replace("0.0.0.0", "127.0.0.1")
            client = SseClient(http, url, token_for(user))
            cid = (await client.create_conversation())["id"]
            async with client.http.post(
                client.url(f"/v1/conversations/{cid}/messages"),
                json={"content": "go [[tokens=60]] [[rate=20]]"},
                headers=client.headers(Accept="text/event-stream"),
            ) as turn:
                seen: list[SseEvent | SseComment] = []
                await first_token(turn, seen)
                process.send_signal(signal.SIGTERM)
                while "stopping ..." not in (await line()):
                    pass
                process.send_signal(signal.SIGTERM)
                seen += await read_all(turn)
            assert await process.wait() == 0, "".join(said)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    events = [e for e in seen if isinstance(e, SseEvent)]
    assert events[-1].event == "done" and events[-1].data == "ok", events[-3:]
