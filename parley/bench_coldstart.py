"""`parley bench coldstart`: a cold actor on a long conversation, from its log and from its snapshot.

A worker that starts (a deploy, a restart, partitions taken over from another)
has folded no conversation yet: the first command of each makes its actor fold
the log. This builds one conversation of about `--events` log entries (turns as
`rebuild`'s synthetic log makes them: 40-160 chunks each, some tool calls), then
times `--rounds` cold folds of it by an actor's writer (`EventWriter.catch_up`)
with no snapshot to begin at, and as many from the snapshot a worker would have
written of it (actors.snapshots): medians of each, side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import msgspec

from actors.snapshots import SnapshotStore, encode_snapshot
from actors.writer import EventWriter
from events import broker
from events.ids import new_id
from events.log import EventLog
from events.streams import ensure_streams
from events.turns import redis_client
from events.vocabulary import Done, Failed
from parley.bench_rebuild import make_conversation
from parley.services import Servers

DEFAULT_ENTRIES = 100_000
_APPEND_BATCH = 500


class ColdStartResult(msgspec.Struct):
    workload: str
    entries: int  # of the conversation's log
    answers: int
    rounds: int
    from_log_ms: float  # median of the rounds
    from_snapshot_ms: float
    speedup: float
    snapshot_kib: float  # compressed, as Redis holds it
    publish_s: float  # building the conversation's log, not measured
    load_avg_1m: float


async def bench_coldstart(servers: Servers, entries: int, rounds: int) -> ColdStartResult:
    events = list(make_conversation(entries))
    cid = events[0].conversation_id
    load = os.getloadavg()[0]
    nc = await broker.connect(
        servers.nats_url, name="parley-bench-coldstart", reconnect_forever=False
    )
    redis = redis_client(servers.redis_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        event_log = EventLog(js)
        began = time.perf_counter()
        seq = 0
        for start in range(0, len(events), _APPEND_BATCH):  # as a worker appends, headers and all
            seq = await event_log.append(cid, events[start : start + _APPEND_BATCH], seq)
        publish_s = time.perf_counter() - began
        store = SnapshotStore(redis, every=1)

        async def cold(snapshots: SnapshotStore | None) -> tuple[float, EventWriter]:
            writer = EventWriter(
                cid, event_log, max_event_bytes=512 * 1024, new_id=new_id, snapshots=snapshots
            )
            began = time.perf_counter()
            await writer.catch_up()
            return (time.perf_counter() - began) * 1000, writer

        from_log: list[float] = []
        for _ in range(rounds):
            ms, writer = await cold(None)
            from_log.append(ms)
        folded = writer.folded()
        if folded.entries != len(events) or not await store.save(folded):
            raise RuntimeError(f"folded {folded.entries} of {len(events)} entries, or no snapshot")
        from_snapshot: list[float] = []
        for _ in range(rounds):
            ms, read = await cold(store)
            if read.state != folded.state:  # a shortcut must arrive where the long way does
                raise RuntimeError("the state folded from the snapshot is not the log's")
            from_snapshot.append(ms)
    finally:
        await redis.aclose()
        await nc.close()
    log_ms, snapshot_ms = statistics.median(from_log), statistics.median(from_snapshot)
    return ColdStartResult(
        workload="coldstart",
        entries=len(events),
        answers=sum(1 for e in events if isinstance(e, Done | Failed)),
        rounds=rounds,
        from_log_ms=round(log_ms, 1),
        from_snapshot_ms=round(snapshot_ms, 1),
        speedup=round(log_ms / snapshot_ms, 1) if snapshot_ms else 0.0,
        snapshot_kib=round(len(encode_snapshot(folded)) / 1024, 1),
        publish_s=round(publish_s, 1),
        load_avg_1m=round(load, 2),
    )


def render(r: ColdStartResult) -> str:
    return (
        f"coldstart: one conversation of {r.entries:,} log entries ({r.answers:,} answers),"
        f" {r.rounds} cold folds each way, medians\n"
        f"  from its log {r.from_log_ms:,.1f} ms   from its snapshot {r.from_snapshot_ms:,.1f} ms"
        f"   ({r.speedup:g}x; the snapshot {r.snapshot_kib:,.1f} KiB compressed)\n"
        f"  (the log built in {r.publish_s} s, not measured; load average before:"
        f" {r.load_avg_1m})"
    )


def run_coldstart_bench(args: argparse.Namespace, servers: Servers) -> int:
    result = asyncio.run(
        bench_coldstart(servers, args.events or DEFAULT_ENTRIES, max(1, args.rounds or 5))
    )
    print(msgspec.json.encode(result).decode() if args.json else render(result))
    return 0
