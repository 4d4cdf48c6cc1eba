"""Which code holds the event loop, said while it holds it.

Every stream, turn and request of a process shares one event loop. Code that
blocks it (a deployment's async tool that calls a blocking client or sleeps
with `time.sleep`, a handler that computes for seconds) stalls all of them,
and no timeout can fire meanwhile: a tool's `timeout_s` is a timer of the same
loop. A thread watches a beat the loop keeps. When the beat is late by more
than `threshold_s`, it logs once where the loop's thread is (the innermost
frame outside the standard library, then the frames around it), and once more
when the loop beats again, with how long it was held. Each beat's lateness is
told too (`lagged`): `parley_event_loop_lag_seconds` on `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

# A beat later than this is a stall: far longer than any callback of parley's own
# takes, even at the load past which `parley bench capacity` saturates the machine.
THRESHOLD_S = 1.0
BEAT_S = 0.1
# where an event loop's own Python frames are (asyncio's loop and its Handle; uvloop's
# loop has none, and the frames under its run are the callbacks' own)
_LOOP_FILES = frozenset(
    (asyncio.events.__file__, asyncio.base_events.__file__, asyncio.runners.__file__)
)
# frames shown, innermost first
_SHOWN = 6
_STDLIB = tuple(
    path for path in {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")} if path
)


class StallWatch:
    """Started on the loop it watches; `stop` from the same loop."""

    def __init__(
        self,
        *,
        threshold_s: float = THRESHOLD_S,
        beat_s: float = BEAT_S,
        counted: Callable[[float], None] | None = None,
        lagged: Callable[[float], None] | None = None,
    ) -> None:
        self._threshold_s = threshold_s
        self._beat_s = beat_s
        self._counted = counted  # told each stall's length once it is over
        # told at each beat how late it ran (on the loop): the wait every callback of
        # the loop has, a stall's and an overload's alike (many short callbacks, or one
        # task that keeps it busy in short steps, which no stall shows)
        self._lagged = lagged
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._beat_at = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        now = time.monotonic()
        if self._lagged is not None and self._handle is not None:
            self._lagged(max(0.0, now - self._beat_at - self._beat_s))
        self._beat_at = now
        assert self._loop is not None
        self._handle = self._loop.call_later(self._beat_s, self._beat)

    def _watch(self) -> None:
        held_since: float | None = None  # the beat the loop missed, while it is held
        # The callback the loop was running when its beat was first seen late, and
        # when: a loop late because it has many callbacks to run (overload) runs
        # another one at each look, and is not held by one piece of code.
        running: _Run | None = None
        seen_at = 0.0
        while not self._stopping.wait(self._beat_s):
            beat_at = self._beat_at
            now = time.monotonic()
            late = now - beat_at - self._beat_s
            if held_since is not None:
                if beat_at > held_since:
                    held_s = beat_at - held_since - self._beat_s
                    held_since = running = None
                    log.warning("event loop free again", extra={"held_s": round(held_s, 1)})
                    if self._counted is not None:
                        self._counted(held_s)
                continue
            if late <= self._beat_s:
                running = None
                continue
            frame = sys._current_frames().get(self._loop_thread)
            callback = _running_callback(frame)
            if callback is None or running is None or not callback.same_as(running):
                running, seen_at = callback, now
            if callback is not None and now - seen_at > self._threshold_s:
                held_since = beat_at
                frames = _frames(frame)
                log.warning(
                    "event loop held: every stream, turn and request of this process waits",
                    extra={
                        "held_s": round(late, 1),
                        "where": frames[0] if frames else "unknown",
                        "frames": " < ".join(frames[1:]),
                    },
                )


class _Run:
    """One run of a callback (a task's step, a timer's function, a protocol's
    `data_received`): the frame the loop called, and the loop's own frame that
    called it (asyncio's `Handle._run`: one per run; uvloop has none, and its
    runner's frame stands in). Held, not named by `id`: a frame that ends is freed,
    and the next callback's frame is made at the same address, so that thousands of
    short callbacks of a busy loop would look like one that holds it."""

    __slots__ = ("callback", "caller")

    def __init__(self, callback: FrameType, caller: FrameType) -> None:
        self.callback = callback
        self.caller = caller

    def same_as(self, other: _Run) -> bool:
        return self.callback is other.callback and self.caller is other.caller


def _running_callback(frame: FrameType | None) -> _Run | None:
    """Which run of a callback the loop's thread is in; None when it is not in one."""
    inner = None
    while frame is not None:
        if frame.f_code.co_filename in _LOOP_FILES:
            return None if inner is None else _Run(inner, frame)
        inner, frame = frame, frame.f_back
    return None


def _frames(frame: FrameType | None) -> list[str]:
    """The frames of a stack, innermost first, from the innermost outside the standard
    library (a blocking call's own frames say less than the code that made it)."""
    shown: list[str] = []
    while frame is not None and len(shown) < _SHOWN:
        code = frame.f_code
        if shown or not code.co_filename.startswith(_STDLIB):
            shown.append(f"{code.co_filename}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return shown
