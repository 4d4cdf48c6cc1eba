"""One whole turn through the real system: edge -> CHAT_CMD -> actor -> CHAT_EVT -> SSE viewers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from api.context import HEADERS, HUBS, LOG
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Title
from parley.services import Servers, Services
from tests.conftest import extra_edge_server, token_for
from tests.sse import WIRE_EVENT_NAMES, SseClient, SseEvent, sse_events, until_done


def seq_of(event_id: str | None) -> tuple[int, int]:
    assert event_id is not None, "every SSE event carries an id"
    seq, _, piece = event_id.partition("-")
    return int(seq), int(piece) if piece else 1_000


async def test_posting_a_message_streams_its_turn_in_the_wire_format(api: SseClient) -> None:
    conversation = await api.create_conversation()
    events = await api.send_stream(conversation["id"], "Hello parley, tell me something nice")

    names = [e.event for e in events]
    assert names[0] == "started", names
    assert names[-1] == "done" and events[-1].data == "ok", names
    assert set(names) <= WIRE_EVENT_NAMES, names
    assert "thinking" in names and "token" in names and "title" in names, names
    assert all(isinstance(e.data, str) for e in events if e.event in ("thinking", "token"))
    ids = [seq_of(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), f"ids not strictly increasing: {ids}"
    answer = "".join(e.data for e in events if e.event == "token")
    assert "Hello parley" in answer, answer


async def test_a_tool_call_round_streams_call_and_result_objects(api: SseClient) -> None:
    conversation = await api.create_conversation()
    events = await api.send_stream(conversation["id"], "calculate 6*7")
    calls = [e.data for e in events if e.event == "tool_call"]
    results = [e.data for e in events if e.event == "tool_result"]
    assert calls and isinstance(calls[0], dict) and calls[0]["name"] == "calculator", calls
    assert results and results[0]["id"] == calls[0]["id"] and results[0]["result"] == "42", results
    assert "42" in "".join(e.data for e in events if e.event == "token")


async def _full_turn_from(api: SseClient, conversation_id: str, after: int) -> list[SseEvent]:
    async with api.events(conversation_id, after=str(after)) as response:
        async with asyncio.timeout(30):
            return await until_done(response)


async def test_viewer_reconnecting_mid_turn_gets_every_event_once_in_order(api: SseClient) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    sent = await api.send_json(cid, "count for me [[tokens=300]]")

    seen: list[SseEvent] = []
    # Join without a position: the stream starts at the active turn's beginning.
    async with api.events(cid) as response:
        async with asyncio.timeout(30):
            async for item in sse_events(response):
                seen.append(item)
                if len(seen) >= 20:
                    break
    assert seen[-1].event != "done", "the turn ended before the reconnect; make it longer"
    # Reconnect twice more with the last id seen, the way EventSource does.
    for _ in range(2):
        async with api.events(cid, last_event_id=seen[-1].id) as response:
            async with asyncio.timeout(30):
                async for item in sse_events(response):
                    seen.append(item)
                    if item.event == "done" or len(seen) % 40 == 0:
                        break
        if seen[-1].event == "done":
            break
    if seen[-1].event != "done":
        async with api.events(cid, last_event_id=seen[-1].id) as response:
            async with asyncio.timeout(30):
                seen.extend(await until_done(response))

    reference = await _full_turn_from(api, cid, sent["after"])
    assert [e.id for e in seen] == [e.id for e in reference]
    assert [e.raw for e in seen] == [e.raw for e in reference]
    tokens = "".join(e.data for e in seen if e.event == "token").split()
    assert tokens == [str(i) for i in range(300)], f"tokens lost or repeated: {tokens[:10]}..."


async def test_several_viewers_see_the_same_events_in_the_same_order(api: SseClient) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]

    async def watch() -> list[SseEvent]:
        async with api.events(cid, after="0") as response:
            async with asyncio.timeout(30):
                return await until_done(response)

    viewers = [asyncio.create_task(watch()) for _ in range(4)]
    await asyncio.sleep(0.2)
    await api.send_json(cid, "stream to everyone [[tokens=150]]")
    results = await asyncio.gather(*viewers)
    for seen in results:  # tokens may share events (adaptive batching); none is lost
        tokens = "".join(e.data for e in seen if e.event == "token").split()
        assert tokens == [str(i) for i in range(150)], tokens[:10]
    assert all([e.raw for e in r] == [e.raw for e in results[0]] for r in results[1:])
    assert all([e.id for e in r] == [e.id for e in results[0]] for r in results[1:])


async def zip_range(
    source: AsyncIterator[SseEvent], count: int
) -> AsyncIterator[tuple[SseEvent, int]]:
    """The first `count` items of `source`."""
    i = 0
    async for item in source:
        yield item, i
        i += 1
        if i == count:
            return


async def test_closing_the_client_mid_turn_neither_stops_nor_loses_the_turn(api: SseClient) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    async with api.http.post(
        api.url(f"/v1/conversations/{cid}/messages"),
        json={"content": "a long one [[tokens=400]]"},
        headers=api.headers(Accept="text/event-stream"),
    ) as response:
        seen = [item async for item, _ in zip_range(sse_events(response), 10)]
        assert len(seen) == 10  # then the tab closes
    async with asyncio.timeout(30):
        while True:
            status, messages = await api.request("GET", f"/v1/conversations/{cid}/messages")
            assert status == 200
            assistant = [m for m in messages["messages"] if m["role"] == "assistant"]
            if assistant and assistant[0]["status"] == "complete":
                break
            await asyncio.sleep(0.1)
    text = "".join(b["content"] for b in assistant[0]["content"] if b["role"] == "assistant")
    assert text.split() == [str(i) for i in range(400)]


async def test_viewer_joining_after_the_turn_ended_gets_it_through_done_without_hanging(
    api: SseClient,
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    streamed = await api.send_stream(cid, "short [[tokens=5]]")
    first_seq = seq_of(streamed[0].id)[0]
    async with api.events(cid, after=str(first_seq - 1)) as response:
        async with asyncio.timeout(10):
            late = [e async for e in sse_events(response)]  # reads to the end of the stream
    assert [e.raw for e in late] == [e.raw for e in streamed]
    assert late[-1].event == "done"


async def test_idle_viewer_gets_only_new_events_and_keepalive_pings(api: SseClient) -> None:
    from tests.sse import SseComment, read_sse

    conversation = await api.create_conversation()
    cid = conversation["id"]
    await api.send_stream(cid, "first [[tokens=3]]")
    async with api.events(cid) as response:
        stream = read_sse(response)
        async with asyncio.timeout(10):
            first = await anext(stream)
        assert isinstance(first, SseComment) and first.text == "ping", first
        await api.send_json(cid, "second [[tokens=3]]")
        seen = []
        async with asyncio.timeout(10):
            async for item in stream:
                if isinstance(item, SseEvent):
                    seen.append(item)
                    if item.event == "done":
                        break
    tokens = "".join(e.data for e in seen if e.event == "token").split()
    assert tokens == ["0", "1", "2"], "the idle viewer got the new turn, and only it"
    assert seen[0].event == "started"


def _count_reads_of_the_end(event_log: EventLog) -> list[str]:
    """The conversations whose log's end `event_log` reads from now on, in order."""
    reads: list[str] = []
    last_seq = event_log.last_seq

    async def counted_last_seq(conversation_id: str) -> int:
        reads.append(conversation_id)
        return await last_seq(conversation_id)

    event_log.last_seq = counted_last_seq  # type: ignore[method-assign]
    return reads


