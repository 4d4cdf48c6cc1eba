"""`parley bench capacity|stream|burst`: parley in its own processes, measured against the direct path.

The demo model, the direct path and the load generator each run in a process
of their own (parley.bench_procs), parley in the `dev` topology (one process)
and the `split` one (edge, worker and projector processes). For every step the
same load goes through parley, then straight through the direct path, in one
run, so both see the same noise of this shared machine; with `--rounds` each is
repeated and the medians reported. "Added" figures are parley's percentile
minus the direct path's.

- capacity: 100, 250, 500, 1,000 turns at once at 20 tokens/s (150 tokens each,
  one viewer each, a new turn as soon as one ends); per step delivered/offered,
  errors, time to first token and per-token latency (p50, p99, p99.9), CPU and
  memory of every process, events/s into JetStream.
- stream: C conversations, N tokens each at full model speed, one turn each.
- burst: C turns starting within `--window` seconds (10 tokens at 50 tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats

from api.auth import mint
from events.log import EventLog
from events.subjects import EVT_STREAM
from events.vocabulary import Chunk, Started, UserMessage
from parley.bench_common import percentile
from parley.bench_load import Job, Outcome
from parley.bench_load import _process as load_process
from parley.bench_procs import (
    TOPOLOGIES,
    Watched,
    _direct_process,
    _model_process,
    cpu_seconds,
    helper,
    machine,
    parley,
    parley_env,
    receive,
    start_process,
    stop_process,
    usage,
)
from parley.config import load_settings
from parley.services import Servers, resolve_servers
from parley.stack import EmbeddedStack

SECRET = "bench-" + "s" * 40
_OUTCOME_KEYS = [
    "turns",
    "errors",
    "offered_tokens_per_s",
    "delivered_tokens_per_s",
    "delivered_ratio",
    "tokens_per_s",
    "tokens_per_event",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "ttft_p999_ms",
    "token_p50_ms",
    "token_p99_ms",
    "token_p999_ms",
    "late_windows",
    "windows",
]


class Setup(msgspec.Struct):
    workload: str
    steps: list[int]
    tokens: int
    rate: float
    warm_s: float
    measure_s: float
    stagger_s: float
    once: bool
    rounds: int
    topologies: list[str]


def setup_of(args: argparse.Namespace) -> Setup:
    topologies = list(TOPOLOGIES) if args.topology == "both" else [args.topology]
    if args.workload == "capacity":
        steps = [int(s) for s in args.steps.split(",")] if args.steps else [100, 250, 500, 1000]
        tokens = args.tokens or 150
        rate = args.rate or 20.0
        turn_s = tokens / rate
        return Setup(
            "capacity",
            steps,
            tokens,
            rate,
            warm_s=turn_s + 1,  # every slot started and past its first turn's start
            measure_s=args.seconds,
            stagger_s=turn_s,
            once=False,
            rounds=args.rounds or 1,
            topologies=topologies,
        )
    if args.workload == "burst":
        return Setup(
            "burst",
            [args.conversations or 100],
            10,
            50.0,
            warm_s=0,
            measure_s=0,
            stagger_s=args.window,
            once=True,
            rounds=args.rounds or 3,
            topologies=topologies,
        )
    return Setup(
        "stream",
        [args.conversations or 20],
        args.tokens or 500,
        args.rate,
        warm_s=0,
        measure_s=0,
        stagger_s=0,
        once=True,
        rounds=args.rounds or 3,
        topologies=topologies,
    )


@contextlib.contextmanager
def servers_for(args: argparse.Namespace, watched: Watched) -> Iterator[Servers]:
    settings = load_settings(getattr(args, "data", None))
    if not settings.embedded:
        yield resolve_servers(settings)
        return
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-") as folder,
        EmbeddedStack(Path(folder) / "stack") as stack,
    ):
        for name, pid in stack.pids.items():
            watched.add(name, pid, tree=name == "postgres")
        yield stack.urls


def run_system(args: argparse.Namespace) -> list[dict[str, Any]]:
    setup = setup_of(args)
    watched = Watched()
    rows: list[dict[str, Any]] = []
    with (
        servers_for(args, watched) as servers,
        tempfile.TemporaryDirectory(prefix="parley-bench-run-") as scratch,
        helper("model", _model_process, (), watched) as model_url,
        helper("direct", _direct_process, (model_url,), watched) as direct_url,
    ):
        for topology in setup.topologies:
            schema = f"bench_{topology}_{int(time.time())}"
            env = parley_env(servers, model_url, SECRET, schema)
            with parley(topology, env, Path(scratch) / topology, watched) as system:
                warm = msgspec.structs.replace(
                    _job(setup, "parley", system.edge_url, model_url, 4, f"{topology}-warm"),
                    once=True,
                    tokens=20,
                    rate=0,
                )
                asyncio.run(_measure(warm, watched, servers))
                for step in setup.steps:
                    rounds = []
                    for r in range(setup.rounds):
                        tag = f"{topology}-{step}-{r}"
                        mine = _job(setup, "parley", system.edge_url, model_url, step, tag)
                        direct = _job(setup, "direct", direct_url, model_url, step, tag + "-d")
                        rounds.append(
                            (
                                asyncio.run(_measure(mine, watched, servers)),
                                asyncio.run(_measure(direct, watched, servers)),
                            )
                        )
                    rows.append(_row(setup, topology, step, rounds))
    return rows


def _job(setup: Setup, path: str, url: str, model_url: str, step: int, tag: str) -> Job:
    return Job(
        path="parley" if path == "parley" else "direct",
        url=url,
        token=mint(SECRET, "bench"),
        model_url=model_url,
        concurrency=step,
        tokens=setup.tokens,
        rate=setup.rate,
        warm_s=setup.warm_s,
        measure_s=setup.measure_s,
        stagger_s=setup.stagger_s,
        tag=tag,
        once=setup.once,
    )


class Measured(msgspec.Struct):
    outcome: Outcome
    usage: dict[str, float]
    events_per_s: float
    stages: dict[str, float] = {}  # p50 and p99 ms of each stage of time to first token
    cpu_s: dict[str, float] = {}  # CPU seconds of each process over the window
    log_bytes: int = 0  # what the log grew by over the window (JetStream's count)


# Where a turn's time to first token goes, read back from its conversation's log
# (wall-clock `at` of its events against the load generator's wall clock), for
# every measured turn: under `capacity`, several turns a conversation.
STAGES = ("to_user_message", "to_started", "to_first_chunk", "to_viewer")
STAGE_LABELS = ("user_message", "started", "first chunk", "viewer")


async def _stages(js: Any, starts: list[tuple[str, int, int]]) -> dict[str, float]:
    event_log = EventLog(js)
    spans: dict[str, list[float]] = {name: [] for name in STAGES}
    turns: dict[str, list[tuple[int, int]]] = {}
    for conversation, sent, first in starts:
        turns.setdefault(conversation, []).append((sent, first))
    for conversation, sent_first in turns.items():
        events = [stored.event for stored in await event_log.read(conversation)]
        for sent, first in sent_first:
            marks = turn_marks(events, sent)
            if marks is None:
                continue
            points = [sent, *marks, first]
            for name, (a, b) in zip(STAGES, itertools.pairwise(points), strict=True):
                spans[name].append((b - a) / 1e6)
    found: dict[str, float] = {}
    for name, values in spans.items():
        if values:
            found[f"stage_{name}_p50_ms"] = round(statistics.median(values), 2)
            found[f"stage_{name}_p99_ms"] = round(percentile(values, 99), 2)
    return found


def turn_marks(events: Iterable[object], sent: int) -> tuple[int, int, int] | None:
    """The wall-clock `at` of the `user_message`, `started` and first `chunk` of the
    turn whose request was sent at `sent`: the first user message stamped after
    it, and what follows it in the log. None if the log lacks any of them."""
    marks: list[int] = []
    for event in events:
        if (not marks and isinstance(event, UserMessage) and event.at >= sent) or (
            len(marks) == 1 and isinstance(event, Started)
        ):
            marks.append(event.at)
        elif len(marks) == 2 and isinstance(event, Chunk):
            return marks[0], marks[1], event.at
    return None


async def _measure(job: Job, watched: Watched, servers: Servers) -> Measured:
    """Run one job in a load process; sample every process over its window."""
    nc = await nats.connect(servers.nats_url)
    js = nc.jetstream()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=load_process, args=(msgspec.json.encode(job), child), daemon=True)
    start_process(proc, child)
    watched.add("load", proc.pid or 0)
    try:
        started = await receive(parent, proc, "load")
        assert started == "started", started
        if not job.once:
            await asyncio.sleep(job.warm_s)
        began = time.monotonic()
        before, (seq_before, bytes_before) = watched.sample(), await _log_end(js)
        if not job.once:
            await asyncio.sleep(job.measure_s)
            after, (seq_after, bytes_after), ended = await _window_end(watched, js)
        status, payload = await receive(parent, proc, "load")
        if job.once:
            after, (seq_after, bytes_after), ended = await _window_end(watched, js)
        if status != "ok":
            raise RuntimeError(f"the load process failed: {payload}")
        outcome = msgspec.json.decode(payload, type=Outcome)
        stages = await _stages(js, outcome.starts) if outcome.starts else {}
    except BaseException:
        proc.terminate()  # interrupted, or the load failed: its turns are not waited for
        raise
    finally:
        watched.remove("load")
        stop_process(proc)
        await nc.close()
    seconds = ended - began
    events = (seq_after - seq_before) / seconds if job.path == "parley" and seconds else 0.0
    return Measured(
        outcome,
        usage(before, after, seconds),
        round(events, 1),
        stages,
        cpu_seconds(before, after),
        bytes_after - bytes_before if job.path == "parley" else 0,
    )


async def _window_end(
    watched: Watched, js: Any
) -> tuple[dict[str, tuple[int, int]], tuple[int, int], float]:
    """What a measured window ends with: every process's sample, the log's end, the time."""
    return watched.sample(), await _log_end(js), time.monotonic()


async def _log_end(js: Any) -> tuple[int, int]:
    """The log's last position and the bytes it holds."""
    info = await js.stream_info(EVT_STREAM)
    return int(info.state.last_seq), int(info.state.bytes)


