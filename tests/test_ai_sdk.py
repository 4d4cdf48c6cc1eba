"""useChat frontends, unchanged: the real `ai` package (npm, run under Node.js) reads parley's
/v1/ai-sdk routes and must assemble the text, reasoning and tool parts the log holds,
from the start of a turn and when it resumes one mid-turn."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import termios
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

import api.ai_sdk as api_ai_sdk
from api.config import EdgeLimits
from api.context import HUBS
from events.ids import new_id
from events.log import EventLog
from events.turns import TurnRecord, TurnRegistry, redis_client
from events.vocabulary import (
    AnswerRequested,
    Chunk,
    Done,
    Started,
    ToolCall,
    ToolResult,
    UserMessage,
)
from parley.services import Servers, Services
from tests.conftest import extra_edge_server, token_for
from tests.sse import SseClient
from tests.test_edge_stop import client_that_stops_reading, raw_post, stop_took

CLIENT = Path(__file__).parent / "ai_sdk" / "client.mjs"


# The current release (version 7), the last of version 6, and the first of version 5,
# whose chunk schemas admit no key they do not know (a key added since, such as
# `finish`'s `finishReason`, fails its turn).
PACKAGES = ["ai", "ai-v6", "ai-v5"]


def node(*args: str, package: str = "ai") -> dict[str, Any]:
    if shutil.which("node") is None:
        raise AssertionError("Node.js is needed for the AI SDK test (the machine has it)")
    if not (CLIENT.parent / "node_modules" / package).is_dir():
        raise AssertionError("run `make test` (it installs the ai package with npm ci)")
    done = subprocess.run(
        ["node", str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "AI_PACKAGE": package},
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


async def use_chat_sends(
    services: Services, user: str, chat: str, text: str, package: str
) -> dict[str, Any]:
    """The message `text` sent by the package's useChat transport, and what it read."""
    return await asyncio.to_thread(
        lambda: node(
            "send", services.edge_url, token_for(user), chat, "ui-1", text, package=package
        )
    )


async def turn_of(event_log: EventLog, cid: str) -> list[Any]:
    async with asyncio.timeout(30):
        while True:
            log = [s.event for s in await event_log.read(cid)]
            if any(isinstance(e, Done) for e in log):
                return log
            await asyncio.sleep(0.05)


def parts_of(message: dict[str, Any]) -> tuple[str, str, list[tuple[str, Any, Any]]]:
    text = "".join(p["text"] for p in message["parts"] if p["type"] == "text")
    reasoning = "".join(p["text"] for p in message["parts"] if p["type"] == "reasoning")
    tools = [
        (p["toolCallId"], p.get("input"), p.get("output"))
        for p in message["parts"]
        if p["type"].startswith("tool-") or p["type"] == "dynamic-tool"
    ]
    return text, reasoning, tools


def log_parts(log: list[Any]) -> tuple[str, str, list[tuple[str, Any, Any]]]:
    (done,) = [e for e in log if isinstance(e, Done)]
    text = "".join(e.text for e in log if isinstance(e, Chunk) and e.kind == "answer")
    reasoning = "".join(e.text for e in log if isinstance(e, Chunk) and e.kind == "thinking")
    results = {e.call_id: e for e in log if isinstance(e, ToolResult)}
    tools = [
        (
            c.call_id,
            json.loads(c.arguments or "{}"),
            json.loads(results[c.call_id].result or "null"),
        )
        for c in log
        if isinstance(c, ToolCall)
    ]
    # what the SDK assembles is also what the turn stored
    assert "".join(b.content for b in done.content if b.role == "assistant") == text, done.content
    return text, reasoning, tools


