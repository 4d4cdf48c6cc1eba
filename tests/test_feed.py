"""The projector's feed hands out every entry once, in order, never more than two windows ahead."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from events.broker import EntryClient
from events.ids import new_id
from events.log import EventLog
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import ConversationCreated, Event, Title
from parley.services import Servers
from projections.feed import LogFeed, connect


def _title(cid: str, text: str) -> Title:
    return Title(
        conversation_id=cid, at=time.time_ns(), event_id=new_id(), title=text, source="user"
    )


async def _append(event_log: EventLog, cid: str, events: list[Event], head: int) -> list[int]:
    seqs = []
    for event in events:
        head = await event_log.append(cid, [event], expected_seq=head)
        seqs.append(head)
    return seqs


async def _conversation(event_log: EventLog, titles: int) -> tuple[str, list[int]]:
    cid = new_id()
    created = ConversationCreated(
        conversation_id=cid, at=time.time_ns(), event_id=new_id(), user_id="u"
    )
    events: list[Event] = [created, *(_title(cid, f"t{i}") for i in range(titles))]
    return cid, await _append(event_log, cid, events, 0)


async def _drain(feed: LogFeed, want: int, limit: int = 1000) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(20):
        while len(got) < want:
            got.extend(raw.seq for raw in await feed.next_batch(limit, wait_s=0.5))
    return got


async def _delivered(js: JetStreamContext, feed: LogFeed, at_least: int) -> Any:
    """The feed's consumer once the server has delivered `at_least` entries (or after
    ten seconds of asking): the delivery count has no event to wait on. `Any`: the
    tests read `delivered`, which nats.py types as optional, without a check."""
    for _ in range(500):
        info = await js.consumer_info(EVT_STREAM, feed._consumer)
        if info.delivered.consumer_seq >= at_least:
            break
        await asyncio.sleep(0.02)
    return info


async def test_every_entry_comes_once_in_order_across_many_small_windows(
    nc: NatsClient, event_log: EventLog
) -> None:
    cid, seqs = await _conversation(event_log, 40)
    feed = LogFeed(nc.jetstream(), 0, window=3, filter_subject=event_subject(cid))
    try:
        got = await _drain(feed, len(seqs), limit=2)
        assert await feed.next_batch(10, wait_s=0.2) == [], "nothing after the end"
    finally:
        await feed.close()
    assert got == seqs


async def test_the_server_holds_what_the_reader_has_not_asked_for(
    nc: NatsClient, event_log: EventLog
) -> None:
    cid, seqs = await _conversation(event_log, 60)
    js = nc.jetstream()
    feed = LogFeed(js, 0, window=5, filter_subject=event_subject(cid))
    try:
        first = await feed.next_batch(1, wait_s=5)  # asks for two windows of 5
        info = await _delivered(js, feed, 10)
        assert info.delivered.consumer_seq == 10 and info.num_pending == len(seqs) - 10, info
        rest = await _drain(feed, len(seqs) - 1, limit=7)
    finally:
        await feed.close()
    assert [r.seq for r in first] + rest == seqs


async def test_a_gathering_feed_leaves_a_trickle_on_the_server_until_it_has_gathered(
    nc: NatsClient, event_log: EventLog
) -> None:
    """Caught up, a feed given `gather_s` is not sent each entry as it is stored: the
    next call is woken by one and takes the rest of what came in one answer."""
    cid, seqs = await _conversation(event_log, 5)
    js = nc.jetstream()
    feed = LogFeed(js, 0, window=100, filter_subject=event_subject(cid), gather_s=0.05)
    try:
        got = await _drain(feed, len(seqs), limit=100)
        more = await _append(event_log, cid, [_title(cid, f"m{i}") for i in range(30)], seqs[-1])
        info = await js.consumer_info(EVT_STREAM, feed._consumer)
        # with requests kept open the server would have sent all 30 by now
        assert info.delivered.consumer_seq == len(seqs) and info.num_pending == 30, info
        batch = await feed.next_batch(100, wait_s=5)
    finally:
        await feed.close()
    assert got == seqs
    assert [r.seq for r in batch] == more, "one batch, every entry, in order"


async def test_a_gathering_feed_gathers_longer_while_its_batches_come_large(
    nc: NatsClient, event_log: EventLog
) -> None:
    """A batch of `busy_batch` entries or more makes the next one gather `busy_gather_s`
    (what comes meanwhile joins the entry that woke the feed); a smaller batch
    brings the short wait back."""
    cid, seqs = await _conversation(event_log, 29)
    js = nc.jetstream()
    feed = LogFeed(
        js,
        0,
        window=100,
        filter_subject=event_subject(cid),
        gather_s=0.01,
        busy_gather_s=3.0,
        busy_batch=10,
    )
    try:
        assert feed.gathering_s == 0.01
        assert [r.seq for r in await feed.next_batch(100, wait_s=5)] == seqs
        assert feed.gathering_s == 3.0, "30 entries came at once: the log is busy"
        waiting = asyncio.create_task(feed.next_batch(100, wait_s=5))
        woke = await _append(event_log, cid, [_title(cid, "w")], seqs[-1])
        info = await _delivered(js, feed, len(seqs) + 1)  # it has the entry, and gathers
        assert info.delivered.consumer_seq == len(seqs) + 1, info
        await asyncio.sleep(0.5)  # far past `gather_s`, well within `busy_gather_s`
        more = await _append(event_log, cid, [_title(cid, f"m{i}") for i in range(3)], woke[-1])
        batch = await waiting
        assert [r.seq for r in batch] == woke + more, "what came while it gathered joined it"
        assert feed.gathering_s == 0.01, "four entries: quiet again"
    finally:
        await feed.close()


async def test_a_gathering_feed_that_is_behind_takes_full_batches_in_order(
    nc: NatsClient, event_log: EventLog
) -> None:
    cid, seqs = await _conversation(event_log, 249)
    js = nc.jetstream()
    feed = LogFeed(js, 0, window=100, filter_subject=event_subject(cid), gather_s=0.01)
    try:
        batches = [[r.seq for r in await feed.next_batch(100, wait_s=5)]]
        # a full batch: the next one is asked for as this one is handed out
        info = await _delivered(js, feed, 200)
        assert info.delivered.consumer_seq == 200, info
        batches += [[r.seq for r in await feed.next_batch(100, wait_s=5)] for _ in range(2)]
        assert await feed.next_batch(100, wait_s=0.2) == [], "nothing after the end"
    finally:
        await feed.close()
    assert [len(b) for b in batches] == [100, 100, 50]
    assert [seq for b in batches for seq in b] == seqs


@pytest.mark.parametrize("gather_s", [0.0, 0.01], ids=["open requests", "gathering"])
async def test_a_consumer_the_server_forgot_is_replaced_without_losing_an_entry(
    nc: NatsClient, event_log: EventLog, gather_s: float
) -> None:
    cid, seqs = await _conversation(event_log, 4)
    js = nc.jetstream()
    feed = LogFeed(
        js,
        0,
        window=100,
        filter_subject=event_subject(cid),
        watchdog_s=0.2,
        gather_s=gather_s,
    )
    try:
        got = await _drain(feed, len(seqs))
        # the server loses the consumer, as a restarted server forgets ephemeral ones
        await js.delete_consumer(EVT_STREAM, feed._consumer)
        more = await _append(event_log, cid, [_title(cid, f"m{i}") for i in range(3)], seqs[-1])
        got += await _drain(feed, 3)
    finally:
        await feed.close()
    assert got == seqs + more


async def test_the_entry_client_leaves_headers_unparsed_but_reads_status_lines(
    stack: Servers, event_log: EventLog
) -> None:
    cid, seqs = await _conversation(event_log, 1)  # appended with their three headers
    client = await connect(stack.nats_url, name="test-entry-client")
    try:
        js = client.jetstream()
        feed = LogFeed(js, 0, filter_subject=event_subject(cid))
        try:
            assert [r.seq for r in await feed.next_batch(10, wait_s=5)] == seqs
        finally:
            await feed.close()
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        await client.publish(inbox, b"x", headers={"Nats-Msg-Id": "m1"})
        assert (await sub.next_msg(timeout=5)).headers is None, "headers were parsed"
        # "no responders" is a status line: still understood
        with pytest.raises(nats.errors.NoRespondersError):
            await client.request(f"nobody.listens.{new_id()}", b"", timeout=5)
    finally:
        await client.close()


async def test_the_entry_client_takes_the_node_list_every_process_takes(stack: Servers) -> None:
    """`PARLEY_NATS_URL` as events.broker reads it: nodes in the order given, the first
    that answers; a role reconnects for ever, a one-shot command gives up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed
    command = await connect(
        f"{dead}, {stack.nats_url}", name="test-entry-nodes", reconnect_forever=False
    )
    role = await connect(f"{stack.nats_url},{dead}", name="test-entry-role")
    try:
        for client in (command, role):
            assert isinstance(client, EntryClient) and client.is_connected
            assert client.connected_url is not None
            assert client.connected_url.port == int(stack.nats_url.rsplit(":", 1)[1])
            assert client.options["dont_randomize"] is True
        assert command.options["max_reconnect_attempts"] > 0
        assert role.options["max_reconnect_attempts"] == -1
    finally:
        await command.close()
        await role.close()
