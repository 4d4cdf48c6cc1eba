"""The processes of a production-like benchmark, each its own OS process.

A real provider is not on parley's event loop, and neither are its users: the
demo model, the direct path (model stream straight to SSE, the lower bound of
any proxy) and the load generator each run in a process of their own, and
parley runs as it is deployed, in one of two topologies:

- `dev`: `parley dev`, every role in one process;
- `split`: `parley serve --role edge|worker|projector`, three processes, so
  both cores can work.

Every process's CPU time and memory are read from /proc around a measurement
window; `perf_counter_ns` is CLOCK_MONOTONIC on Linux, the one clock every
process shares, so "model wrote token i" and "viewer read token i" compare
across processes.

What may not enter: what a workload measures (parley.bench_load) and how it is
reported (parley.bench).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import msgspec

from parley import loops
from parley.services import Servers

T = TypeVar("T")

TOPOLOGIES: dict[str, tuple[str, ...]] = {
    "dev": ("dev",),
    "split": ("edge", "worker", "projector"),
}
_TICKS = os.sysconf("SC_CLK_TCK")
_READY_S = 120.0


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """A helper process's loop: the same as parley's (parley.loops), so the direct
    path is held to the same footing."""
    return loops.run(main())


# ---------------------------------------------------------------- the machine


class Machine(msgspec.Struct, frozen=True):
    nproc: int
    load_1m: float
    load_5m: float
    cpu: str
    mem_gib: float
    python: str
    loop: str


def machine() -> Machine:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    one, five, _ = os.getloadavg()
    loop = loops.loop_name()
    return Machine(
        nproc=os.cpu_count() or 0,
        load_1m=round(one, 2),
        load_5m=round(five, 2),
        cpu=cpu,
        mem_gib=round(mem_kb / 1024 / 1024, 1),
        python=platform.python_version(),
        loop=loop,
    )


# ---------------------------------------------------------------- CPU and memory


def _cpu_ticks(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path("/proc").iterdir():
        if not task.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            raw = (task / "stat").read_text()
            if int(raw.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(task.name))
    return out


class Watched:
    """Named processes (a process with `tree` counts its children too: Postgres's backends)."""

    def __init__(self) -> None:
        self.pids: dict[str, tuple[int, bool]] = {}

    def add(self, name: str, pid: int, *, tree: bool = False) -> None:
        self.pids[name] = (pid, tree)

    def remove(self, name: str) -> None:
        self.pids.pop(name, None)

    def _members(self, pid: int, tree: bool) -> list[int]:
        return [pid, *_children(pid)] if tree else [pid]

    def sample(self) -> dict[str, tuple[int, int]]:
        """name -> (CPU ticks so far, resident KB now)."""
        out: dict[str, tuple[int, int]] = {}
        for name, (pid, tree) in self.pids.items():
            members = self._members(pid, tree)
            out[name] = (sum(map(_cpu_ticks, members)), sum(map(_rss_kb, members)))
        return out


def cpu_seconds(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """CPU seconds each process spent between the two samples (unrounded)."""
    return {
        name: (ticks - before.get(name, (ticks, 0))[0]) / _TICKS
        for name, (ticks, _) in after.items()
    }


def usage(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], seconds: float
) -> dict[str, float]:
    """Flat keys: `cpu_<name>` (cores busy, 1.0 = one core) and `rss_mb_<name>`."""
    out: dict[str, float] = {}
    for name, (ticks, rss) in after.items():
        spent = (ticks - before.get(name, (ticks, 0))[0]) / _TICKS
        out[f"cpu_{name}"] = round(spent / seconds, 2) if seconds > 0 else 0.0
        out[f"rss_mb_{name}"] = round(rss / 1024, 1)
    return out


# ---------------------------------------------------------------- model and direct path


def _model_process(conn: Connection) -> None:
    from parley.demo_model import DemoConfig, start_demo_model

    async def main() -> None:
        # full speed unless a request says `[[rate=R]]`; no thinking: tokens are counted
        runner, url = await start_demo_model(
            "127.0.0.1", 0, DemoConfig(tokens_per_s=0, think=False), emit_log={}
        )
        conn.send(url)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        run_async(main)


def _direct_process(model_url: str, conn: Connection) -> None:
    from parley.bench_common import direct_server

    async def main() -> None:
        async with direct_server(model_url) as url:
            conn.send(url)
            await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        run_async(main)


# ---------------------------------------------------------------- stopping


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM handled as SIGINT is, inside the block: a bench that is told to stop
    unwinds (each of its processes stopped, its scratch folders removed) instead of
    dying at once and leaving `parley dev`, the model and the viewers running.

    In `asyncio.run` SIGINT cancels the main task, so every `finally` runs while the
    loop still serves its tasks; elsewhere it raises KeyboardInterrupt. SIGTERM is
    passed on as a SIGINT to take the same way. A bench started in the background of
    a script inherits SIGINT ignored, where asyncio would not install its handler and
    an interrupt raised in the middle of the loop left the in-process services to be
    torn down with their NATS client already cancelled (minutes of timeouts): inside
    the block SIGINT has its default handler."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def start_process(proc: BaseProcess, child: Connection) -> None:
    """Start `proc`, which was given `child`, and close this process's copy of it: when
    `proc` ends, its end of the pipe is then closed and a read of the other end fails
    (EOFError) instead of waiting forever."""
    proc.start()
    child.close()


def stop_process(proc: BaseProcess, wait_s: float = 30.0) -> None:
    """Wait up to `wait_s` for `proc` to end; then terminate it, and kill it if need be."""
    proc.join(wait_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


async def receive(conn: Connection, proc: BaseProcess, name: str) -> Any:
    """The next message `proc` sends on `conn`, awaited on the running loop.

    Not `recv` in a thread: a thread blocked on a pipe keeps the process from
    exiting, so an interrupted bench hung until its load process sent something,
    and forever when the interrupt had ended that process too. RuntimeError if
    `proc` ends without sending."""
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    while not conn.poll():
        readable: asyncio.Future[None] = loop.create_future()

        def ready(waiter: asyncio.Future[None] = readable) -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
    try:
        return conn.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(
            f"the {name} process ended without an answer (exit code {proc.exitcode})"
        ) from None


@contextlib.contextmanager
def helper(
    name: str, target: Callable[..., None], args: tuple[Any, ...], watched: Watched
) -> Iterator[str]:
    """A spawned helper process that sends one line (its URL) when it serves."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
    try:
        start_process(proc, child)
        if not parent.poll(_READY_S):
            raise RuntimeError(f"the {name} process did not start within {_READY_S:g} s")
        try:
            url: str = parent.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(
                f"the {name} process ended before it served (exit code {proc.exitcode})"
            ) from None
        assert proc.pid is not None
        watched.add(name, proc.pid)
        yield url
    finally:
        watched.remove(name)
        if proc.pid is not None:
            proc.terminate()
            stop_process(proc, 10)


# ---------------------------------------------------------------- parley itself


class Parley(msgspec.Struct):
    edge_url: str
    pids: dict[str, int]


def parley_env(servers: Servers, model_url: str, secret: str, schema: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PARLEY_NATS_URL=servers.nats_url,
        PARLEY_DATABASE_URL=servers.database_url,
        PARLEY_REDIS_URL=servers.redis_url,
        PARLEY_MODEL_BASE_URL=model_url,
        PARLEY_JWT_SECRET=secret,
        PARLEY_DB_SCHEMA=schema,
        # one bench user stands for a crowd: per-user limits are off
        PARLEY_RATE_PER_S="0",
        PARLEY_MAX_STREAMS_PER_USER="0",
        PARLEY_MAX_TURNS_PER_USER="0",
    )
    return env


def _parley_argv(role: str, data: Path) -> list[str]:
    base = [sys.executable, "-m", "parley.cli"]
    if role == "dev":
        return [*base, "dev", "--port", "0", "--data", str(data)]
    return [*base, "serve", "--role", role, "--port", "0", "--data", str(data)]


def _wait_for(
    log: Path, proc: subprocess.Popen[bytes], marker: bytes, within: float = _READY_S
) -> bytes:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = log.read_bytes() if log.exists() else b""
        for line in text.splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} ended: {text[-2000:].decode(errors='replace')}")
        time.sleep(0.1)
    # what it said last says why (a server it cannot reach, say)
    tail = (log.read_bytes() if log.exists() else b"")[-2000:].decode(errors="replace")
    raise RuntimeError(f"{proc.args!r} not ready within {within:g} s; its log ends:\n{tail}")


@contextlib.contextmanager
def parley(topology: str, env: dict[str, str], folder: Path, watched: Watched) -> Iterator[Parley]:
    """parley's processes in `topology`; the edge's URL once every role is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    edge_url = ""
    try:
        for role in TOPOLOGIES[topology]:
            log = folder / f"{role}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    _parley_argv(role, folder / "data"),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            procs.append((role, proc))
            if role == "dev":
                line = _wait_for(log, proc, b"parley is running at ")
                edge_url = line.split(b"running at ", 1)[1].split()[0].decode()
            else:
                line = _wait_for(log, proc, b"roles ready")
                if role == "edge":
                    edge_url = _wait_for(log, proc, b"edge listening at ").split()[-1].decode()
            watched.add(f"parley_{role}", proc.pid)
        yield Parley(edge_url=edge_url, pids={role: p.pid for role, p in procs})
    finally:
        for role, proc in reversed(procs):
            watched.remove(f"parley_{role}")
            proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        keep = os.environ.get("PARLEY_BENCH_LOGS")
        if keep:  # parley's own logs of the run, for a look afterwards
            Path(keep).mkdir(parents=True, exist_ok=True)
            for role, _ in procs:
                shutil.copy(folder / f"{role}.log", Path(keep) / f"{topology}-{role}.log")
