"""`parley bench WORKLOAD`: `stream` and `fanout` here, `cancel` and `burst` in
parley/bench_actor.py, `soak` in parley/bench_soak.py, `rebuild` in parley/bench_rebuild.py.

`parley bench stream`: token streaming through the broker, against a direct path.

C conversations each stream N tokens from the demo model at full speed, with
one SSE viewer each, through the whole system (edge -> CHAT_CMD -> actor ->
CHAT_EVT -> edge -> viewer). The same workload then goes through a direct
in-process path (model stream straight to SSE, no broker, no log). Rounds
alternate between the two so both see the same machine noise; the report gives
medians across rounds and the ratio of the two throughputs.

Timing: the demo model records when it writes each answer token
(`[[bench=KEY]]`), the viewer when it reads it; both clocks are this process's
`perf_counter_ns`, so "added latency" is model write -> viewer read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from actors.model_client import ChatRequest, ModelEndpoint, stream_chat
from actors.model_stream import TextDelta
from api.auth import mint
from api.config import EdgeLimits
from api.sse import Envelope, frame
from parley.config import load_catalog, load_settings
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services, resolve_servers
from parley.stack import EmbeddedStack

SECRET = "bench-" + "s" * 40
# One bench user sends what a crowd of users would: per-user limits are off here.
NO_LIMITS = EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0)


class Turn(msgspec.Struct):
    ttft_ms: float
    added_ms: list[float]
    tokens: int
    events: int


class Result(msgspec.Struct):
    conversations: int
    tokens_per_conversation: int
    model_rate: float  # tokens/s per stream from the demo model; 0 = as fast as it can
    rounds: int
    tokens_per_s: float
    direct_tokens_per_s: float
    ratio: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    direct_ttft_p50_ms: float
    direct_ttft_p99_ms: float
    direct_added_p50_ms: float
    direct_added_p99_ms: float
    tokens_per_event: float  # how many tokens an SSE event carried on average (adaptive batching)
    rounds_tokens_per_s: list[float]
    rounds_direct_tokens_per_s: list[float]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def read_turn(response: aiohttp.ClientResponse, began: int, emitted: list[int]) -> Turn:
    """Read one turn's SSE stream; time each token against when the model wrote it."""
    first: int | None = None
    added: list[float] = []
    tokens = events = 0
    buffer = b""
    async for chunk in response.content.iter_any():
        now = time.perf_counter_ns()
        buffer += chunk
        *frames, buffer = buffer.split(b"\n\n")
        for raw in frames:
            data = next((line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")), None)
            if data is None:
                continue
            envelope = json.loads(data)
            if envelope["event"] == "done":
                return Turn(
                    ttft_ms=((first or now) - began) / 1e6,
                    added_ms=added,
                    tokens=tokens,
                    events=events,
                )
            if envelope["event"] != "token":
                continue
            events += 1
            first = first or now
            for word in envelope["data"].split():
                index = int(word)
                tokens += 1
                if index < len(emitted):
                    added.append((now - emitted[index]) / 1e6)
    raise RuntimeError("stream ended before done")


# ---------------------------------------------------------------- the two paths


async def broker_round(
    http: aiohttp.ClientSession,
    edge: str,
    token: str,
    emit_log: dict[str, list[int]],
    c: int,
    n: int,
    tag: str,
) -> tuple[float, list[Turn]]:
    headers = {"Authorization": f"Bearer {token}"}
    conversations = []
    for _ in range(c):
        async with http.post(f"{edge}/v1/conversations", json={}, headers=headers) as response:
            conversations.append((await response.json())["id"])

    async def one(i: int, cid: str) -> Turn:
        key = f"{tag}-{i}"
        emit_log[key] = []
        began = time.perf_counter_ns()
        async with http.post(
            f"{edge}/v1/conversations/{cid}/messages",
            json={"content": f"bench [[tokens={n}]] [[bench={key}]]"},
            headers={**headers, "Accept": "text/event-stream"},
        ) as response:
            return await read_turn(response, began, emit_log[key])

    return await _timed(one(i, cid) for i, cid in enumerate(conversations))


async def direct_round(
    http: aiohttp.ClientSession,
    direct: str,
    emit_log: dict[str, list[int]],
    c: int,
    n: int,
    tag: str,
) -> tuple[float, list[Turn]]:
    async def one(i: int) -> Turn:
        key = f"{tag}-{i}"
        emit_log[key] = []
        began = time.perf_counter_ns()
        async with http.post(
            f"{direct}/direct", json={"content": f"bench [[tokens={n}]] [[bench={key}]]"}
        ) as response:
            return await read_turn(response, began, emit_log[key])

    return await _timed(one(i) for i in range(c))


async def _timed(turns: Any) -> tuple[float, list[Turn]]:
    began = time.perf_counter()
    results = await asyncio.gather(*turns)
    elapsed = time.perf_counter() - began
    return sum(t.tokens for t in results) / elapsed, list(results)


DIRECT_SESSION = web.AppKey("session", aiohttp.ClientSession)
DIRECT_MODEL = web.AppKey("model", str)


async def _direct_handler(request: web.Request) -> web.StreamResponse:
    """The baseline: the model's stream written straight to SSE, nothing in between."""
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    endpoint = ModelEndpoint(base_url=request.app[DIRECT_MODEL], model="demo")
    seq = 0
    async for item in stream_chat(
        request.app[DIRECT_SESSION],
        endpoint,
        ChatRequest(messages=[{"role": "user", "content": body["content"]}]),
    ):
        if isinstance(item, TextDelta):
            seq += 1
            name = "token" if item.kind == "answer" else "thinking"
            await response.write(frame(str(seq), Envelope(name, item.text)))
    await response.write(frame(str(seq + 1), Envelope("done", "ok")))
    return response


@contextlib.asynccontextmanager
async def direct_server(model_url: str) -> AsyncIterator[str]:
    app = web.Application()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app[DIRECT_SESSION] = session
    app[DIRECT_MODEL] = model_url
    app.router.add_post("/direct", _direct_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await session.close()


# ---------------------------------------------------------------- the run


async def run_stream(servers: Servers, c: int, n: int, rounds: int, rate: float = 0.0) -> Result:
    settings = load_settings()
    emit_log: dict[str, list[int]] = {}
    runner, model_url = await start_demo_model(
        "127.0.0.1", 0, DemoConfig(tokens_per_s=rate, think=False), emit_log
    )
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=load_catalog(settings),
        model_base_url=model_url,
        db_schema=f"bench_{int(time.time())}",
        port=0,
        limits=NO_LIMITS,
    )
    try:
        async with Services(servers, options) as services, direct_server(model_url) as direct:
            http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
            )
            async with http:
                token = mint(SECRET, "bench")
                # warm-up: connections, JIT-free but cache-cold paths, consumer creation
                await broker_round(http, services.edge_url, token, emit_log, min(c, 4), 20, "warm")
                await direct_round(http, direct, emit_log, min(c, 4), 20, "warm-d")
                broker: list[tuple[float, list[Turn]]] = []
                plain: list[tuple[float, list[Turn]]] = []
                for r in range(rounds):
                    broker.append(
                        await broker_round(http, services.edge_url, token, emit_log, c, n, f"b{r}")
                    )
                    plain.append(await direct_round(http, direct, emit_log, c, n, f"d{r}"))
    finally:
        await runner.cleanup()
    return summarise(c, n, rate, broker, plain)


def summarise(
    c: int,
    n: int,
    rate: float,
    broker: list[tuple[float, list[Turn]]],
    plain: list[tuple[float, list[Turn]]],
) -> Result:
    def flat(rounds: list[tuple[float, list[Turn]]], field: str) -> list[float]:
        out: list[float] = []
        for _, turns in rounds:
            for turn in turns:
                value = getattr(turn, field)
                out.extend(value if isinstance(value, list) else [value])
        return out

    tps = statistics.median(r[0] for r in broker)
    direct_tps = statistics.median(r[0] for r in plain)
    ttft, added = flat(broker, "ttft_ms"), flat(broker, "added_ms")
    d_ttft, d_added = flat(plain, "ttft_ms"), flat(plain, "added_ms")
    tokens = sum(t.tokens for _, turns in broker for t in turns)
    events = sum(t.events for _, turns in broker for t in turns)
    return Result(
        conversations=c,
        tokens_per_conversation=n,
        model_rate=rate,
        rounds=len(broker),
        tokens_per_s=round(tps, 1),
        direct_tokens_per_s=round(direct_tps, 1),
        ratio=round(tps / direct_tps, 3),
        ttft_p50_ms=round(percentile(ttft, 50), 2),
        ttft_p99_ms=round(percentile(ttft, 99), 2),
        added_p50_ms=round(percentile(added, 50), 2),
        added_p99_ms=round(percentile(added, 99), 2),
        direct_ttft_p50_ms=round(percentile(d_ttft, 50), 2),
        direct_ttft_p99_ms=round(percentile(d_ttft, 99), 2),
        direct_added_p50_ms=round(percentile(d_added, 50), 2),
        direct_added_p99_ms=round(percentile(d_added, 99), 2),
        tokens_per_event=round(tokens / events, 2) if events else 0.0,
        rounds_tokens_per_s=[round(r[0], 1) for r in broker],
        rounds_direct_tokens_per_s=[round(r[0], 1) for r in plain],
    )


def run_bench(args: argparse.Namespace) -> int:
    """The workload named by `args.workload`, on the configured servers or a scratch stack."""
    if args.workload == "fanout":
        return run_fanout_bench(args)
    settings = load_settings(getattr(args, "data", None))
    with contextlib.ExitStack() as cleanup:
        if settings.embedded:
            # A scratch stack: a benchmark must not write into the dev data folder.
            folder = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="parley-bench-"))
            )
            servers = cleanup.enter_context(EmbeddedStack(folder)).urls
        else:
            servers = resolve_servers(settings)
        if args.workload == "rebuild":
            from parley.bench_rebuild import run_rebuild_bench

            return run_rebuild_bench(args, servers)
        text, result = asyncio.run(_workload(args, servers))
    print(msgspec.json.encode(result).decode() if args.json else text)
    return 1 if getattr(result, "problems", None) else 0


