"""Starting a process never weakens a stream an operator configured; it adds only what
parley needs, and refuses a stream it cannot use instead of changing it.

On a three-node cluster of its own per test (events.streams; the rules are
pure and tested first)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from actors.partitions import BUCKET
from events.broker import connect, server_list
from events.errors import StreamMisconfigured
from events.log import ensure_streams
from events.streams import (
    CMD,
    DUPLICATE_WINDOW_S,
    EVT,
    EVT_MAX_CONSUMERS,
    differences,
    missing,
    stream_config,
)
from events.subjects import CMD_STREAM, CMD_SUBJECTS, EVT_STREAM, EVT_SUBJECTS, LIVE_SUBJECTS
from parley.cluster import NatsCluster
from parley.services import Servers, ServiceOptions, Services
from tests.conftest import SECRET
from tests.conftest import test_catalog as catalog_for_tests

DAY_NS = 86_400 * 1_000_000_000


# ---------------------------------------------------------------- the rules, pure


def test_a_stream_with_everything_parley_needs_is_left_alone() -> None:
    config = {
        "retention": "limits",
        "subjects": [EVT_SUBJECTS],
        "allow_direct": True,
        "duplicate_window": int(DUPLICATE_WINDOW_S * 1e9),
        "num_replicas": 3,
        "max_age": DAY_NS,
        "max_consumers": EVT_MAX_CONSUMERS,
        "republish": {"src": EVT_SUBJECTS, "dest": LIVE_SUBJECTS},
    }
    assert missing(EVT, config) == {}
    assert differences(EVT, config, replicas=3) == []


def test_only_what_parley_needs_is_added() -> None:
    config = {"retention": "limits", "subjects": ["audit.>"], "duplicate_window": 10**9}
    assert missing(EVT, config) == {
        "subjects": ["audit.>", EVT_SUBJECTS],
        "allow_direct": True,
        "duplicate_window": int(DUPLICATE_WINDOW_S * 1e9),
        "max_consumers": EVT_MAX_CONSUMERS,
        "republish": {"src": EVT_SUBJECTS, "dest": LIVE_SUBJECTS},
    }
    # a longer duplicate window than parley's is kept
    assert "duplicate_window" not in missing(
        CMD, {"retention": "workqueue", "subjects": [CMD_SUBJECTS], "duplicate_window": DAY_NS}
    )


@pytest.mark.parametrize(
    ("spec", "retention"), [(CMD, "limits"), (CMD, "interest"), (EVT, "workqueue")]
)
def test_a_stream_with_the_wrong_retention_is_refused_with_what_to_fix(
    spec: Any, retention: str
) -> None:
    with pytest.raises(StreamMisconfigured) as refused:
        missing(spec, {"retention": retention, "subjects": [spec.subjects]})
    message = str(refused.value)
    assert spec.name in message and retention in message and spec.retention in message


@pytest.mark.parametrize(
    "republish",
    [
        {"src": EVT_SUBJECTS, "dest": "audit.copy.>"},
        {"src": "chat.evt.x.>", "dest": LIVE_SUBJECTS},
        {"src": EVT_SUBJECTS, "dest": LIVE_SUBJECTS, "headers_only": True},
    ],
)
def test_a_log_that_republishes_elsewhere_is_refused_with_what_to_fix(
    republish: dict[str, Any],
) -> None:
    """A stream republishes to one place; the edges follow parley's (events.follow)."""
    config = {"retention": "limits", "subjects": [EVT_SUBJECTS], "republish": republish}
    with pytest.raises(StreamMisconfigured) as refused:
        missing(EVT, config)
    message = str(refused.value)
    assert EVT_STREAM in message and LIVE_SUBJECTS in message and "remove" in message


def test_replicas_and_storage_that_differ_are_reported_not_changed() -> None:
    notes = differences(EVT, {"num_replicas": 1, "storage": "memory"}, replicas=3)
    assert len(notes) == 2
    assert "1 replica(s)" in notes[0] and "left as configured" in notes[0]
    assert "memory" in notes[1]


def test_a_consumer_limit_an_operator_set_is_kept_and_reported() -> None:
    config = {"retention": "limits", "subjects": [EVT_SUBJECTS], "max_consumers": 500}
    assert "max_consumers" not in missing(EVT, config)
    (note,) = differences(EVT, {**config, "num_replicas": 1, "storage": "file"}, replicas=1)
    assert "500 consumers" in note and "left as configured" in note
    # unset (-1) is the server's default of 1,000 watched conversations: raised
    assert missing(EVT, {**config, "max_consumers": -1})["max_consumers"] == EVT_MAX_CONSUMERS


def test_a_nats_url_may_name_every_node_of_a_cluster() -> None:
    assert server_list("nats://a:4222") == ["nats://a:4222"]
    assert server_list(" nats://a:1, nats://b:2 ,,nats://c:3") == [
        "nats://a:1",
        "nats://b:2",
        "nats://c:3",
    ]
    with pytest.raises(ValueError):
        server_list(" , ")


