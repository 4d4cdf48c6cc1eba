"""What `parley bench capacity|stream|burst` prints from its rows (no servers: the rows are given)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from events.vocabulary import Chunk, Done, Started, Title, UserMessage
from parley.bench_load import Outcome
from parley.bench_procs import _wait_for
from parley.bench_system import Measured, Setup, render, turn_marks
from parley.bench_system import _row as _system_row


def _row(**extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "workload": "burst",
        "tokens_per_turn": 10,
        "rate": 50,
        "rounds": 3,
        "machine_nproc": 2,
        "machine_load_1m": 1.2,
        "machine_loop": "uvloop",
        "topology": "split",
        "concurrency": 100,
        "errors": 0,
        "delivered_ratio": 1.0,
        "direct_delivered_ratio": 1.0,
        "tokens_per_s": 900,
        "direct_tokens_per_s": 910,
        "error_sample": "",
        "cpu_load": 1.1,
        "cpu_parley_edge": 0.2,
        "parley_cpu_us_per_token": 300,
        "events_per_s": 1000,
    }
    for key in ("ttft", "added_ttft"):
        row |= {f"{key}_p50_ms": 15.0, f"{key}_p99_ms": 33.0}
    for key in ("token", "added_token"):
        row |= {f"{key}_p50_ms": 4.0, f"{key}_p99_ms": 8.0, f"{key}_p999_ms": 12.0}
    return row | extra


def test_a_burst_row_shows_each_stage_of_the_first_token_at_its_median_and_p99() -> None:
    stages = {
        "stage_to_user_message_p50_ms": 4.5,
        "stage_to_user_message_p99_ms": 21.0,
        "stage_to_started_p50_ms": 1.6,
        "stage_to_started_p99_ms": 9.0,
        "stage_to_first_chunk_p50_ms": 6.9,
        "stage_to_first_chunk_p99_ms": 30.5,
        "stage_to_viewer_p50_ms": 1.2,
        "stage_to_viewer_p99_ms": 7.7,
    }
    lines = render([_row(**stages)]).splitlines()
    assert lines[-1].split() == [
        *["time", "to", "first", "token,", "p50/p99", "ms", "per", "stage:", "request"],
        *["->", "user_message", "4.5/21.0,", "->", "started", "1.6/9.0,"],
        *["->", "first", "chunk", "6.9/30.5,", "->", "viewer", "1.2/7.7"],
    ]


def test_a_row_without_stages_has_no_stage_line_and_names_its_first_error() -> None:
    lines = render([_row(errors=2, error_sample="503 from the edge")]).splitlines()
    assert not any("per stage" in line for line in lines)
    assert lines[-1].strip() == "first error: 503 from the edge"


def _turn(at: int, turn: str) -> list[object]:
    def base(kind: str) -> dict[str, Any]:
        return {"conversation_id": "c", "event_id": f"{turn}-{kind}"}

    return [
        UserMessage(at=at, message_id=f"m{turn}", content="hi", **base("u")),
        Started(at=at + 2, turn_id=turn, user_message_id=f"m{turn}", model="demo", **base("s")),
        Title(at=at + 3, title="t", source="auto", **base("t")),
        Chunk(at=at + 5, turn_id=turn, kind="answer", text="a", **base("a")),
        Chunk(at=at + 6, turn_id=turn, kind="answer", text="b", **base("b")),
        Done(
            at=at + 9,
            turn_id=turn,
            content=[],
            stop_reason="stop",
            input_tokens=1,
            output_tokens=2,
            **base("d"),
        ),
    ]


def test_each_measured_turn_of_a_conversation_is_found_by_its_request_time() -> None:
    """`capacity` runs several turns a conversation: each request's stages come
    from the first user message stamped after it was sent, and what follows."""
    log = [*_turn(100, "a"), *_turn(200, "b"), *_turn(300, "c")]
    assert turn_marks(log, 99) == (100, 102, 105)
    assert turn_marks(log, 150) == (200, 202, 205)
    assert turn_marks(log, 300) == (300, 302, 305)
    assert turn_marks(log, 301) is None  # its turn is not in the log
    assert turn_marks(log[:-4], 250) is None  # started, but no chunk yet


def test_a_row_says_how_gathered_its_late_tokens_are_beside_the_direct_paths() -> None:
    windows = {"late_windows": 3, "windows": 247, "direct_late_windows": 15, "direct_windows": 246}
    lines = render([_row(**windows)]).splitlines()
    assert lines[-1].split() == [
        *["tokens", "later", "than", "the", "p99:", "half", "of", "them", "in", "3", "of", "247"],
        *["tenths", "of", "a", "second", "(direct:", "15", "of", "246)"],
    ]


def _measured(errors: int, ttft_p99_ms: float) -> Measured:
    zero: dict[str, Any] = {
        name: 0.0
        for name, kind in zip(
            Outcome.__struct_fields__, Outcome.__annotations__.values(), strict=True
        )
        if kind == "float"
    }
    outcome = Outcome(
        **zero,
        path="parley",
        concurrency=100,
        turns=100,
        errors=errors,
        error_sample="http 503" if errors else "",
        late_windows=0,
        windows=0,
    )
    outcome.ttft_p99_ms = ttft_p99_ms
    return Measured(outcome=outcome, usage={}, events_per_s=0.0)


def test_the_errors_of_every_round_are_counted_not_their_median() -> None:
    """Three rounds of which one failed turns: a median over rounds said 0 errors
    and the bench exited 0."""
    setup = Setup("burst", [100], 10, 50.0, 0, 0, 1.0, True, 3, ["dev"])
    rounds = [
        (_measured(0, 30.0), _measured(0, 10.0)),
        (_measured(7, 31.0), _measured(0, 10.0)),
        (_measured(0, 32.0), _measured(1, 10.0)),
    ]
    row = _system_row(setup, "dev", 100, rounds)
    assert (row["errors"], row["direct_errors"]) == (7, 1)
    assert row["error_sample"] == "http 503"
    assert row["added_ttft_p99_ms"] == 21.0  # the latencies stay medians


def test_cpu_per_token_is_the_windows_cpu_seconds_over_the_tokens_delivered_in_it() -> None:
    """A job run once is sampled over a window longer than its run (the send times
    are fetched after it): its CPU share of the window over its tokens per second of
    run read as low as the run is short of the window."""
    setup = Setup("stream", [20], 500, 0.0, 0, 0, 1.0, True, 1, ["split"])
    parley = _measured(0, 10.0)
    parley.outcome.tokens_per_s = 10_000.0
    parley.outcome.elapsed_s = 1.0  # 10,000 tokens in a run of 1 s ...
    parley.usage = {"cpu_parley_edge": 0.2, "cpu_parley_worker": 0.3, "cpu_nats": 0.1}
    # ... in a window of 2 s: 1 s of parley's CPU, 0.2 s of NATS's
    parley.cpu_s = {"parley_edge": 0.4, "parley_worker": 0.6, "nats": 0.2}
    parley.log_bytes = 2_500_000
    row = _system_row(setup, "split", 20, [(parley, _measured(0, 5.0))])
    assert row["log_bytes_per_token"] == 250.0
    assert row["parley_cpu_us_per_token"] == 100.0  # 1 s / 10,000 tokens, not 50
    assert row["nats_cpu_us_per_token"] == 20.0
    assert row["cpu_parley"] == 0.5  # the share of a core over the window stays as it was


def test_a_role_that_never_gets_ready_is_reported_with_what_its_log_said_last(
    tmp_path: Path,
) -> None:
    log = tmp_path / "edge.log"
    log.write_text("starting\ncannot reach NATS at nats://127.0.0.1:1: connection refused\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError) as caught:
            _wait_for(log, proc, b"listening", within=0.3)
    finally:
        proc.kill()
        proc.wait()
    assert "not ready within 0.3 s" in str(caught.value)
    assert "cannot reach NATS at nats://127.0.0.1:1" in str(caught.value)


def test_soak_json_is_one_object_of_flat_keys() -> None:
    """`--json` prints one object per workload with flat keys; soak's tallies of
    actions and answers came out as nested objects."""
    from parley.bench_common import flat_json
    from parley.bench_soak import SoakResult

    fields: dict[str, Any] = {
        name: 0 for name in SoakResult.__struct_fields__ if name not in ("actions", "outcomes")
    }
    fields.update(grew_most=["tuple +3"], problems=[])
    result = SoakResult(
        actions={"edit": 3, "cancel": 2}, outcomes={"message 202": 5, "regenerate 409": 1}, **fields
    )
    printed = json.loads(flat_json(result))
    assert not [key for key, value in printed.items() if isinstance(value, dict)], printed
    assert printed["actions_edit"] == 3 and printed["outcomes_message_202"] == 5, printed
    assert printed["outcomes_regenerate_409"] == 1 and printed["turns"] == 0, printed
