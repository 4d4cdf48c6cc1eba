"""The embedded dev stack starts real servers, keeps their data, and leaves no process behind.

These tests start their own stacks in temporary folders, separate from the
session stack the rest of the suite shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import asyncpg
import nats
import pytest
import redis

from parley.stack import (
    POSTGRES_ACCOUNT,
    EmbeddedStack,
    StackError,
    StackUrls,
    free_ports,
    running_stack_urls,
)

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    # A zombie counts as gone: once the launcher is dead nobody may reap it
    # (PID 1 in a container often does not).
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # the second: it died while we read
        return False
    return raw[raw.rindex(")") + 2] != "Z"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _wait_gone(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _ports(urls: StackUrls) -> tuple[int, int, int]:
    def port(url: str) -> int:
        return int(url.rsplit(":", 1)[1].split("/", 1)[0])

    return port(urls.nats_url), port(urls.database_url), port(urls.redis_url)


async def _write_everywhere(urls: StackUrls) -> None:
    nc = await nats.connect(urls.nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="PROBE", subjects=["probe.>"])
        ack = await js.publish("probe.one", b"kept")
        assert ack.seq == 1
    finally:
        await nc.close()
    conn = await asyncpg.connect(urls.database_url)
    try:
        assert await conn.fetchval("select 1") == 1
        await conn.execute("create table notes (body text not null)")
        await conn.execute("insert into notes values ('kept')")
    finally:
        await conn.close()
    client = redis.Redis.from_url(urls.redis_url)
    try:
        assert client.set("probe", "kept")
    finally:
        client.close()


async def _read_everywhere(
    urls: StackUrls,
) -> tuple[bytes | None, list[str], bytes | str | None]:
    nc = await nats.connect(urls.nats_url)
    try:
        stream_msg = (await nc.jetstream().get_msg("PROBE", 1)).data
    finally:
        await nc.close()
    conn = await asyncpg.connect(urls.database_url)
    try:
        rows = [r["body"] for r in await conn.fetch("select body from notes")]
    finally:
        await conn.close()
    client = redis.Redis.from_url(urls.redis_url)
    try:
        value = client.get("probe")
    finally:
        client.close()
    return stream_msg, rows, value


def test_started_stack_serves_jetstream_postgres_and_redis(tmp_path: Path) -> None:
    with EmbeddedStack(tmp_path) as stack:
        asyncio.run(_write_everywhere(stack.urls))
        assert asyncio.run(_read_everywhere(stack.urls)) == (b"kept", ["kept"], b"kept")
        assert stack.urls.database_url.endswith("/parley")


def test_restart_on_the_same_folder_keeps_data_and_picks_new_ports(tmp_path: Path) -> None:
    # durable_sync as production runs the event stream; it must not change what survives.
    first = EmbeddedStack(tmp_path, durable_sync=True)
    try:
        before = first.start()
        asyncio.run(_write_everywhere(before))
    finally:
        first.stop()

    second = EmbeddedStack(tmp_path, durable_sync=True)
    try:
        after = second.start()
        seen = asyncio.run(_read_everywhere(after))
    finally:
        second.stop()

    assert seen == (b"kept", ["kept"], b"kept")
    assert _ports(after) != _ports(before), f"same ports after restart: {_ports(after)}"


def test_stop_leaves_no_server_process_behind(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path)
    stack.start()
    servers = set(stack.pids.values())
    assert len(servers) == 3, stack.pids
    everything = servers | _descendants(stack.pids["postgres"])

    stack.stop()
    stack.stop()  # idempotent

    assert stack.pids == {}
    assert not {p for p in everything if _alive(p)}


def test_stop_does_not_wait_out_its_timeout_for_servers_that_are_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server stopped with SIGSTOP (and Postgres's backends with it) acts on no
    signal until it is continued: `parley dev` stopped with Ctrl-C while its NATS
    was frozen waited the whole STOP_TIMEOUT (15 s) before it killed it."""
    stack = EmbeddedStack(tmp_path)
    stack.start()
    frozen = [stack.pids["nats"], stack.pids["postgres"], *_descendants(stack.pids["postgres"])]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        stack.stop()
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert "killing it" not in caplog.text
    assert not {p for p in frozen if _alive(p)}


