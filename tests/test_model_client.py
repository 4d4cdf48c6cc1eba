"""The streaming model client over real HTTP, against a server that replays recordings.

The double here is a real aiohttp server on 127.0.0.1 that writes the recorded
transcripts' bytes (and a few malformed streams) exactly as a model server
would; no part of the client or aiohttp is mocked. Every call is wrapped in
`asyncio.timeout`, so a client that hangs fails its test instead of the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from actors import model_client
from actors.errors import ModelStreamError
from actors.model_client import ChatRequest, ModelEndpoint, stream_chat
from actors.model_stream import (
    ChatStreamParser,
    Finish,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    Usage,
)
from parley.services import outbound_session

# Recorded third-party transcripts, byte-for-byte copies of the team's shared
# fixtures (tests/data/openai-stream/SOURCES.md says where each comes from).
FIXTURE_DIR = Path(__file__).parent / "data" / "openai-stream"
TRANSCRIPTS = (
    "openai-python__e2aad469b71d_text-with-usage.sse",
    "vercel-ai__deepseek-reasoning.chunks.jsonl",
    "vercel-ai__deepseek-tool-call.chunks.jsonl",
)
# Generous for a local server, tiny against the defaults: a hang shows as a failure.
CALL_LIMIT_S = 5.0
HELLO = [{"role": "user", "content": "hello"}]


# A non-streamed answer, as a server that ignores `stream: true` sends it.
WHOLE_ANSWER = {
    "id": "chatcmpl-whole",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Both, at once.",
                "reasoning_content": "Two calls first.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "a", "arguments": "{}"}},
                    {"type": "function", "function": {"name": "b", "arguments": '{"x":1}'}},
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26},
}


def transcript_bytes(name: str) -> bytes:
    """The transcript as a server sends it; JSON-lines files framed as DeepSeek's API does."""
    path = FIXTURE_DIR / name
    assert path.is_file(), f"expected the recorded transcript at {path}"
    raw = path.read_bytes()
    if name.endswith(".sse"):
        return raw
    lines = [line for line in raw.splitlines() if line.strip()]
    return b"".join(b"data: " + line + b"\n\n" for line in lines) + b"data: [DONE]\n\n"


def first_events(name: str, count: int) -> bytes:
    """The first `count` SSE events of a transcript: a stream that was going well."""
    return b"".join(part + b"\n\n" for part in transcript_bytes(name).split(b"\n\n")[:count])


def items_of(data: bytes) -> list[StreamItem]:
    parser = ChatStreamParser()
    return parser.feed(data) + parser.finish()


# ------------------------------------------------------------ the replaying server


