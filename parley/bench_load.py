"""The load generator of the production-like benchmarks, run in a process of its own.

A `Job` keeps `concurrency` turns going, one SSE viewer each: each slot sends a
message, reads its turn's stream to `done`, and starts the next turn as soon as
the last one ended, until the job's time is up (`once`: a single turn per
slot). Slots start spread over `stagger_s`, so a steady state is reached
rather than one thundering start (a burst asks for that on purpose).

It measures, per turn, the time from the request to the first token at the
viewer and, per token, the time from the model writing it (the demo model's
`[[bench=KEY]]` log, collected from the model process afterwards) to the
viewer reading it. Only turns that start inside the measurement window count;
"delivered" is the tokens viewers read inside the window, per second.

Parsing is deliberately cheap (byte searches, no JSON): this process has to
keep up with every viewer at once, or it would measure itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Literal

import aiohttp
import msgspec

_TOKEN = b'"event":"token","data":"'
_DONE = b'"event":"done","data":"'
_ERROR = b'"event":"error","data":"'
_SETUP_PARALLEL = 50
_KEYS_PER_FETCH = 1000
_TURN_LIMIT_S = 60.0  # plus four times the turn's paced length


class Job(msgspec.Struct, frozen=True):
    path: Literal["parley", "direct"]
    url: str  # the edge's base URL, or the direct server's
    token: str
    model_url: str  # where the model's send times are collected
    concurrency: int
    tokens: int
    rate: float  # tokens/s per stream ([[rate=R]]); 0 = full speed
    warm_s: float  # turns starting before this are not measured
    measure_s: float
    stagger_s: float
    tag: str
    once: bool = False  # one turn per slot, all measured (stream, burst)


class Outcome(msgspec.Struct):
    """One job's figures; latencies in ms. `added_*` are filled in by the caller."""

    path: str
    concurrency: int
    turns: int  # measured turns
    errors: int  # turns of the whole job that did not end with done: ok
    error_sample: str
    offered_tokens_per_s: float
    delivered_tokens_per_s: float
    delivered_ratio: float
    tokens_per_s: float  # (once) every token of the job over its wall time
    tokens_per_event: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_p999_ms: float
    token_p50_ms: float
    token_p99_ms: float
    token_p999_ms: float
    # the fewest windows of `LATE_WINDOW_NS` holding half the tokens over the p99, of
    # `windows` (see `late_windows`)
    late_windows: int
    windows: int
    elapsed_s: float
    # parley's measured turns: (conversation, request sent, first token read),
    # wall clock, for the stages of time to first token
    starts: list[tuple[str, int, int]] = []


class _Turn:
    __slots__ = (
        "arrivals",
        "began",
        "began_wall",
        "conversation",
        "events",
        "first",
        "first_wall",
        "key",
        "status",
    )

    def __init__(self, key: str, began: int, conversation: str = "") -> None:
        self.key = key
        self.began = began
        self.conversation = conversation
        # wall-clock stamps too: the log's events carry wall-clock `at`
        self.began_wall = time.time_ns()
        self.first_wall = 0
        self.first = 0
        self.arrivals: list[int] = []  # arrival ns of token i at index i (tokens in order)
        self.events = 0
        self.status = ""


# The tokens of a run later than its p99 are counted in windows of this length by
# when the model sent them. The fewer windows hold half of them, the more the tail is
# a few stretches in which every stream was late at once (the machine behind), not
# single tokens late here and there (README: "Benchmark log", "When tokens are late").
LATE_WINDOW_NS = 100_000_000


def late_windows(tokens: list[tuple[int, float]], p99_ms: float) -> tuple[int, int]:
    """Given each token's (send time ns, latency ms): the fewest `LATE_WINDOW_NS` windows
    that hold half the tokens later than `p99_ms`, and how many windows had any token."""
    if not tokens:
        return 0, 0
    start = min(sent for sent, _ in tokens)
    windows: set[int] = set()
    late: Counter[int] = Counter()
    for sent, latency in tokens:
        window = (sent - start) // LATE_WINDOW_NS
        windows.add(window)
        if latency > p99_ms:
            late[window] += 1
    half, held = sum(late.values()) / 2, 0
    for taken, (_, count) in enumerate(late.most_common(), start=1):
        held += count
        if held >= half:
            return taken, len(windows)
    return 0, len(windows)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 2)


async def _read(response: aiohttp.ClientResponse, turn: _Turn) -> None:
    buffer = b""
    async for chunk in response.content.iter_any():
        now = time.perf_counter_ns()
        buffer += chunk
        if b"\n\n" not in buffer:
            continue
        *frames, buffer = buffer.split(b"\n\n")
        for raw in frames:
            start = raw.find(_TOKEN)
            if start >= 0:
                start += len(_TOKEN)
                text = raw[start : raw.index(b'"', start)]
                words = len(text.split())
                turn.events += 1
                if not turn.first:
                    turn.first, turn.first_wall = now, time.time_ns()
                turn.arrivals.extend([now] * words)
                continue
            start = raw.find(_DONE)
            if start >= 0:
                start += len(_DONE)
                turn.status = turn.status or raw[start : raw.index(b'"', start)].decode()
                # read to the response's end, as a browser does: its connection
                # then serves the slot's next turn rather than being closed
                async for _ in response.content.iter_any():
                    pass
                return
            start = raw.find(_ERROR)
            if start >= 0:
                turn.status = "error: " + raw[start + len(_ERROR) :][:200].decode(errors="replace")
    turn.status = turn.status or "stream ended before done"


