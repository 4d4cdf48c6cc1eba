"""`parley bench rebuild`: how fast a full rebuild turns a large log into read models.

The log is synthetic but shaped like a real one: conversations of a few turns,
each turn a user message, `started`, a title on the first turn, thinking and
answer chunks of a few tokens each (most of the log, as at a realistic token
rate), a tool call and its result in about a third of the turns followed by
more answer, and `done` (`failed` now and then). Twenty conversations stream at
once, so their events interleave as they would live. Events are the
vocabulary's own Structs, encoded by the codec and published straight to
CHAT_EVT with the headers an append writes (acks awaited in windows): the
actor and the model are not measured here, the projection is.

Then `projections.rebuild.rebuild` runs into a scratch schema, exactly as
`parley projections rebuild` does, and is timed from start to swap; this is
done `--rounds` times over the same log (a fresh schema each, dropped after),
and the report gives the median round's log entries and turns per second, with
the spread, since this machine is shared and noisy. `make_log` is pure and
seeded: the same arguments make a log of the same shape.

Nothing of a running parley uses this module. It writes synthetic
conversations into the log it is pointed at: with no servers configured,
`parley bench` starts a scratch stack for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import time
from collections.abc import Iterator

import asyncpg
import msgspec
from nats.js import JetStreamContext, api

from events import broker
from events.codec import encode
from events.ids import new_id
from events.streams import ensure_streams
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import (
    Chunk,
    ChunkKind,
    ContentBlock,
    ConversationCreated,
    Done,
    Event,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
    UserMessage,
)
from parley.services import Servers
from projections.db import drop_schema
from projections.feed import connect
from projections.handlers import READ_MODELS
from projections.rebuild import RebuildReport, default_workers, rebuild

_TEXT = (
    "the of and to in is that it for as with was on be by this are from at or an have not "
    "which but all were when we there can one their what so if about out up into has more "
    "time some could them other than then now only its over also after use two how our "
    "work "
)
_WORDS = tuple(_TEXT.split())  # the commonest English words: chunk text
_CONCURRENT = 20  # conversations streaming at once: their events interleave
_PUBLISH_WINDOW = 20_000  # acks outstanding while publishing


class RebuildBenchResult(msgspec.Struct):
    events: int  # log entries each rebuild read
    turns: int  # `started` events among them
    chunks: int
    rounds: int  # rebuilds of the same log; the figures below are their median
    seconds: float  # a rebuild, start to swap committed
    events_per_s: float
    turns_per_s: float
    events_per_s_min: float  # the spread across rounds
    events_per_s_max: float
    build_s: float
    swap_s: float
    published: int  # synthetic events this run added to the log
    publish_s: float
    messages: int  # rows a rebuild wrote to `messages` (a check that it did the work)
    batch: int
    workers: int  # reader processes
    # The machine is shared: parley's own CPU time in the median round (this process
    # and its reader processes; not the NATS server's or Postgres's), and the load
    # average before the rounds, to read the wall-clock figures against.
    cpu_s: float
    events_per_cpu_s: float
    load_avg_1m: float


def make_log(events: int, seed: int = 8) -> Iterator[Event]:
    """At least `events` events of interleaved conversations, each ending whole."""
    synth = _Synth(random.Random(seed))
    active: list[Iterator[Event]] = []
    produced = 0
    while produced < events or active:
        while produced < events and len(active) < _CONCURRENT:
            active.append(synth.conversation())
        stream = synth.rng.choice(active)
        event = next(stream, None)
        if event is None:
            active.remove(stream)
            continue
        produced += 1
        yield event


def make_conversation(entries: int, seed: int = 8) -> Iterator[Event]:
    """One conversation of at least `entries` events, each of its turns whole (the same
    turns as `make_log`'s: 40-160 chunks of answer and thinking, some tool calls)."""
    return _Synth(random.Random(seed)).conversation(at_least=max(1, entries))


class _Synth:
    """Makes conversations; the clock starts at 2026-01-01 and moves forward in small steps."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = 1_767_225_600 * 10**9

    def _at(self) -> int:
        self.now += self.rng.randint(1, 40) * 1_000_000
        return self.now

    def _words(self, low: int, high: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(low, high)))

    def conversation(self, at_least: int = 0) -> Iterator[Event]:
        """One to five turns; with `at_least`, as many as make that many events."""
        cid = new_id()
        yield ConversationCreated(
            conversation_id=cid,
            at=self._at(),
            event_id=new_id(),
            user_id=f"bench-{self.rng.randint(1, 500)}",
        )
        made, number, turns = 1, 0, self.rng.randint(1, 5)
        while (made < at_least) if at_least else (number < turns):
            for event in self._turn(cid, first=number == 0):
                made += 1
                yield event
            number += 1

    def _turn(self, cid: str, *, first: bool) -> Iterator[Event]:
        rng, turn, question = self.rng, new_id(), new_id()
        words = self._words(4, 30)
        yield UserMessage(
            conversation_id=cid,
            at=self._at(),
            event_id=new_id(),
            message_id=question,
            content=words,
        )
        yield Started(
            conversation_id=cid,
            at=self._at(),
            event_id=new_id(),
            turn_id=turn,
            user_message_id=question,
            model="demo",
        )
        if first:
            yield Title(
                conversation_id=cid,
                at=self._at(),
                event_id=new_id(),
                title=words[:40],
                source="auto",
                turn_id=turn,
            )
        texts: dict[ChunkKind, list[str]] = {"thinking": [], "answer": []}

        def chunks(kind: ChunkKind, count: int) -> Iterator[Event]:
            for _ in range(count):
                # one to three tokens per event, as adaptive batching leaves them at ~50/s
                text = self._words(1, 3) + " "
                texts[kind].append(text)
                yield Chunk(
                    conversation_id=cid,
                    at=self._at(),
                    event_id=new_id(),
                    turn_id=turn,
                    kind=kind,
                    text=text,
                )

        yield from chunks("thinking", rng.randint(5, 30))
        if rng.random() < 0.3:
            call, a, b = f"call_{rng.randint(1, 9)}", rng.randint(1, 99), rng.randint(1, 99)
            yield ToolCall(
                conversation_id=cid,
                at=self._at(),
                event_id=new_id(),
                turn_id=turn,
                call_id=call,
                name="calculator",
                arguments=f'{{"expression": "{a}*{b}"}}',
            )
            yield ToolResult(
                conversation_id=cid,
                at=self._at(),
                event_id=new_id(),
                turn_id=turn,
                call_id=call,
                name="calculator",
                result=str(a * b),
                duration_ms=round(rng.uniform(0.05, 3.0), 3),
            )
        yield from chunks("answer", rng.randint(30, 130))
        content = [
            ContentBlock(role="thinking", content="".join(texts["thinking"])),
            ContentBlock(role="assistant", content="".join(texts["answer"])),
        ]
        input_tokens, output_tokens = len(words.split()) + 20, len(texts["answer"])
        if rng.random() < 0.05:
            yield Failed(
                conversation_id=cid,
                at=self._at(),
                event_id=new_id(),
                turn_id=turn,
                code="model_error",
                message="the model failed midway",
                content=content,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            )
        else:
            yield Done(
                conversation_id=cid,
                at=self._at(),
                event_id=new_id(),
                turn_id=turn,
                content=content,
                stop_reason="stop",
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            )


async def publish_log(js: JetStreamContext, events: Iterator[Event]) -> int:
    """Publish every event straight to CHAT_EVT as `EventLog.append` does, headers and all
    (readers parse them too), keeping a window of acks outstanding.

    The single-writer check needs each conversation's last sequence before the
    next append; with one publisher, sequences are handed out in publish order,
    so they are known in advance (a stray writer makes the check fail loudly).
    """
    head = int((await js.stream_info(EVT_STREAM)).state.last_seq)
    last: dict[str, int] = {}
    count = 0
    pending: list[asyncio.Future[api.PubAck]] = []
    for event in events:
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(last.get(event.conversation_id, 0)),
            "Nats-Msg-Id": event.event_id,
        }
        subject = event_subject(event.conversation_id)
        pending.append(
            await js.publish_async(subject, encode(event), stream=EVT_STREAM, headers=headers)
        )
        count += 1
        last[event.conversation_id] = head + count
        if len(pending) >= _PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return count


async def bench_rebuild(
    servers: Servers, events: int, *, rounds: int = 3, batch: int = 5000, workers: int = 2
) -> RebuildBenchResult:
    """Add `events` synthetic events to the log, then time `rounds` full rebuilds of it,
    each into a scratch schema of its own (dropped after)."""
    nc = await broker.connect(
        servers.nats_url, name="parley-bench-rebuild", reconnect_forever=False
    )
    try:
        js = nc.jetstream(publish_async_max_pending=_PUBLISH_WINDOW)
        await ensure_streams(js)
        began = time.perf_counter()
        published = await publish_log(js, make_log(events))
        publish_s = time.perf_counter() - began
    finally:
        await nc.close()
    reports: list[tuple[RebuildReport, float]] = []
    messages = 0
    load = os.getloadavg()[0]
    reader = await connect(
        servers.nats_url, name="parley-bench-rebuild-reader", reconnect_forever=False
    )
    try:
        for _ in range(rounds):
            schema = f"bench_rebuild_{new_id().lower()}"
            cpu = _cpu_s()
            try:
                report = await rebuild(
                    reader.jetstream(),
                    servers.database_url,
                    schema,
                    READ_MODELS,
                    nats_url=servers.nats_url,
                    workers=workers,
                    batch_max=batch,
                )
                reports.append((report, _cpu_s() - cpu))
                messages = await _count(servers.database_url, f'"{schema}".messages')
            finally:
                await drop_schema(servers.database_url, schema)
    finally:
        await reader.close()
    median, cpu_s = sorted(reports, key=lambda r: r[0].entries_per_s)[len(reports) // 2]
    return RebuildBenchResult(
        events=median.entries,
        turns=median.turns,
        chunks=median.counts.get("chunk", 0),
        rounds=len(reports),
        seconds=median.seconds,
        events_per_s=median.entries_per_s,
        turns_per_s=median.turns_per_s,
        events_per_s_min=min(r.entries_per_s for r, _ in reports),
        events_per_s_max=max(r.entries_per_s for r, _ in reports),
        build_s=median.build_s,
        swap_s=median.swap_s,
        published=published,
        publish_s=round(publish_s, 2),
        messages=messages,
        batch=batch,
        workers=workers,
        cpu_s=round(cpu_s, 2),
        events_per_cpu_s=round(median.entries / cpu_s, 1) if cpu_s else 0.0,
        load_avg_1m=round(load, 2),
    )


def _cpu_s() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def _count(database_url: str, table: str) -> int:
    db = await asyncpg.connect(database_url)
    try:
        return int(await db.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await db.close()


def run_rebuild_bench(args: argparse.Namespace, servers: Servers) -> int:
    workers = args.workers or default_workers()
    result = asyncio.run(
        bench_rebuild(
            servers,
            args.events or 1_000_000,
            rounds=max(1, args.rounds or 3),
            batch=args.batch,
            workers=workers,
        )
    )
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        print(
            f"rebuild: {result.events:,} log entries ({result.chunks:,} chunks, {result.turns:,}"
            f" turns) in {result.seconds:.2f} s (median of {result.rounds} rounds)\n"
            f"  {result.events_per_s:,.0f} events/s (rounds: {result.events_per_s_min:,.0f}"
            f" to {result.events_per_s_max:,.0f})   {result.turns_per_s:,.0f} turns/s"
            f"   (build {result.build_s:.2f} s, swap {result.swap_s:.3f} s,"
            f" batch {result.batch}, {result.workers} reader processes)\n"
            f"  log: {result.published:,} synthetic events published in {result.publish_s:.1f} s;"
            f" {result.messages:,} message rows written\n"
            f"  parley's CPU: {result.cpu_s:.1f} s ({result.events_per_cpu_s:,.0f} events per"
            f" CPU-second); load average before: {result.load_avg_1m}"
        )
    return 0
