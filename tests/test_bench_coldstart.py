"""`parley bench coldstart` on the suite's stack: a long conversation folded cold, from its
log and from its snapshot, the two arriving at the same state (the bench checks it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import msgspec

from events.vocabulary import ConversationCreated, Done, Failed
from parley.bench_coldstart import ColdStartResult, bench_coldstart
from parley.bench_rebuild import make_conversation
from parley.services import Servers


def test_a_synthetic_long_conversation_is_one_conversation_of_whole_turns() -> None:
    events = list(make_conversation(3_000))
    assert len(events) >= 3_000
    assert isinstance(events[0], ConversationCreated)
    assert {e.conversation_id for e in events} == {events[0].conversation_id}
    assert isinstance(events[-1], Done | Failed)  # it ends with a whole turn


async def test_coldstart_folds_a_long_conversation_from_its_log_and_from_its_snapshot(
    stack: Servers,
) -> None:
    result = await bench_coldstart(stack, 1_500, 2)
    assert result.entries >= 1_500 and result.answers >= 10
    assert result.from_log_ms > 0 and result.from_snapshot_ms > 0
    assert result.snapshot_kib > 0 and result.rounds == 2


async def test_the_cli_prints_one_json_object(stack: Servers) -> None:
    env = {
        **os.environ,
        "PARLEY_NATS_URL": stack.nats_url,
        "PARLEY_DATABASE_URL": stack.database_url,
        "PARLEY_REDIS_URL": stack.redis_url,
    }
    argv = [sys.executable, "-m", "parley.cli", "bench", "coldstart", "--events", "800"]
    done = await asyncio.to_thread(
        subprocess.run, [*argv, "--rounds", "1", "--json"], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = msgspec.json.decode(done.stdout, type=ColdStartResult)
    assert result.workload == "coldstart" and result.entries >= 800