def _row(
    setup: Setup, topology: str, step: int, rounds: list[tuple[Measured, Measured]]
) -> dict[str, Any]:
    """One flat object: medians over rounds of parley's figures, the direct path's, the added."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3 if max(values, default=0) < 10 else 2)

    row: dict[str, Any] = {
        "workload": setup.workload,
        "topology": topology,
        "concurrency": step,
        "tokens_per_turn": setup.tokens,
        "rate": setup.rate,
        "rounds": len(rounds),
        "measure_s": setup.measure_s,
    }
    for key in _OUTCOME_KEYS:
        mine = [float(getattr(m.outcome, key)) for m, _ in rounds]
        direct = [float(getattr(d.outcome, key)) for _, d in rounds]
        if key == "errors":
            # every failed turn of every round, never a median that hides a bad round
            row[key] = int(sum(mine))
            row[f"direct_{key}"] = int(sum(direct))
            continue
        row[key] = med(mine)
        row[f"direct_{key}"] = med(direct)
        if key.startswith(("ttft_p", "token_p")):
            row[f"added_{key}"] = med([a - b for a, b in zip(mine, direct, strict=True)])
    row["ratio"] = med(
        [
            m.outcome.tokens_per_s / d.outcome.tokens_per_s if d.outcome.tokens_per_s else 0.0
            for m, d in rounds
        ]
    )
    row["events_per_s"] = med([m.events_per_s for m, _ in rounds])
    for key in rounds[0][0].stages:
        row[key] = med([m.stages.get(key, 0.0) for m, _ in rounds])
    for key in rounds[0][0].usage:
        row[key] = med([m.usage.get(key, 0.0) for m, _ in rounds])
    row["cpu_parley"] = round(sum(v for k, v in row.items() if k.startswith("cpu_parley_")), 2)
    # CPU per delivered token, what the shared machine's noise moves least: the CPU
    # seconds of the window over the tokens delivered in it, per round. (A job run
    # once is sampled over more than its run: its CPU share over the window, divided
    # by its tokens over its run, read 1.5-2x too low.)
    row["parley_cpu_us_per_token"] = med([us_per_token(setup, m, "parley_") for m, _ in rounds])
    row["nats_cpu_us_per_token"] = med([us_per_token(setup, m, "nats") for m, _ in rounds])
    # what the log keeps per token (JetStream's bytes: entries, headers, subjects)
    row["log_bytes_per_token"] = med(
        [m.log_bytes / t if (t := tokens_in(setup, m)) else 0.0 for m, _ in rounds]
    )
    row["direct_cpu_direct"] = med([d.usage.get("cpu_direct", 0.0) for _, d in rounds])
    row["error_sample"] = next((m.outcome.error_sample for m, _ in rounds if m.outcome.errors), "")
    row.update({f"machine_{k}": v for k, v in msgspec.structs.asdict(machine()).items()})
    return row


def tokens_in(setup: Setup, measured: Measured) -> float:
    """The tokens delivered within a round's measured window."""
    outcome = measured.outcome
    if setup.once:  # every token of the job, all inside the window
        return outcome.tokens_per_s * outcome.elapsed_s
    return outcome.delivered_tokens_per_s * setup.measure_s


