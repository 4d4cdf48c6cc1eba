"""How parley's processes end: a task that ignores its cancel does not keep one alive."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from parley import loops

ROOT = Path(__file__).resolve().parent.parent

DEAF_TASK = textwrap.dedent(
    """
    import asyncio
    from parley import loops

    async def deaf() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # as a library that swallows the cancel does

    async def polite() -> None:
        await asyncio.sleep(3600)

    async def main() -> int:
        tasks = [asyncio.create_task(deaf(), name="deaf"), asyncio.create_task(polite())]
        await asyncio.sleep(0)
        print("main done", len(tasks), flush=True)
        return 0

    loops.run(main())
    """
)


def run_script(
    source: str, timeout_s: float = loops.LEFTOVERS_WITHIN_S + 30
) -> subprocess.CompletedProcess[str]:
    """`source` run by this Python in a process of its own, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-c", source],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_a_task_that_ignores_its_cancel_is_named_and_the_process_exits_anyway() -> None:
    """asyncio.run cancels what is left when main returns and waits for it without a
    limit: a `parley serve` whose role swallowed its cancel never exited after SIGTERM,
    and said nothing. Now it is left behind, named with where it waits, and the
    process exits with 1 (its stop was not clean)."""
    began = time.monotonic()
    done = run_script(DEAF_TASK)
    took = time.monotonic() - began
    assert done.stdout == "main done 2\n", done
    assert done.returncode == loops.LEFT_BEHIND_EXIT, done
    assert "1 task(s) did not end when cancelled" in done.stderr, done.stderr
    assert "deaf" in done.stderr, done.stderr
    assert took < loops.LEFTOVERS_WITHIN_S + 20, took


def test_tasks_that_end_when_cancelled_leave_the_process_its_own_result() -> None:
    done = run_script(DEAF_TASK.replace("deaf(), name", "polite(), name"), timeout_s=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "main done 2\n", ""), done


def test_what_main_raised_is_still_said_when_a_task_is_left_behind() -> None:
    failing = DEAF_TASK.replace("    return 0\n", '    raise RuntimeError("main broke")\n')
    assert failing != DEAF_TASK
    done = run_script(failing)
    assert done.returncode == loops.LEFT_BEHIND_EXIT, done
    assert "RuntimeError: main broke" in done.stderr, done.stderr
    assert "did not end when cancelled" in done.stderr, done.stderr
