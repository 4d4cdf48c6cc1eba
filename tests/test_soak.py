"""`parley bench soak` in small: a short mixed load on its own stack, then every
invariant it checks (audit, rebuild = live, nothing active, every accepted
message answered, viewers saw every turn exactly, no leak) holds."""

from __future__ import annotations

from pathlib import Path

from parley.bench_soak import run_soak
from parley.stack import EmbeddedStack


async def test_a_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    with EmbeddedStack(tmp_path / "soak") as stack:
        result = await run_soak(stack.urls, minutes=0.15, users=3, viewers=4)
    assert result.problems == [], result.problems
    assert result.turns > 20, f"the load barely ran: {result.turns} turns"
    assert result.viewer_turns > 0, "no viewer followed a turn to its end"
    assert result.rebuilt_tables >= 9, result.rebuilt_tables