async def _workload(args: argparse.Namespace, servers: Servers) -> tuple[str, msgspec.Struct]:
    from parley import bench_actor

    if args.workload == "cancel":
        cancel = await bench_actor.run_cancel(servers, args.cancels, args.concurrency)
        return bench_actor.render_cancel(cancel), cancel
    if args.workload == "burst":
        burst = await bench_actor.run_burst(servers, args.conversations, args.window, args.rounds)
        return bench_actor.render_burst(burst), burst
    if args.workload == "soak":
        from parley import bench_soak

        soak = await bench_soak.run_soak(servers, args.minutes, args.users, args.viewers or 20)
        return bench_soak.render(soak), soak
    stream = await run_stream(servers, args.conversations, args.tokens, args.rounds, args.rate)
    return render(stream), stream


def render(r: Result) -> str:
    return "\n".join(
        [
            f"stream: {r.conversations} conversations x {r.tokens_per_conversation} tokens, "
            f"model rate {r.model_rate or 'unlimited'} tokens/s, {r.rounds} rounds (medians)",
            f"  through parley : {r.tokens_per_s:>10.1f} tokens/s   ttft p50 {r.ttft_p50_ms} ms"
            f" p99 {r.ttft_p99_ms} ms   added p50 {r.added_p50_ms} ms p99 {r.added_p99_ms} ms",
            f"  direct         : {r.direct_tokens_per_s:>10.1f} tokens/s   ttft p50 {r.direct_ttft_p50_ms} ms"
            f" p99 {r.direct_ttft_p99_ms} ms   added p50 {r.direct_added_p50_ms} ms p99 {r.direct_added_p99_ms} ms",
            f"  ratio (parley / direct): {r.ratio}   tokens per SSE event: {r.tokens_per_event}",
        ]
    )


