"""Keeping the embedded servers up: a server that dies is started again.

`parley dev` runs NATS, Postgres and Redis as child processes
(parley/stack.py). If one of them dies (killed, crashed, out of memory), a
`ServerWatch` notices at once, because its thread is blocked in `wait()` on
the process, logs why (`nats-server exited (signal 9); restarting`), lets
whatever the server left in its process group go (a killed postmaster's
backends hold its shared memory, and a new postmaster refuses to start beside
them), and starts it again through the stack, on the same port and data
folder, so every client reconnects to the URL it already has. Servers that
keep dying are restarted after a growing delay (`restart_delay`), never in a
tight loop.

The thread that restarts a server stays alive as long as that server runs:
the kernel sends a child its parent-death signal when the *thread* that forked
it ends, so the watch thread is that server's parent from its first restart on.

What may not enter: how a server is started or probed (the stack's business,
handed in as `restart`), and anything of parley's domain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Exits this close together count as one crash loop; a server that ran longer
# than this before dying is restarted at once again.
CRASH_WINDOW_S = 60.0
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
# How long a dead server's leftover processes (Postgres backends, a Redis
# rewrite child) get to notice and exit before they are killed.
LEFTOVER_GRACE_S = 5.0
_POLL_S = 0.05


class Unstartable(Exception):
    """A restart attempt failed (the server exited again, or never became ready)."""


def restart_delay(recent_exits: int) -> float:
    """Seconds to wait before restarting a server that exited `recent_exits` times within
    `CRASH_WINDOW_S` (this exit included): at once the first time, then 0.5 s, 1 s, 2 s, ...
    up to `MAX_RETRY_S`."""
    if recent_exits <= 1:
        return 0.0
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2.0 ** (recent_exits - 2))


def describe_exit(code: int) -> str:
    """How a process ended, as Popen reports it: `signal 9` or `code 1`."""
    return f"signal {-code}" if code < 0 else f"code {code}"


class ServerWatch:
    """Restarts one server whenever it exits, until `stopping` is set.

    `restart()` starts the server again and returns its process once it accepts
    requests; it raises `Unstartable` when that attempt failed, and the watch
    tries again after the next delay.
    """

    def __init__(
        self,
        label: str,
        proc: subprocess.Popen[bytes],
        restart: Callable[[], subprocess.Popen[bytes]],
        stopping: threading.Event,
    ) -> None:
        self.label = label
        self._proc = proc
        self._restart = restart
        self._stopping = stopping
        self.restarts = 0
        self._exits: deque[float] = deque()
        self._released = threading.Event()  # cleared: restarts wait (`hold`)
        self._released.set()
        self._thread = threading.Thread(target=self._run, name=f"watch-{label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def hold(self) -> None:
        """Restart nothing until `release()`: for tests of what clients do meanwhile."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            died_at = time.monotonic()
            log.warning("%s exited (%s); restarting", self.label, describe_exit(code))
            _let_leftovers_go(self._proc.pid, self.label)
            proc = self._restart_until_up()
            if proc is None:
                return  # stopped meanwhile
            self._proc = proc
            self.restarts += 1
            log.warning("%s restarted in %.1f s", self.label, time.monotonic() - died_at)

    def _restart_until_up(self) -> subprocess.Popen[bytes] | None:
        while True:
            now = time.monotonic()
            self._exits.append(now)
            while self._exits and now - self._exits[0] > CRASH_WINDOW_S:
                self._exits.popleft()
            delay = restart_delay(len(self._exits))
            if delay and self._stopping.wait(delay):
                return None
            while not self._released.wait(_POLL_S):
                if self._stopping.is_set():
                    return None
            if self._stopping.is_set():
                return None
            try:
                return self._restart()
            except Unstartable as err:
                if self._stopping.is_set():
                    return None
                log.error("%s did not come back: %s", self.label, err)


def _let_leftovers_go(pgid: int, label: str) -> None:
    """Wait for the rest of a dead server's process group to exit; kill what stays.

    Every server is started as the leader of its own process group, so the group
    id is the dead server's pid, and its members are what it forked.
    """
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    killed = False
    while left := _group_members(pgid):
        if time.monotonic() > deadline:
            if killed:
                log.error("%s left processes that survive SIGKILL: %s", label, sorted(left))
                return
            log.warning("%s left processes behind; killing them", label)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + LEFTOVER_GRACE_S
        time.sleep(_POLL_S)


def _group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces and parens
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members