class Replay:
    """What the replaying server saw, and a way to know when a client left."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.client_left = asyncio.Event()


REPLAY = web.AppKey("replay", Replay)


async def _stream_until_client_leaves(request: web.Request, head: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(head)
    try:
        await asyncio.Event().wait()  # silence; the runner cancels us when the client leaves
    except asyncio.CancelledError:
        request.app[REPLAY].client_left.set()
        raise
    return response


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    request.app[REPLAY].requests.append((body, dict(request.headers)))
    script = body["model"]
    if script in TRANSCRIPTS:
        data = transcript_bytes(script)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # Several writes at odd offsets, so the client reads real partial lines.
        step = max(1, len(data) // 7 + 13)
        for start in range(0, len(data), step):
            await response.write(data[start : start + step])
            await asyncio.sleep(0)
        return response
    if script == "bad-json":
        return await _stream(request, first_events(TRANSCRIPTS[0], 3) + b"data: {not json\n\n")
    if script == "error-mid-stream":
        error = {"error": {"message": "The server had an error", "type": "server_error"}}
        return await _stream(
            request,
            first_events(TRANSCRIPTS[0], 3) + b"data: " + json.dumps(error).encode() + b"\n\n",
        )
    if script == "cut-connection":
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first_events(TRANSCRIPTS[0], 4))
        assert request.transport is not None
        request.transport.close()  # no last chunk of the chunked body, no [DONE]
        return response
    if script == "cut-cleanly":
        return await _stream(request, first_events(TRANSCRIPTS[0], 4))
    if script == "http-429":
        error = {"error": {"message": "Rate limit reached for requests", "type": "requests"}}
        return web.json_response(error, status=429)
    if script == "http-500":
        return web.Response(status=500, text="upstream exploded " + "x" * 2000)
    if script == "silent-mid-stream":
        return await _stream_until_client_leaves(request, first_events(TRANSCRIPTS[0], 3))
    if script == "silent-before-first-byte":
        return await _stream_until_client_leaves(request, b"")
    if script == "whole-answer":
        return web.json_response(WHOLE_ANSWER)
    if script == "json-not-a-completion":
        return web.json_response({"status": "queued", "id": "job-1"})
    if script == "json-error-200":
        return web.json_response({"error": {"message": "You exceeded your current quota"}})
    if script == "html-200":
        return web.Response(text="<html>captive portal</html>", content_type="text/html")
    if script == "endless":
        return await _endless(request)
    raise web.HTTPNotFound(text=f"no script {script!r}")


async def _stream(request: web.Request, data: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(data)
    return response


async def _endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk = {"choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]}
    try:
        while True:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.01)
    finally:  # cancelled, or a write found the connection closed
        request.app[REPLAY].client_left.set()


@pytest_asyncio.fixture(scope="module")
async def replay_server() -> AsyncIterator[tuple[str, Replay]]:
    app = web.Application()
    replay = Replay()
    app[REPLAY] = replay
    app.router.add_post("/v1/chat/completions", _chat_completions)
    # handler_cancellation: a handler learns that its client left by being cancelled.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1", replay
    await runner.cleanup()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def collect(
    session: aiohttp.ClientSession,
    base_url: str,
    script: str,
    request: ChatRequest | None = None,
    **timeouts: float,
) -> list[StreamItem]:
    endpoint = ModelEndpoint(base_url=base_url, model=script, api_key="sk-test")
    async with asyncio.timeout(CALL_LIMIT_S):
        return [
            item
            async for item in stream_chat(
                session, endpoint, request or ChatRequest(messages=HELLO), **timeouts
            )
        ]


async def expect_failure(
    session: aiohttp.ClientSession, base_url: str, script: str, code: str, **timeouts: float
) -> tuple[ModelStreamError, list[StreamItem], float]:
    """Run a call that must fail with `code`; returns the error, the items before it, seconds."""
    endpoint = ModelEndpoint(base_url=base_url, model=script)
    items: list[StreamItem] = []
    started = time.monotonic()
    with pytest.raises(ModelStreamError) as info:
        async with asyncio.timeout(CALL_LIMIT_S):
            async for item in stream_chat(
                session, endpoint, ChatRequest(messages=HELLO), **timeouts
            ):
                items.append(item)
    error = info.value
    assert error.code == code, f"expected code {code!r}, saw {error.code!r}: {error.message}"
    return error, items, time.monotonic() - started


# ------------------------------------------------------------ recorded transcripts


@pytest.mark.parametrize("name", TRANSCRIPTS)
async def test_recorded_transcript_over_http_yields_what_the_parser_reads_from_its_bytes(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession, name: str
) -> None:
    base_url, _ = replay_server
    items = await collect(session, base_url, name)
    assert items == items_of(transcript_bytes(name))
    assert isinstance(items[-1], Finish) or isinstance(items[-2], Finish)


def counting_connections(opened: list[object]) -> aiohttp.ClientSession:
    """A session that adds to `opened` for every connection it opens."""

    async def counted(*_: object) -> None:
        opened.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(counted)
    return aiohttp.ClientSession(trace_configs=[trace])


async def test_request_asks_for_a_stream_with_usage_and_sends_the_key(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    base_url, replay = replay_server
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    await collect(session, base_url, TRANSCRIPTS[0], ChatRequest(messages=HELLO, max_tokens=50))
    await collect(session, base_url, TRANSCRIPTS[0], ChatRequest(messages=HELLO, tools=tools))
    (plain, headers), (with_tools, _) = replay.requests[-2:]
    assert headers["Authorization"] == "Bearer sk-test"
    assert {k: plain[k] for k in ("stream", "stream_options", "max_tokens", "temperature")} == {
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
        "temperature": 0.7,
    }
    assert plain["messages"] == HELLO and plain["model"] == TRANSCRIPTS[0]
    assert "tools" not in plain, "an empty tools list is not sent"
    assert with_tools["tools"] == tools and "max_tokens" not in with_tools


async def test_a_whole_json_answer_gives_its_text_calls_finish_and_usage_at_once(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    items = await collect(session, replay_server[0], "whole-answer")
    # calls without id or index are two calls, numbered in order, not one glued
    assert items == [
        TextDelta("thinking", "Two calls first."),
        TextDelta("answer", "Both, at once."),
        ToolCallRequest(call_id="call_0", name="a", arguments="{}"),
        ToolCallRequest(call_id="call_1", name="b", arguments='{"x":1}'),
        Finish("tool_calls", "Two calls first."),
        Usage(17, 9),
    ]


async def test_a_whole_answer_leaves_its_connection_for_the_next_call(
    replay_server: tuple[str, Replay],
) -> None:
    opened: list[object] = []
    async with counting_connections(opened) as client:
        for _ in range(3):
            assert (await collect(client, replay_server[0], "whole-answer"))[-1] == Usage(17, 9)
    assert len(opened) == 1, f"{len(opened)} connections for 3 calls"


async def test_a_json_body_that_is_no_chat_completion_raises_model_error(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, items, _ = await expect_failure(
        session, replay_server[0], "json-not-a-completion", "model_error"
    )
    assert items == [] and "queued" in error.message, error


# ------------------------------------------------------------ failures, each prompt


async def test_bad_json_line_raises_bad_json_after_the_good_text(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, items, _ = await expect_failure(session, replay_server[0], "bad-json", "bad_json")
    assert [i for i in items if isinstance(i, TextDelta)], "text before the bad line is yielded"
    assert not error.retryable


async def test_error_object_mid_stream_raises_model_error_with_its_message(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, _, _ = await expect_failure(session, replay_server[0], "error-mid-stream", "model_error")
    assert "The server had an error" in error.message


@pytest.mark.parametrize("script", ["cut-connection", "cut-cleanly"])
async def test_stream_cut_before_done_raises_stream_cut(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession, script: str
) -> None:
    error, items, _ = await expect_failure(session, replay_server[0], script, "stream_cut")
    assert items, "what arrived before the cut is yielded"
    assert error.retryable


async def test_http_429_before_the_first_byte_is_retryable_with_the_body_message(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, items, _ = await expect_failure(session, replay_server[0], "http-429", "http_429")
    assert (error.status, error.retryable, items) == (429, True, [])
    assert error.message == "Rate limit reached for requests (type requests)"


async def test_http_500_with_a_text_body_keeps_a_truncated_message(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, _, _ = await expect_failure(session, replay_server[0], "http-500", "http_500")
    assert (error.status, error.retryable) == (500, True)
    assert error.message.startswith("upstream exploded") and len(error.message) < 400


async def test_server_silent_mid_stream_raises_timeout_after_the_idle_timeout(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    base_url, replay = replay_server
    replay.client_left.clear()
    error, items, seconds = await expect_failure(
        session, base_url, "silent-mid-stream", "timeout", idle_timeout=0.2
    )
    assert items and 0.2 <= seconds < 2, f"expected ~0.2 s, saw {seconds:.2f} s"
    assert "mid-stream" in error.message
    async with asyncio.timeout(2):
        await replay.client_left.wait()  # the connection was closed, not leaked


async def test_server_silent_before_the_first_byte_raises_timeout(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    _, items, seconds = await expect_failure(
        session,
        replay_server[0],
        "silent-before-first-byte",
        "timeout",
        connect_timeout=0.1,
        first_byte_timeout=0.2,
    )
    assert items == [] and seconds < 2, f"expected ~0.3 s, saw {seconds:.2f} s"


async def test_refused_connection_raises_unreachable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error, _, seconds = await expect_failure(
        session, f"http://127.0.0.1:{port}/v1", "any", "unreachable"
    )
    assert error.retryable and seconds < 2
    # the address is the operator's to see, not the conversation's
    assert str(port) not in error.message and f"127.0.0.1:{port}" in error.detail, error


async def test_json_error_body_with_status_200_raises_model_error(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, _, _ = await expect_failure(session, replay_server[0], "json-error-200", "model_error")
    assert "You exceeded your current quota" in error.message


async def test_html_body_with_status_200_raises_bad_json_naming_the_content_type(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    error, _, _ = await expect_failure(session, replay_server[0], "html-200", "bad_json")
    assert "text/html" in error.message and "captive portal" in error.message


async def test_caller_stopping_early_closes_the_connection(
    replay_server: tuple[str, Replay], session: aiohttp.ClientSession
) -> None:
    base_url, replay = replay_server
    replay.client_left.clear()
    endpoint = ModelEndpoint(base_url=base_url, model="endless")
    stream = stream_chat(session, endpoint, ChatRequest(messages=HELLO))
    async with asyncio.timeout(CALL_LIMIT_S), contextlib.aclosing(stream):
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
    # A real server keeps generating (and billing) until it notices the close.
    async with asyncio.timeout(2):
        await replay.client_left.wait()


async def test_answers_read_to_their_end_leave_the_connection_for_the_next_call(
    replay_server: tuple[str, Replay],
) -> None:
    """The body goes on after `[DONE]` (the chunked encoding's last chunk): read to
    its end, the connection goes back to the pool, so each turn does not pay a new
    connection (with a provider, a TLS handshake) and the server no accept."""
    base_url, _ = replay_server
    opened: list[object] = []
    async with counting_connections(opened) as client:
        for name in TRANSCRIPTS * 2:
            assert items_of(transcript_bytes(name)) == await collect(client, base_url, name)
            async with asyncio.timeout(CALL_LIMIT_S):
                await model_client.answers_read()
    assert len(opened) == 1, f"{len(opened)} connections for {len(TRANSCRIPTS) * 2} calls"


def test_endpoint_and_request_are_plain_declared_values() -> None:
    request = ChatRequest(messages=HELLO)
    assert (request.tools, request.max_tokens, request.temperature) == ([], None, 0.7)
    decoded = msgspec.json.decode(b'{"base_url": "http://h/v1", "model": "m"}', type=ModelEndpoint)
    assert decoded == ModelEndpoint(base_url="http://h/v1", model="m", api_key=None)


def test_endpoint_repr_hides_the_api_key() -> None:
    shown = repr(ModelEndpoint(base_url="http://h/v1", model="m", api_key="sk-secret"))
    assert "sk-secret" not in shown and "http://h/v1" in shown


async def test_the_workers_client_keeps_no_cookie_between_requests() -> None:
    """The worker's one HTTP client (models and webhooks) kept the cookies servers set:
    a model host's cookie went back with every conversation's request, and to a
    webhook receiver of the same domain."""
    seen: list[str | None] = []

    async def sets(_: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", "from-the-model-host")
        return response

    async def reads(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", sets)
    app.router.add_post("/hook", reads)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with outbound_session() as http:
            for path in ("/v1/chat/completions", "/hook", "/v1/chat/completions", "/hook"):
                # by name: a cookie jar keeps no cookie for an IP address
                url = server.make_url(path).with_host("localhost")
                async with http.post(url, json={}) as answer:
                    assert answer.status == 200
    finally:
        await server.close()
    assert seen == [None, None], seen