def test_servers_die_when_the_launching_process_is_killed(tmp_path: Path) -> None:
    launcher_code = textwrap.dedent(
        """
        import json, sys, time
        from pathlib import Path
        from parley.stack import EmbeddedStack

        stack = EmbeddedStack(Path(sys.argv[1]))
        stack.start()
        print(json.dumps(stack.pids), flush=True)
        time.sleep(300)
        """
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", launcher_code, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        assert launcher.stdout is not None
        ready, _, _ = select.select([launcher.stdout], [], [], 60)
        assert ready, "the launcher printed no pids within 60 s"
        pids: dict[str, int] = json.loads(launcher.stdout.readline())
        assert set(pids) == {"nats", "postgres", "redis"}
        everything = set(pids.values()) | _descendants(pids["postgres"])
        assert all(_alive(p) for p in pids.values())
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()

    left = _wait_gone(everything, within=10)
    assert not left, f"still running 10 s after the launcher was killed: {sorted(left)}"


def test_a_server_that_dies_is_restarted_on_its_port_with_its_data(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path)
    urls = stack.start()
    try:
        asyncio.run(_write_everywhere(urls))
        for name, label in (
            ("nats", "nats-server"),
            ("redis", "redis-server"),
            ("postgres", "postgres"),
        ):
            old = stack.pids[name]
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while stack.restarts[label] == 0 or stack.pids.get(name) in (None, old):
                assert time.monotonic() < deadline, f"{label} not restarted within 30 s"
                time.sleep(0.05)
        # the same URLs answer, with what was written before each server died
        assert asyncio.run(_read_everywhere(urls)) == (b"kept", ["kept"], b"kept")
        # the record names the new servers, so a later start stops them if we die
        record = json.loads((tmp_path / "stack.json").read_text())
        assert {k: v["pid"] for k, v in record["servers"].items()} == stack.pids
        servers = set(stack.pids.values()) | _descendants(stack.pids["postgres"])
    finally:
        stack.stop()
    assert stack.pids == {}
    assert not _wait_gone(servers, within=5), "a restarted server outlived stop()"


def test_a_second_stack_on_a_folder_in_use_is_refused(tmp_path: Path) -> None:
    with EmbeddedStack(tmp_path) as running:
        # What `parley` commands other than `dev` use to find the running stack.
        assert running_stack_urls(tmp_path) == running.urls
        with pytest.raises(StackError, match="already running"):
            EmbeddedStack(tmp_path).start()
        assert set(running.pids) == {"nats", "postgres", "redis"}
        assert running_stack_urls(tmp_path) == running.urls
    assert running_stack_urls(tmp_path) is None


def test_stale_postmaster_pid_naming_a_reused_pid_does_not_block_start(tmp_path: Path) -> None:
    with EmbeddedStack(tmp_path):
        pass
    # After a hard kill the old postmaster's pid may now belong to anyone; a
    # sleeping process stands in. Not this one (Postgres ignores its parent's pid)
    # and run as Postgres's account (it takes pids it may not signal for dead).
    as_postgres = POSTGRES_ACCOUNT if os.geteuid() == 0 else None
    stranger = subprocess.Popen(["sleep", "60"], user=as_postgres)
    try:
        pidfile = tmp_path / "postgres" / "postmaster.pid"
        pidfile.write_text(f"{stranger.pid}\n{tmp_path / 'postgres'}\n0\n5432\n\n\n\n")
        with EmbeddedStack(tmp_path) as stack:
            assert "postgres" in stack.pids
        assert stranger.poll() is None, "the unrelated process was disturbed"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_server_that_cannot_start_raises_with_its_log_and_stops_the_others(
    tmp_path: Path,
) -> None:
    with EmbeddedStack(tmp_path):
        pass
    (tmp_path / "postgres" / "postgresql.auto.conf").write_text("shared_buffers = 'lots'\n")
    stack = EmbeddedStack(tmp_path)
    with pytest.raises(StackError, match="postgres exited") as failure:
        stack.start()
    assert "shared_buffers" in str(failure.value), str(failure.value)
    assert stack.pids == {}


def test_start_off_the_main_thread_is_refused(tmp_path: Path) -> None:
    # The kernel's death signal follows the thread that forked a server, so a
    # server started from a short-lived thread would die with that thread.
    failures: list[BaseException] = []

    def start() -> None:
        try:
            EmbeddedStack(tmp_path).start()
        except StackError as error:
            failures.append(error)

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    assert [str(f) for f in failures] == ["EmbeddedStack.start() must run on the main thread"]


def test_free_ports_are_distinct_unbound_and_below_the_ephemeral_range() -> None:
    # Outgoing connections take their local port from the ephemeral range, so a
    # server port picked there can be taken by a client before the server binds.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(12)
    assert len(set(ports)) == 12
    assert all(1024 <= port < low for port in ports), (ports, low)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_skip_a_port_with_a_listener() -> None:
    listeners = []
    try:
        # Occupy a stretch of the range the picks come from; none may be handed out.
        for port in range(20000, 20200):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            s.listen()
            listeners.append(s)
        taken = {s.getsockname()[1] for s in listeners}
        for _ in range(20):
            assert not taken & set(free_ports(50))
    finally:
        for s in listeners:
            s.close()