@pytest.mark.parametrize("package", PACKAGES)
async def test_use_chat_sends_a_message_and_assembles_the_turn_the_log_holds(
    services: Services, user: str, event_log: EventLog, package: str
) -> None:
    chat = new_id()  # useChat's chat id becomes the conversation, created on first use
    reply = await use_chat_sends(services, user, chat, "calculate 6*7 [[think]]", package)
    assert reply["errors"] == [], reply
    message = reply["message"]
    log = await turn_of(event_log, chat)
    assert message["role"] == "assistant" and message["id"] == next(
        e.turn_id for e in log if type(e).__name__ == "Started"
    )
    text, reasoning, tools = parts_of(message)
    expected_text, expected_reasoning, expected_tools = log_parts(log)
    assert text == expected_text and "42" in text
    assert reasoning == expected_reasoning and reasoning
    assert tools == expected_tools and tools[0][1] == {"expression": "6*7"}


@pytest.mark.parametrize("package", PACKAGES)
async def test_a_turn_cancelled_mid_stream_reaches_use_chat_as_an_abort_not_an_error(
    services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog, package: str
) -> None:
    api = SseClient(http, services.edge_url, token_for(user))
    chat = new_id()
    reading = asyncio.create_task(
        use_chat_sends(services, user, chat, "count [[tokens=2000]] [[rate=100]]", package)
    )
    async with asyncio.timeout(30):
        while sum(isinstance(e.event, Chunk) for e in await event_log.read(chat)) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    status, _ = await api.request("POST", f"/v1/conversations/{chat}/cancel")
    assert status in (200, 202)
    reply = await reading
    assert reply["errors"] == [], reply
    text, _, _ = parts_of(reply["message"])
    assert text.split()[:3] == ["0", "1", "2"] and len(text.split()) < 2000


async def a_chat_streaming(api: SseClient, event_log: EventLog, message: str) -> str:
    """A new chat whose turn for `message` has streamed a few chunks and goes on."""
    chat: str = (await api.create_conversation())["id"]
    await api.send_json(chat, message)
    async with asyncio.timeout(20):
        while sum(isinstance(e.event, Chunk) for e in await event_log.read(chat)) < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return chat


async def test_use_chat_resumes_a_turn_mid_stream_and_gets_all_of_it(
    services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    api = SseClient(http, services.edge_url, token_for(user))
    chat = await a_chat_streaming(api, event_log, "count [[tokens=600]] [[think]]")
    reply = await asyncio.to_thread(node, "resume", services.edge_url, token_for(user), chat)
    assert reply["errors"] == [], reply
    log = await turn_of(event_log, chat)
    text, reasoning, _ = parts_of(reply["message"])
    expected_text, expected_reasoning, _ = log_parts(log)
    assert text == expected_text and text.split() == [str(i) for i in range(600)]
    assert reasoning == expected_reasoning


async def test_resume_with_no_turn_running_is_204_and_a_strangers_chat_is_404(
    services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    api = SseClient(http, services.edge_url, token_for(user))
    chat = (await api.create_conversation())["id"]
    none = await asyncio.to_thread(node, "resume", services.edge_url, token_for(user), chat)
    assert none == {"none": True}
    async with http.get(
        f"{services.edge_url}/v1/ai-sdk/chat/{chat}/stream",
        headers={"Authorization": f"Bearer {token_for('someone-' + user)}"},
    ) as response:
        assert response.status == 404
    stranger = SseClient(http, services.edge_url, token_for("someone-" + user))
    status, body = await stranger.request(
        "POST",
        "/v1/ai-sdk/chat",
        json={
            "id": chat,
            "messages": [{"id": "x", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
        },
    )
    assert status == 404, body


def said(message_id: str, *parts: dict[str, Any], role: str = "user") -> dict[str, Any]:
    return {"id": message_id, "role": role, "parts": list(parts)}


def text(value: Any) -> dict[str, Any]:
    return {"type": "text", "text": value}


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


async def test_use_chat_resuming_a_chat_not_begun_yet_finds_nothing_running(
    services: Services, user: str, event_log: EventLog
) -> None:
    """useChat with `resume: true` asks on mount, on a new chat's page too, before its
    first message made the conversation: nothing runs there (204), and nothing is made.
    Before, a 404 put the new chat in the SDK's error state before the user typed."""
    chat = new_id()
    none = await asyncio.to_thread(node, "resume", services.edge_url, token_for(user), chat)
    assert none == {"none": True}
    assert await event_log.first(chat) is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"id": "bad id!", "messages": []}, "bad_request"),
        ({"id": "c1", "messages": [said("u")]}, "bad_request"),
        ({"id": "c2", "messages": [], "trigger": "something-else"}, "bad_request"),
        ({"id": "c3", "messages": []}, "bad_request"),
        # the chat's last message is the new one: an assistant's is no new message
        ({"id": "c4", "messages": [said("u", text("hi")), said("a", role="assistant")]}, None),
        ({"id": "c5", "messages": [said("u", text(None))]}, "invalid_request"),
        ({"id": "c6", "messages": [said("u", text(123))]}, "invalid_request"),
        ({"id": "c7", "messages": [said("u", text({"a": 1}))]}, "invalid_request"),
        (
            {"id": "c8", "messages": [said("u", text("see"), {"type": "file", "url": "x"})]},
            "unsupported_part",
        ),
        ({"id": "c9", "messages": [said("u", text("x" * 100_001))]}, "content_too_long"),
        # the new message gets every check a body gets, nesting too
        (
            {"id": "c10", "messages": [said("u", text("hi"), {"type": "x", "a": deep(40)})]},
            "too_deep",
        ),
    ],
)
async def test_bad_ai_sdk_requests_are_400s_and_leave_no_conversation_behind(
    api: SseClient, body: dict[str, Any], code: str | None
) -> None:
    body = {**body, "id": body["id"] + new_id()} if body["id"] != "bad id!" else body
    status, answer = await api.request("POST", "/v1/ai-sdk/chat", json=body)
    assert status == 400 and answer["error"]["code"] == (code or "bad_request"), answer
    if body["id"] != "bad id!":
        status, _ = await api.request("GET", f"/v1/conversations/{body['id']}")
        assert status == 404