async def _turn(
    http: aiohttp.ClientSession, job: Job, target: str, key: str, headers: dict[str, str]
) -> _Turn:
    content = f"bench [[tokens={job.tokens}]] [[rate={job.rate:g}]] [[bench={key}]]"
    conversation = target.rsplit("/", 2)[-2] if job.path == "parley" else ""
    turn = _Turn(key, time.perf_counter_ns(), conversation)
    # A turn that never ends is an error to count, not a reason for the bench to hang.
    limit_s = _TURN_LIMIT_S + (4 * job.tokens / job.rate if job.rate else 0.0)
    try:
        async with asyncio.timeout(limit_s):
            async with http.post(target, json={"content": content}, headers=headers) as response:
                if response.status != 200:
                    turn.status = f"http {response.status}: {(await response.text())[:200]}"
                    return turn
                await _read(response, turn)
    except TimeoutError:
        turn.status = f"no done within {limit_s:.0f} s"
    except (aiohttp.ClientError, ConnectionError) as err:
        turn.status = f"{type(err).__name__}: {err}"
    return turn


async def _conversations(http: aiohttp.ClientSession, job: Job, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {job.token}"}
    gate = asyncio.Semaphore(_SETUP_PARALLEL)

    async def one() -> str:
        async with gate, http.post(f"{job.url}/v1/conversations", json={}, headers=headers) as r:
            r.raise_for_status()
            cid: str = (await r.json())["id"]
            return cid

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def run(job: Job, started: Connection | None = None) -> Outcome:
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
    )
    async with http:
        if job.path == "parley":
            cids = await _conversations(http, job, job.concurrency)
            targets = [f"{job.url}/v1/conversations/{cid}/messages" for cid in cids]
            headers = {
                "Authorization": f"Bearer {job.token}",
                "Accept": "text/event-stream",
            }
        else:
            targets = [f"{job.url}/direct"] * job.concurrency
            headers = {}
        turns: list[_Turn] = []
        t0 = time.perf_counter_ns()
        if started is not None:
            started.send("started")
        end = t0 + int((job.warm_s + job.measure_s) * 1e9)

        async def slot(i: int, offset: float) -> None:
            await asyncio.sleep(offset)
            k = 0
            while True:
                turn = await _turn(http, job, targets[i], f"{job.tag}-{i}-{k}", headers)
                turns.append(turn)
                k += 1
                if job.once or time.perf_counter_ns() >= end:
                    return
                if turn.status != "ok":
                    await asyncio.sleep(0.5)  # an error: do not spin on it

        offsets = [random.uniform(0, job.stagger_s) for _ in range(job.concurrency)]
        await asyncio.gather(*(slot(i, o) for i, o in enumerate(offsets)))
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        emitted = await _emitted(http, job.model_url, [t.key for t in turns])
    return summarise(job, turns, emitted, t0, elapsed)


async def _emitted(
    http: aiohttp.ClientSession, model_url: str, keys: list[str]
) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in range(0, len(keys), _KEYS_PER_FETCH):
        async with http.post(
            f"{model_url}/demo/bench", json={"keys": keys[i : i + _KEYS_PER_FETCH]}
        ) as response:
            out.update(msgspec.json.decode(await response.read(), type=dict[str, list[int]]))
    return out


def summarise(
    job: Job, turns: list[_Turn], emitted: dict[str, list[int]], t0: int, elapsed: float
) -> Outcome:
    window_start = t0 + int(job.warm_s * 1e9)
    window_end = window_start + int(job.measure_s * 1e9)
    measured = [t for t in turns if job.once or window_start <= t.began < window_end]
    errors = [t for t in turns if t.status != "ok"]
    ttft = sorted((t.first - t.began) / 1e6 for t in measured if t.first)
    tokens: list[tuple[int, float]] = []  # (sent ns, latency ms)
    for t in measured:
        sent = emitted.get(t.key, [])
        tokens.extend(
            (sent[i], (at - sent[i]) / 1e6) for i, at in enumerate(t.arrivals[: len(sent)])
        )
    latencies = sorted(latency for _, latency in tokens)
    token_p99_ms = percentile(latencies, 99)
    late, windows = late_windows(tokens, token_p99_ms)
    if job.once:
        delivered = sum(len(t.arrivals) for t in turns) / elapsed
        offered = job.concurrency * job.rate if job.rate else delivered
    else:
        in_window = sum(1 for t in turns for at in t.arrivals if window_start <= at < window_end)
        delivered = in_window / job.measure_s
        offered = job.concurrency * job.rate
    events = sum(t.events for t in measured)
    return Outcome(
        path=job.path,
        concurrency=job.concurrency,
        turns=len(measured),
        errors=len(errors),
        error_sample=errors[0].status if errors else "",
        offered_tokens_per_s=round(offered, 1),
        delivered_tokens_per_s=round(delivered, 1),
        delivered_ratio=round(delivered / offered, 3) if offered else 0.0,
        tokens_per_s=round(sum(len(t.arrivals) for t in turns) / elapsed, 1),
        tokens_per_event=round(sum(len(t.arrivals) for t in measured) / events, 2)
        if events
        else 0.0,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        ttft_p999_ms=percentile(ttft, 99.9),
        token_p50_ms=percentile(latencies, 50),
        token_p99_ms=token_p99_ms,
        token_p999_ms=percentile(latencies, 99.9),
        late_windows=late,
        windows=windows,
        elapsed_s=round(elapsed, 2),
        starts=[
            (t.conversation, t.began_wall, t.first_wall)
            for t in measured
            if t.conversation and t.first_wall
        ],
    )


def _process(raw: bytes, conn: Connection) -> None:
    from parley.bench_procs import run_async

    _raise_fd_limit()
    job = msgspec.json.decode(raw, type=Job)
    try:
        outcome = run_async(lambda: run(job, conn))
    except Exception as err:
        conn.send(("error", repr(err)))
        raise
    conn.send(("ok", msgspec.json.encode(outcome)))


def _raise_fd_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