# ---------------------------------------------------------------- fanout


class Fanout(msgspec.Struct):
    viewers: int
    tokens: int
    model_rate: float
    delivered: int  # token deliveries measured (viewers x tokens when none is lost)
    p50_ms: float
    p99_ms: float
    max_ms: float
    kb_per_idle_viewer: float  # the edge process's memory growth per connected, idle viewer


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _raise_fd_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_TOKEN = b'"event":"token","data":"'
_DONE = b'"event":"done"'


def _viewers_process(port: int, token: str, cid: str, n: int, conn: Any) -> None:
    """A separate process holding `n` SSE viewers: the edge's memory is measured alone."""
    _raise_fd_limit()
    asyncio.run(_viewers(port, token, cid, n, conn))


async def _viewers(port: int, token: str, cid: str, n: int, conn: Any) -> None:
    request = (
        f"GET /v1/conversations/{cid}/events HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    streams = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        streams.append((reader, writer))
    for reader, _ in streams:
        await reader.readuntil(b"retry: 1000\n\n")
    conn.send("ready")

    async def read(reader: asyncio.StreamReader) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        buffer = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return seen
            now = time.perf_counter_ns()  # CLOCK_MONOTONIC: the same clock in every process
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for raw in frames:
                # cheap on purpose: this process must keep up with every viewer
                start = raw.find(_TOKEN)
                if start >= 0:
                    text = raw[start + len(_TOKEN) : raw.index(b'"', start + len(_TOKEN))]
                    seen.extend((int(word), now) for word in text.split())
                elif _DONE in raw:
                    return seen

    results = await asyncio.gather(*(read(reader) for reader, _ in streams))
    conn.send([item for seen in results for item in seen])
    for _, writer in streams:
        writer.close()


async def run_fanout(servers: Servers, viewers: int, tokens: int, rate: float) -> Fanout:
    import gc
    import multiprocessing

    settings = load_settings()
    emit_log: dict[str, list[int]] = {}
    runner, model_url = await start_demo_model(
        "127.0.0.1", 0, DemoConfig(tokens_per_s=rate, think=False), emit_log
    )
    options = ServiceOptions(
        jwt_secret=SECRET,
        catalog=load_catalog(settings),
        model_base_url=model_url,
        db_schema=f"bench_{int(time.time())}",
        port=0,
        limits=NO_LIMITS,
    )
    try:
        async with Services(servers, options) as services:
            token = mint(SECRET, "bench")
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{services.edge_url}/v1/conversations", json={}, headers=headers
                ) as response:
                    cid = (await response.json())["id"]

                async def turn(content: str) -> None:
                    async with http.post(
                        f"{services.edge_url}/v1/conversations/{cid}/messages",
                        json={"content": content},
                        headers=headers,
                    ) as response:
                        assert response.status == 202, await response.text()

                port = int(services.edge_url.rsplit(":", 1)[1])
                await turn("warm-up [[tokens=5]]")
                gc.collect()
                # the warm-up's turn ends within a second at most; its viewers-to-be wait
                await asyncio.sleep(1.0)
                before = _rss_kb()
                parent, child = multiprocessing.get_context("spawn").Pipe()
                proc = multiprocessing.get_context("spawn").Process(
                    target=_viewers_process, args=(port, token, cid, viewers, child)
                )
                proc.start()
                loop = asyncio.get_running_loop()
                ready = await loop.run_in_executor(None, parent.recv)
                assert ready == "ready"
                gc.collect()
                after = _rss_kb()
                await turn(f"fan out [[tokens={tokens}]] [[bench=fanout]]")
                seen = await loop.run_in_executor(None, parent.recv)
                proc.join(30)
    finally:
        await runner.cleanup()
    emitted = emit_log.get("fanout", [])
    latencies = [(at - emitted[i]) / 1e6 for i, at in seen if i < len(emitted)]
    return Fanout(
        viewers=viewers,
        tokens=tokens,
        model_rate=rate,
        delivered=len(latencies),
        p50_ms=round(percentile(latencies, 50), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        max_ms=round(max(latencies, default=float("nan")), 2),
        kb_per_idle_viewer=round((after - before) / viewers, 1),
    )


def run_fanout_bench(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    settings = load_settings(getattr(args, "data", None))
    with contextlib.ExitStack() as cleanup:
        if settings.embedded:
            folder = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="parley-bench-"))
            )
            servers = cleanup.enter_context(EmbeddedStack(folder)).urls
        else:
            servers = resolve_servers(settings)
        viewers = args.viewers or 1000
        result = asyncio.run(run_fanout(servers, viewers, args.tokens, args.rate or 50.0))
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        print(
            f"fanout: 1 conversation, {result.viewers} viewers, {result.tokens} tokens at "
            f"{result.model_rate:g} tokens/s\n"
            f"  delivery latency (model write -> viewer read): p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms, max {result.max_ms} ms over {result.delivered} deliveries\n"
            f"  edge memory per idle viewer: {result.kb_per_idle_viewer} KB"
        )
    return 0