# ---------------------------------------------------------------- on a cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", size=3) as running:
        yield running


@pytest.fixture
async def cluster_nc(cluster: NatsCluster) -> AsyncIterator[NatsClient]:
    nc = await connect(cluster.url(), name="test-streams")
    yield nc
    await nc.close()


async def test_a_role_starting_on_an_operators_streams_changes_none_of_their_settings(
    cluster: NatsCluster, cluster_nc: NatsClient, stack: Servers, demo_model_url: str
) -> None:
    js = cluster_nc.jetstream()
    # As an operator would: R3, file, a retention limit by age and size, a longer
    # duplicate window, and a work queue limited in size too.
    await js.add_stream(
        api.StreamConfig(
            name=EVT_STREAM,
            subjects=[EVT_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=3,
            max_age=30 * 86_400,
            max_bytes=1 << 30,
            duplicate_window=600,
            allow_direct=True,
            max_consumers=50_000,
            republish=api.RePublish(src=EVT_SUBJECTS, dest=LIVE_SUBJECTS),
        )
    )
    await js.add_stream(
        api.StreamConfig(
            name=CMD_STREAM,
            subjects=[CMD_SUBJECTS],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=3,
            max_msgs=100_000,
        )
    )
    await js.create_key_value(api.KeyValueConfig(bucket=BUCKET, ttl=20, history=1, replicas=3))
    before = {name: await stream_config(js, name) for name in (EVT_STREAM, CMD_STREAM)}
    bucket_before = await stream_config(js, f"KV_{BUCKET}")
    servers = Servers(
        nats_url=cluster.url(1), database_url=stack.database_url, redis_url=stack.redis_url
    )
    # PARLEY_STREAM_REPLICAS left at 1: an existing stream keeps its 3 all the same
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=catalog_for_tests(),
        model_base_url=demo_model_url,
        db_schema="streams_test",
        port=0,
    )
    async with Services(servers, options, ("edge", "worker")) as running:
        assert running.worker is not None
        after = {name: await stream_config(js, name) for name in (EVT_STREAM, CMD_STREAM)}
        bucket_after = await stream_config(js, f"KV_{BUCKET}")
    assert after == before
    assert bucket_after == bucket_before
    evt = after[EVT_STREAM]
    assert evt is not None and evt["num_replicas"] == 3 and evt["max_bytes"] == 1 << 30


async def test_missing_streams_are_created_at_the_configured_replicas_with_r3_consumers(
    cluster: NatsCluster, cluster_nc: NatsClient
) -> None:
    js = cluster_nc.jetstream()
    notes = await ensure_streams(js, replicas=3)
    assert len(notes) == 2 and all("created" in note for note in notes), notes
    for name in (EVT_STREAM, CMD_STREAM):
        info = await js.stream_info(name)
        assert info.config.num_replicas == 3
        assert info.config.storage == api.StorageType.FILE
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    # a second start finds nothing to do
    assert await ensure_streams(js, replicas=3) == []
    # a durable consumer that names no replicas has as many as its stream
    await js.add_consumer(CMD_STREAM, api.ConsumerConfig(durable_name="probe"))
    consumer = await js.consumer_info(CMD_STREAM, "probe")
    assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2


async def test_a_stream_lacking_what_parley_needs_gets_only_that(
    cluster_nc: NatsClient,
) -> None:
    js = cluster_nc.jetstream()
    await js.add_stream(
        api.StreamConfig(
            name=EVT_STREAM,
            subjects=["audit.>"],
            num_replicas=3,
            max_msgs_per_subject=50_000,
            duplicate_window=5,
        )
    )
    before = await stream_config(js, EVT_STREAM)
    notes = await ensure_streams(js, replicas=3)
    after = await stream_config(js, EVT_STREAM)
    assert before is not None and after is not None
    added = "added allow_direct, duplicate_window, max_consumers, republish, subjects"
    assert any(added in note for note in notes), notes
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {
        "subjects",
        "allow_direct",
        "duplicate_window",
        "max_consumers",
        "republish",
    }, changed
    assert after["subjects"] == ["audit.>", EVT_SUBJECTS]
    assert after["max_msgs_per_subject"] == 50_000 and after["num_replicas"] == 3


async def test_a_command_stream_that_is_no_work_queue_stops_the_start_and_is_not_changed(
    cluster_nc: NatsClient,
) -> None:
    js = cluster_nc.jetstream()
    await js.add_stream(api.StreamConfig(name=CMD_STREAM, subjects=[CMD_SUBJECTS], num_replicas=3))
    before = await stream_config(js, CMD_STREAM)
    with pytest.raises(StreamMisconfigured, match="workqueue"):
        await ensure_streams(js, replicas=3)
    assert await stream_config(js, CMD_STREAM) == before
