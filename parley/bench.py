"""`parley bench`: the entry point, and the fan-out benchmark.

`capacity`, `stream` and `burst` run parley, the model, the direct path and the
viewers in processes of their own (parley.bench_system); `cancel` and `soak`
run in this process (parley.bench_actor, parley.bench_soak); `rebuild` times full
rebuilds of a large synthetic log (parley.bench_rebuild); `coldstart` a cold
actor's fold of a long conversation, from its log and from its snapshot
(parley.bench_coldstart); `fanout` is here.

What the workloads share (the bench user, the direct path every workload is
held against) is in parley.bench_common.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from api.auth import mint
from parley import loops
from parley.bench_common import NO_LIMITS, SECRET, flat_json, percentile
from parley.bench_procs import receive, start_process, stop_process, terminate_as_interrupt
from parley.config import load_catalog, load_settings
from parley.demo_model import DemoConfig, start_demo_model
from parley.services import Servers, ServiceOptions, Services, resolve_servers
from parley.stack import EmbeddedStack

# ---------------------------------------------------------------- the run


def run_bench(args: argparse.Namespace) -> int:
    """The workload named by `args.workload`, on the configured servers or a scratch stack.
    SIGTERM stops it as Ctrl-C does: every process it started is stopped, every
    scratch folder removed."""
    with terminate_as_interrupt():
        return _run_bench(args)


def _run_bench(args: argparse.Namespace) -> int:
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
        if args.workload == "coldstart":
            from parley.bench_coldstart import run_coldstart_bench

            return run_coldstart_bench(args, servers)
        text, result = loops.run(_workload(args, servers))
    print(flat_json(result) if args.json else text)
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
    # a failed turn of the direct path leaves the "added" figures without their baseline
    return 1 if any(row["errors"] or row["direct_errors"] for row in rows) else 0


# ---------------------------------------------------------------- fanout


class Fanout(msgspec.Struct):
    viewers: int
    tokens: int
    model_rate: float
    delivered: int  # token deliveries measured (viewers x tokens when none is lost)
    p50_ms: float
    p99_ms: float
    max_ms: float
    # of the same latency: to the first viewer that read a token (the pipeline), and
    # from the first viewer to the last (the edge writing to each socket in turn)
    first_viewer_p99_ms: float
    spread_p99_ms: float
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
    """A separate process holding `n` SSE viewers: the edge's memory is measured alone.
    (On the stock loop: on uvloop this client read later, p99 69-88 ms against 20-22.)"""
    _raise_fd_limit()
    asyncio.run(_viewers(port, token, cid, n, conn))


class _Viewer(asyncio.Protocol):
    """One SSE viewer that only stamps and keeps what arrives: the parsing waits for
    the end, so this process reads 1,000 sockets within a token's interval."""

    def __init__(self, ready: asyncio.Future[None], done: asyncio.Future[None]) -> None:
        self.reads: list[tuple[int, bytes]] = []
        self.ready = ready
        self.done = done
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self._head += data
            if b"retry: 1000\n\n" in self._head:
                self.ready.set_result(None)
            return
        # CLOCK_MONOTONIC: the same clock in every process
        self.reads.append((time.perf_counter_ns(), data))
        if _DONE in data and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def tokens(self) -> list[tuple[int, int]]:
        """(token number, when the read that completed its frame arrived)."""
        seen: list[tuple[int, int]] = []
        buffer = b""
        for at, data in self.reads:
            buffer += data
            *frames, buffer = buffer.split(b"\n\n")
            for raw in frames:
                start = raw.find(_TOKEN)
                if start >= 0:
                    text = raw[start + len(_TOKEN) : raw.index(b'"', start + len(_TOKEN))]
                    seen.extend((int(word), at) for word in text.split())
        return seen


def _same(viewer: _Viewer) -> _Viewer:
    return viewer


async def _viewers(port: int, token: str, cid: str, n: int, conn: Any) -> None:
    request = (
        f"GET /v1/conversations/{cid}/events HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    viewers: list[_Viewer] = []
    for _ in range(n):
        viewer = _Viewer(loop.create_future(), loop.create_future())
        transport, _ = await loop.create_connection(
            functools.partial(_same, viewer), "127.0.0.1", port
        )
        transport.write(request)
        viewers.append(viewer)
    await asyncio.gather(*(viewer.ready for viewer in viewers))
    # A collection here would stall every viewer's reads at once: what this
    # process holds lives until the end anyway.
    gc.disable()
    conn.send("ready")
    await asyncio.gather(*(viewer.done for viewer in viewers))
    conn.send([item for viewer in viewers for item in viewer.tokens()])


async def run_fanout(servers: Servers, viewers: int, tokens: int, rate: float) -> Fanout:
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
                start_process(proc, child)
                try:
                    ready = await receive(parent, proc, "viewers")
                    assert ready == "ready"
                    gc.collect()
                    after = _rss_kb()
                    await turn(f"fan out [[tokens={tokens}]] [[bench=fanout]]")
                    seen = await receive(parent, proc, "viewers")
                except BaseException:
                    proc.terminate()
                    raise
                finally:
                    stop_process(proc)
    finally:
        await runner.cleanup()
    emitted = emit_log.get("fanout", [])
    latencies = [(at - emitted[i]) / 1e6 for i, at in seen if i < len(emitted)]
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, at in seen:
        first[i] = min(first.get(i, at), at)
        last[i] = max(last.get(i, at), at)
    to_first = [(first[i] - emitted[i]) / 1e6 for i in first if i < len(emitted)]
    spread = [(last[i] - first[i]) / 1e6 for i in first]
    return Fanout(
        viewers=viewers,
        tokens=tokens,
        model_rate=rate,
        delivered=len(latencies),
        p50_ms=round(percentile(latencies, 50), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        max_ms=round(max(latencies, default=float("nan")), 2),
        first_viewer_p99_ms=round(percentile(to_first, 99), 2),
        spread_p99_ms=round(percentile(spread, 99), 2),
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
        result = loops.run(run_fanout(servers, viewers, args.tokens or 500, args.rate or 50.0))
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        print(
            f"fanout: 1 conversation, {result.viewers} viewers, {result.tokens} tokens at "
            f"{result.model_rate:g} tokens/s\n"
            f"  delivery latency (model write -> viewer read): p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms, max {result.max_ms} ms over {result.delivered} deliveries\n"
            f"  of which: to the first viewer p99 {result.first_viewer_p99_ms} ms, "
            f"first to last viewer p99 {result.spread_p99_ms} ms\n"
            f"  edge memory per idle viewer: {result.kb_per_idle_viewer} KB"
        )
    return 0
