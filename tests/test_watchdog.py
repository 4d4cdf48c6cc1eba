"""The restart rules of the embedded servers' watch (parley/watchdog.py), without servers."""

from __future__ import annotations

import pytest

from parley.watchdog import MAX_RETRY_S, describe_exit, restart_delay


@pytest.mark.parametrize(
    ("recent_exits", "delay"),
    [(1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0), (7, 16.0), (8, MAX_RETRY_S), (50, MAX_RETRY_S)],
)
def test_a_server_that_keeps_dying_is_restarted_after_a_growing_delay(
    recent_exits: int, delay: float
) -> None:
    assert restart_delay(recent_exits) == delay


def test_an_exit_is_told_by_its_signal_or_its_code() -> None:
    assert describe_exit(-9) == "signal 9"
    assert describe_exit(1) == "code 1"