async def test_a_long_chat_whose_history_outgrows_the_api_body_limit_still_gets_answers(
    api: SseClient, event_log: EventLog
) -> None:
    """useChat sends the whole chat with every message: 300 KB of history is fine."""
    chat = new_id()
    history = [said(f"h{i}", text("x" * 30_000)) for i in range(10)]
    status, body = await api.request(
        "POST",
        "/v1/ai-sdk/chat",
        json={"id": chat, "messages": [*history, said("new", text("hi [[tokens=2]]"))]},
    )
    assert status == 200 and '"type":"finish"' in body, body
    assert any(isinstance(e.event, Done) for e in await event_log.read(chat))


async def test_use_chat_edits_a_message_by_sending_its_id_again_with_new_text(
    api: SseClient, event_log: EventLog
) -> None:
    chat = new_id()
    first = {"id": chat, "messages": [said("m1", text("first [[tokens=2]]"))]}
    status, _ = await api.request("POST", "/v1/ai-sdk/chat", json=first)
    assert status == 200
    # a retry of the same message is the same request
    status, _ = await api.request("POST", "/v1/ai-sdk/chat", json=first)
    assert status == 200
    # the same id with other text: a new version of it, and a turn on the edited history
    edited = {"id": chat, "messages": [said("m1", text("second [[tokens=3]]"))]}
    for _ in range(2):  # and its retry is the same edit, not another
        status, body = await api.request("POST", "/v1/ai-sdk/chat", json=edited)
        assert status == 200 and '"type":"finish"' in body, body
    log = [s.event for s in await event_log.read(chat)]
    users = [e for e in log if isinstance(e, UserMessage)]
    assert [(u.content, u.version_number) for u in users] == [
        ("first [[tokens=2]]", 1),
        ("second [[tokens=3]]", 2),
    ]
    assert users[1].version_group_id == users[0].version_group_id
    assert users[1].supersedes[0] == users[0].message_id
    assert [e.user_message_id for e in log if isinstance(e, Started)] == [
        u.message_id for u in users
    ]