async def test_a_request_to_a_conversation_this_edge_follows_does_not_read_the_logs_end(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """A new request's stream starts where the log ended before it was published, read
    from the log: one round trip on the way to the first token. While a viewer has the
    conversation open on the same edge, its hub already knows a position that will do.
    The edge's log is the real one; only its reads of the end are counted."""
    async with extra_edge_server(stack) as server:
        api = SseClient(http, str(server.make_url("")).rstrip("/"), token_for(user))
        cid = (await api.create_conversation())["id"]
        event_log = server.app[LOG]
        reads = _count_reads_of_the_end(event_log)
        async with api.events(cid, after="0") as viewer, asyncio.timeout(30):
            assert viewer.status == 200
            try:
                async with asyncio.timeout(10):
                    while server.app[HUBS].following(cid) is None:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)  # the viewer's hub starting
            except TimeoutError:
                raise AssertionError("the edge does not say it follows the conversation") from None
            reads.clear()
            # slow enough that its end (which makes the hub ask the log) comes later
            await api.send_json(cid, "while a viewer watches [[tokens=5]] [[rate=20]]")
            assert reads == []
            seen = await until_done(viewer)
    assert [e.event for e in seen][-1] == "done"


async def test_the_first_request_of_a_conversation_made_here_does_not_read_the_logs_end(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """A new chat's first message: the edge that made the conversation knows where its
    header is, a position before the log's end that does as the stream's start (what
    lies between, here another writer's title, is passed over). One round trip less
    on the way to the first token of every new conversation made through this edge."""
    async with extra_edge_server(stack) as server:
        api = SseClient(http, str(server.make_url("")).rstrip("/"), token_for(user))
        cid = (await api.create_conversation())["id"]
        event_log = server.app[LOG]
        head = await event_log.last_seq(cid)
        between = Title(
            conversation_id=cid, at=1, event_id=new_id(), title="renamed", source="user"
        )
        await event_log.append(cid, [between], head)
        reads = _count_reads_of_the_end(event_log)
        events = await api.send_stream(cid, "the first question [[tokens=5]]")
        assert reads == []
        names = [e.event for e in events]
        assert names[0] == "started" and names[-1] == "done", names
        assert names.count("title") == 1, names  # the turn's own, not the one before it
        # once: the next request reads the end (or its hub's position) again
        assert server.app[HEADERS].made_at(cid) is None
