"""Acknowledged publishes on real JetStream: the sequence, and each way one can fail."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from events.ids import new_id
from events.log import EventLog
from events.publisher import AckedPublisher
from events.replies import Replies
from events.subjects import EVT_STREAM, event_subject

WRONG_LAST_SEQUENCE = 10071


@pytest.fixture
async def client(nc: NatsClient, event_log: EventLog) -> NatsClient:
    """The session's connection, once the streams exist (the event_log fixture makes them)."""
    return nc


def headers(expected: int, **more: str) -> dict[str, str]:
    return {
        "Nats-Expected-Stream": EVT_STREAM,
        "Nats-Expected-Last-Subject-Sequence": str(expected),
        "Nats-Msg-Id": new_id(),
        **more,
    }


async def test_each_publish_gets_its_own_sequence_and_nothing_is_left_waiting(
    client: NatsClient,
) -> None:
    publisher = AckedPublisher(Replies(client))
    subject = event_subject(new_id())
    first = await publisher.publish(subject, b"{}", headers(0), 5.0)
    second = await publisher.publish(subject, b"{}", headers(first), 5.0)
    assert 0 < first < second
    stored = await client.jetstream().get_msg(EVT_STREAM, second)
    assert stored.subject == subject
    assert publisher._replies.waiting == 0


async def test_a_stale_expected_sequence_is_the_streams_error(client: NatsClient) -> None:
    publisher = AckedPublisher(Replies(client))
    subject = event_subject(new_id())
    await publisher.publish(subject, b"{}", headers(0), 5.0)
    with pytest.raises(nats.js.errors.APIError) as refused:
        await publisher.publish(subject, b"{}", headers(0), 5.0)
    assert refused.value.err_code == WRONG_LAST_SEQUENCE
    assert publisher._replies.waiting == 0


async def test_a_subject_no_stream_holds_has_no_responders(client: NatsClient) -> None:
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await AckedPublisher(Replies(client)).publish(f"nowhere.{new_id()}", b"{}", {}, 5.0)


async def test_a_listener_that_never_answers_times_out(client: NatsClient) -> None:
    subject = f"silent.{new_id()}"
    sub = await client.subscribe(subject)  # receives the message, acknowledges nothing
    publisher = AckedPublisher(Replies(client))
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await publisher.publish(subject, b"{}", {}, 0.2)
    finally:
        await sub.unsubscribe()
    assert publisher._replies.waiting == 0