async def test_an_edit_back_to_an_earlier_text_is_a_new_version_not_a_replay(
    api: SseClient, event_log: EventLog
) -> None:
    """A message edited, then edited back to what it said before: a third version and a
    turn on it. Before, the edit back was taken for a retry of the first send (or of
    the earlier edit to that text): useChat was shown the old answer again while the
    conversation went on from the edit in between, which the model then read."""
    chat = new_id()
    texts = ["one [[tokens=2]]", "two [[tokens=3]]", "one [[tokens=2]]", "two [[tokens=3]]"]
    for content in [*texts, texts[-1]]:  # the last one sent twice: its retry
        edit = {"id": chat, "messages": [said("m1", text(content))], "messageId": "m1"}
        status, body = await api.request("POST", "/v1/ai-sdk/chat", json=edit)
        assert status == 200 and '"type":"finish"' in body, body
    log = [s.event for s in await event_log.read(chat)]
    users = [e for e in log if isinstance(e, UserMessage)]
    assert [(u.content, u.version_number) for u in users] == [
        (content, number) for number, content in enumerate(texts, 1)
    ]
    # each version was answered once, the retry of the last one too
    assert [e.user_message_id for e in log if isinstance(e, Started)] == [
        u.message_id for u in users
    ]


async def test_use_chat_regenerate_without_a_message_id_answers_the_latest_message_again(
    api: SseClient, event_log: EventLog
) -> None:
    chat = new_id()
    asked = said("m1", text("hello [[tokens=2]]"))
    status, _ = await api.request("POST", "/v1/ai-sdk/chat", json={"id": chat, "messages": [asked]})
    assert status == 200
    again = {"id": chat, "messages": [asked], "trigger": "regenerate-message"}
    status, body = await api.request("POST", "/v1/ai-sdk/chat", json=again)
    assert status == 200 and '"type":"finish"' in body, body
    log = [s.event for s in await event_log.read(chat)]
    starts = [e for e in log if isinstance(e, Started)]
    (requested,) = [e for e in log if isinstance(e, AnswerRequested)]
    assert len(starts) == 2 and requested.regenerates == starts[0].turn_id

    # a message refused before (the chat was busy, say) and retried with regenerate():
    # it never reached parley, so it gets its first answer
    retried = said("m2", text("and again [[tokens=2]]"))
    status, body = await api.request(
        "POST",
        "/v1/ai-sdk/chat",
        json={"id": chat, "messages": [asked, retried], "trigger": "regenerate-message"},
    )
    assert status == 200 and '"type":"finish"' in body, body
    users = [e for e in (s.event for s in await event_log.read(chat)) if isinstance(e, UserMessage)]
    assert [u.content for u in users] == ["hello [[tokens=2]]", "and again [[tokens=2]]"]


