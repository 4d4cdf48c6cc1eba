"""useChat frontends, unchanged: the real `ai` package (npm, run under Node.js) reads parley's
/v1/ai-sdk routes and must assemble the text, reasoning and tool parts the log holds,
from the start of a turn and when it resumes one mid-turn."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from events.ids import new_id
from events.log import EventLog
from events.turns import TurnRecord, TurnRegistry, redis_client
from events.vocabulary import Chunk, Done, ToolCall, ToolResult
from parley.services import Servers, Services
from tests.conftest import token_for
from tests.sse import SseClient

CLIENT = Path(__file__).parent / "ai_sdk" / "client.mjs"


def node(*args: str) -> dict[str, Any]:
    if shutil.which("node") is None:
        raise AssertionError("Node.js is needed for the AI SDK test (the machine has it)")
    if not (CLIENT.parent / "node_modules" / "ai").is_dir():
        raise AssertionError("run `make test` (it installs the ai package with npm ci)")
    done = subprocess.run(
        ["node", str(CLIENT), *args], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


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


async def test_use_chat_sends_a_message_and_assembles_the_turn_the_log_holds(
    services: Services, user: str, event_log: EventLog
) -> None:
    chat = new_id()  # useChat's chat id becomes the conversation, created on first use
    reply = await asyncio.to_thread(
        node, "send", services.edge_url, token_for(user), chat, "ui-1", "calculate 6*7 [[think]]"
    )
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


@pytest.mark.parametrize(
    "body",
    [
        {"id": "bad id!", "messages": []},
        {"id": "c1", "messages": [{"id": "u", "role": "user", "parts": []}]},
        {"id": "c2", "messages": [], "trigger": "something-else"},
    ],
)
async def test_bad_ai_sdk_requests_are_plain_400s(api: SseClient, body: dict[str, Any]) -> None:
    body = {**body, "id": body["id"] + new_id()} if body["id"] != "bad id!" else body
    status, answer = await api.request("POST", "/v1/ai-sdk/chat", json=body)
    assert status == 400 and answer["error"]["code"] in ("bad_request", "invalid_request"), answer


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
