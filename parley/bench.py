"""`parley bench`: the entry point, and the fan-out benchmark.

`capacity`, `stream` and `burst` run parley, the model, the direct path and the
viewers in processes of their own (parley.bench_system); `cancel` and `soak`
run in this process (parley.bench_actor, parley.bench_soak); `rebuild` times full
rebuilds of a large synthetic log (parley.bench_rebuild); `fanout` is here.

What the workloads share (the bench user, the direct path every workload is
held against) is in parley.bench_common.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from api.auth import mint
from parley.bench_common import NO_LIMITS, SECRET, percentile
from parley.config import load_catalog, load_settings
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services, resolve_servers
from parley.stack import EmbeddedStack

# ---------------------------------------------------------------- the run


def run_bench(args: argparse.Namespace) -> int:
    """The workload named by `args.workload`, on the configured servers or a scratch stack."""
    if args.workload == "fanout":
        return run_fanout_bench(args)
    if args.workload in ("capacity", "stream", "burst"):
        return run_system_bench(args)
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
    from parley import bench_soak

    soak = await bench_soak.run_soak(servers, args.minutes, args.users, args.viewers or 20)
    return bench_soak.render(soak), soak


def run_system_bench(args: argparse.Namespace) -> int:
    from parley.bench_system import render, run_system

    rows = run_system(args)
    if args.json:
        for row in rows:
            print(msgspec.json.encode(row).decode())
    else:
        print(render(rows))
    return 1 if any(row["errors"] for row in rows) else 0


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
        result = asyncio.run(run_fanout(servers, viewers, args.tokens or 500, args.rate or 50.0))
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