async def test_a_resume_while_the_turn_is_announced_but_not_named_waits_for_its_name(
    services: Services, stack: Servers, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    # A record without a turn id announces a turn about to start (a request just
    # accepted, or a turn queued behind one ending). A resume that came then
    # followed no turn at all and sent pings for ever.
    api = SseClient(http, services.edge_url, token_for(user))
    chat = await a_chat_streaming(api, event_log, "count [[tokens=600]]")
    registry = TurnRegistry(redis_client(stack.redis_url))
    named = await registry.get(chat)
    assert named is not None and named.turn_id, named
    await registry.put(chat, msgspec.structs.replace(named, turn_id=""))

    async def name_it() -> None:
        await asyncio.sleep(0.3)
        await registry.put(chat, named)

    naming = asyncio.create_task(name_it())
    url = f"{services.edge_url}/v1/ai-sdk/chat/{chat}/stream"
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    async with asyncio.timeout(20), http.get(url, headers=headers) as response:
        assert response.status == 200
        body = await response.text()  # to the turn's end
    await naming
    assert '"type":"text-delta"' in body and "[DONE]" in body, body[-300:]

    # announced on a conversation where nothing comes: no stream, a 204 in moments
    idle = (await api.create_conversation())["id"]
    await registry.put(idle, TurnRecord(worker="test", turn_id="", after=1, at=1))
    try:
        async with (
            asyncio.timeout(10),
            http.get(
                f"{services.edge_url}/v1/ai-sdk/chat/{idle}/stream", headers=headers
            ) as response,
        ):
            assert response.status == 204
    finally:
        await registry.release(idle, "test")


async def test_a_stream_cut_off_for_falling_behind_says_so_instead_of_ending_quietly(
    api: SseClient, event_log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that falls this far behind is cut off (its turn goes on); without a word,
    useChat took the answer so far for the whole answer."""
    monkeypatch.setattr(api_ai_sdk, "_QUEUE_LIMIT", 0)  # behind from its first event
    chat = new_id()
    status, body = await api.request(
        "POST", "/v1/ai-sdk/chat", json={"id": chat, "messages": [said("m", text("hi"))]}
    )
    assert status == 200
    assert '"type":"error"' in body and f"/v1/ai-sdk/chat/{chat}/stream" in body, body
    assert "[DONE]" not in body and '"type":"finish"' not in body, body
    await turn_of(event_log, chat)  # the turn went on to its end


def stuck_chat_request(token: str, chat: str, content: str) -> bytes:
    """useChat's POST of `content` as raw bytes, for a client that stops reading."""
    parts = [{"type": "text", "text": content}]
    return raw_post("/v1/ai-sdk/chat", token, {"id": chat, "messages": [said("m1", *parts)]})


# No per-user limits; a client that stops reading is given up after a second.
QUICK_WRITE_TIMEOUT = EdgeLimits(
    rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0, write_timeout_s=1.0
)


async def test_a_client_that_stops_reading_is_cut_after_the_write_timeout(
    stack: Servers, services: Services, user: str
) -> None:
    """A write that waited the write timeout on a client that stopped reading gives the
    stream up, and its connection with it. Before, the connection stayed open as long
    as the client kept it (aiohttp's own last write waited on it without end), holding
    what its socket had buffered, and a stop of the edge waited for it too."""
    async with extra_edge_server(stack, limits=QUICK_WRITE_TIMEOUT) as server:
        request = stuck_chat_request(token_for(user), new_id(), "a big one [[bulk=8000000]]")
        async with client_that_stops_reading(server.port, request):
            runner = server.runner
            assert runner is not None and runner.server is not None
            for _ in range(400):  # 20 s
                if not runner.server.connections:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the stuck client's connection was never cut")
            assert await stop_took(server) < 3.0


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """What the kernel holds of a connection's writes, not yet taken by its client."""
    sock = transport.get_extra_info("socket")
    out = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out)
    return int.from_bytes(out, "little")


async def test_a_stream_caps_its_sockets_send_buffer_as_an_sse_stream_does(
    stack: Servers, services: Services, user: str
) -> None:
    """A client that stops reading fills its socket's send buffer first: capped
    (`socket_send_buffer_bytes`) as an SSE stream's is. Before, the kernel let it grow
    to 4 MiB (Linux's default ceiling) for each such client before the edge saw it."""
    limits = EdgeLimits(
        rate_per_s=0,
        max_streams_per_user=0,
        max_turns_per_user=0,
        socket_send_buffer_bytes=64 * 1024,
        write_timeout_s=20.0,
    )
    async with extra_edge_server(stack, limits=limits) as server:
        request = stuck_chat_request(token_for(user), new_id(), "a big one [[bulk=8000000]]")
        async with client_that_stops_reading(server.port, request):
            hubs = server.app[HUBS]
            for _ in range(2000):  # 20 s
                if stuck := [s for s in list(hubs._writing) if s.backed_up()]:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the stream's writes never backed up")
            (stream,) = stuck
            assert isinstance(stream, api_ai_sdk._Chunks)
            assert stream._transport is not None
            # the kernel doubles what it is set to, for its own bookkeeping
            assert unsent_bytes(stream._transport) <= 2 * 64 * 1024
