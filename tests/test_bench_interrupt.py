"""`parley bench` stopped with SIGTERM or Ctrl-C leaves nothing running: not `parley dev`,
the demo model, the direct path nor the load generator, and no scratch folder.

The bench runs as a command of its own on the suite's servers; it is stopped while a
load process measures, the moment most of its processes are up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from parley.services import Servers

_ROOT = Path(__file__).resolve().parent.parent


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found[child] = (
                (Path(f"/proc/{child}/cmdline").read_bytes()).replace(b"\0", b" ").decode()
            )
        except OSError:
            continue
        todo.extend(parents.get(child, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_stopped_bench_stops_every_process_it_started(
    stack: Servers, tmp_path: Path, how: str
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(_ROOT),
        "TMPDIR": str(scratch),
        "PARLEY_NATS_URL": stack.nats_url,
        "PARLEY_DATABASE_URL": stack.database_url,
        "PARLEY_REDIS_URL": stack.redis_url,
    }
    argv = [sys.executable, "-m", "parley.cli", "bench", "capacity", "--topology", "dev"]
    argv += ["--steps", "3", "--tokens", "20", "--seconds", "60", "--data", str(tmp_path / "d")]
    with (tmp_path / "bench.log").open("wb") as log:
        # a session of its own: Ctrl-C is the terminal's SIGINT to the whole group
        bench = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    family: dict[int, str] = {}
    try:

        def measuring() -> bool:
            family.update(_descendants(bench.pid))
            running = [cmd for pid, cmd in family.items() if _alive(pid)]
            forks = [cmd for cmd in running if "spawn_main" in cmd]
            # the model, the direct path and a load generator, beside `parley dev`
            dev = any("parley.cli dev" in cmd for cmd in running)
            return (dev and len(forks) >= 3) or bench.poll() is not None

        _until(measuring, 90, "a load process measuring")
        assert bench.poll() is None, (tmp_path / "bench.log").read_text()[-3000:]
        if how == "sigterm":
            bench.send_signal(signal.SIGTERM)
        else:
            os.killpg(bench.pid, signal.SIGINT)
        code = bench.wait(60)
        assert code != 0
        _until(
            lambda: not [pid for pid in family if _alive(pid)],
            30,
            f"every process of the bench ended: {family}",
        )
        assert not [p.name for p in scratch.iterdir() if p.name.startswith("parley-bench")]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid, cmd in family.items():
            if _alive(pid) and _descendants(1).get(pid) == cmd:
                os.kill(pid, signal.SIGKILL)
