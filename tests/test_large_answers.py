"""A 2 MB answer streams, lands in the log and in the read model whole, and ends its turn."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient

from events.codec import encode
from events.log import EventLog
from events.vocabulary import ContentPart, Done
from tests.conftest import Projected
from tests.sse import SseClient

SIZE = 2 * 1024 * 1024


async def test_a_two_megabyte_answer_is_streamed_stored_and_projected_whole(
    api: SseClient, event_log: EventLog, nc: NatsClient, projected: Projected
) -> None:
    cid = (await api.create_conversation())["id"]
    async with asyncio.timeout(60):
        events = await api.send_stream(cid, f"a long one please [[bulk={SIZE}]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events[-3:]
    streamed = "".join(e.data for e in events if e.event == "token")
    assert len(streamed) == SIZE, len(streamed)

    stored = await event_log.read(cid)
    parts = [s.event for s in stored if isinstance(s.event, ContentPart)]
    (end,) = [s.event for s in stored if isinstance(s.event, Done)]
    assert end.content == [] and end.content_parts == len(parts) > 1, end
    assert "".join(p.text for p in parts) == streamed
    biggest = max(len(encode(s.event)) for s in stored)
    assert biggest < nc.max_payload // 2, f"largest event {biggest} bytes"

    # the projection has applied the whole log (it was polled here, and read too early)
    await projected(cid)
    status, body = await api.request("GET", f"/v1/conversations/{cid}/messages")
    assert status == 200, body
    answer = body["messages"][-1]
    assert answer["status"] == "complete", answer["status"]
    assert answer["content"] == [{"role": "assistant", "content": streamed}], len(answer["content"])