def us_per_token(setup: Setup, measured: Measured, prefix: str) -> float:
    """Microseconds of CPU the processes named `prefix...` spent per token delivered."""
    tokens = tokens_in(setup, measured)
    spent = sum(v for k, v in measured.cpu_s.items() if k.startswith(prefix))
    return round(spent / tokens * 1e6, 1) if tokens else 0.0


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no results"
    first = rows[0]
    lines = [
        f"{first['workload']}: {first['tokens_per_turn']} tokens per turn at "
        f"{first['rate'] or 'full'} tokens/s, {first['rounds']} round(s), medians; "
        f"machine: {first['machine_nproc']} cores, load {first['machine_load_1m']}, "
        f"{first['machine_loop']}",
        f"{'topology':<8} {'turns':>6} {'errors':>6} {'deliv/off':>9} {'tok/s':>9} "
        f"{'direct':>9} {'ttft p50/p99':>14} {'added':>14} {'token p50/p99/p99.9':>21} "
        f"{'added p99/p99.9':>16} {'evt/s':>7}  cpu",
    ]
    for r in rows:
        cpu = " ".join(
            f"{k[4:]}={r[k]}" for k in r if k.startswith("cpu_") and k not in ("cpu_load",)
        )
        lines.append(
            f"{r['topology']:<8} {r['concurrency']:>6} {r['errors']:>6} "
            f"{r['delivered_ratio']:>4}/{r['direct_delivered_ratio']:<4} "
            f"{r['tokens_per_s']:>9} {r['direct_tokens_per_s']:>9} "
            f"{r['ttft_p50_ms']:>6}/{r['ttft_p99_ms']:<7} "
            f"{r['added_ttft_p50_ms']:>6}/{r['added_ttft_p99_ms']:<7} "
            f"{r['token_p50_ms']:>6}/{r['token_p99_ms']}/{r['token_p999_ms']:<7} "
            f"{r['added_token_p99_ms']:>7}/{r['added_token_p999_ms']:<8} "
            f"{r['events_per_s']:>7}  {cpu} load={r['cpu_load']}"
            f"  parley CPU/token {r['parley_cpu_us_per_token']} us"
            f"  log {r.get('log_bytes_per_token', 0.0):.0f} B/token"
        )
        if "stage_to_viewer_p50_ms" in r:
            spans = ", ".join(
                f"-> {label} {r[f'stage_{name}_p50_ms']}/{r.get(f'stage_{name}_p99_ms', '-')}"
                for name, label in zip(STAGES, STAGE_LABELS, strict=True)
            )
            lines.append(f"         time to first token, p50/p99 ms per stage: request {spans}")
        if r.get("windows"):
            lines.append(
                f"         tokens later than the p99: half of them in {r['late_windows']:g} of "
                f"{r['windows']:g} tenths of a second (direct: {r['direct_late_windows']:g} "
                f"of {r['direct_windows']:g})"
            )
        if r["error_sample"]:
            lines.append(f"         first error: {r['error_sample']}")
    return "\n".join(lines)
