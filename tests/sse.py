"""A small SSE client for tests: speaks parley's HTTP API and parses the event stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

# The event names of DESIGN section 6, the ones the original frontend knows.
WIRE_EVENT_NAMES = frozenset(
    {
        "started",
        "thinking",
        "token",
        "tool_call",
        "tool_result",
        "title",
        "billing_error",
        "error",
        "done",
    }
)


class SseEvent(msgspec.Struct, frozen=True):
    id: str | None
    event: str  # the envelope's "event"
    data: Any
    raw: dict[str, Any]


class SseComment(msgspec.Struct, frozen=True):
    text: str


async def read_sse(response: aiohttp.ClientResponse) -> AsyncIterator[SseEvent | SseComment]:
    """Parse text/event-stream per the WHATWG rules we rely on: id, data, comments."""
    event_id: str | None = None
    data: list[str] = []
    async for raw_line in response.content:
        line = raw_line.decode().rstrip("\r\n")
        if line == "":
            if data:
                envelope = json.loads("\n".join(data))
                yield SseEvent(event_id, envelope["event"], envelope["data"], envelope)
            event_id, data = None, []
            continue
        if line.startswith(":"):
            yield SseComment(line[1:].strip())
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


class SseClient:
    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.http = http
        self.base_url = base_url
        self.token = token

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def url(self, path: str) -> str:
        return self.base_url + path

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = self.headers(**kwargs.pop("headers", {}))
        async with self.http.request(method, self.url(path), headers=headers, **kwargs) as response:
            body = await response.read()
            try:
                return response.status, json.loads(body) if body else None
            except json.JSONDecodeError:
                return response.status, body.decode()

    async def create_conversation(self, **body: Any) -> dict[str, Any]:
        status, created = await self.request("POST", "/v1/conversations", json=body)
        assert status == 201, (status, created)
        assert isinstance(created, dict)
        return created

    async def send_json(self, conversation_id: str, content: str, **extra: Any) -> dict[str, Any]:
        """POST a message with Accept: application/json: 202 and the message id, no stream."""
        status, body = await self.request(
            "POST",
            f"/v1/conversations/{conversation_id}/messages",
            json={"content": content, **extra},
            headers={"Accept": "application/json"},
        )
        assert status == 202, (status, body)
        assert isinstance(body, dict)
        return body

    async def send_stream(self, conversation_id: str, content: str, **extra: Any) -> list[SseEvent]:
        """POST a message and read its turn's SSE stream to the end."""
        async with self.http.post(
            self.url(f"/v1/conversations/{conversation_id}/messages"),
            json={"content": content, **extra},
            headers=self.headers(Accept="text/event-stream"),
        ) as response:
            assert response.status == 200, (response.status, await response.text())
            assert response.headers["Content-Type"].startswith("text/event-stream")
            return [e async for e in read_sse(response) if isinstance(e, SseEvent)]

    async def send_stream_to(
        self, path: str, body: dict[str, Any], method: str = "POST"
    ) -> list[SseEvent]:
        """Any request that answers with a turn's stream (regenerate, edit), read to the end."""
        async with self.http.request(
            method, self.url(path), json=body, headers=self.headers(Accept="text/event-stream")
        ) as response:
            assert response.status == 200, (response.status, await response.text())
            return [e async for e in read_sse(response) if isinstance(e, SseEvent)]

    def events(
        self, conversation_id: str, *, after: str | None = None, last_event_id: str | None = None
    ) -> Any:
        """GET the conversation's event stream (use as `async with`)."""
        headers = self.headers(Accept="text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        params = {"after": after} if after is not None else None
        return self.http.get(
            self.url(f"/v1/conversations/{conversation_id}/events"), headers=headers, params=params
        )


async def until_done(response: aiohttp.ClientResponse) -> list[SseEvent]:
    """Read SSE events up to and including the first `done`."""
    out: list[SseEvent] = []
    async for item in read_sse(response):
        if isinstance(item, SseEvent):
            out.append(item)
            if item.event == "done":
                break
    return out


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """Only the events of an SSE stream, no comments."""
    async for item in read_sse(response):
        if isinstance(item, SseEvent):
            yield item
