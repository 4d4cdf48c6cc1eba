"""A broken model stream ends the turn with a clear `failed` event, never a hang."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

import actors.turn
from actors.turn import TurnRunner
from events.log import EventLog
from events.vocabulary import Failed
from tests.sse import SseClient


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("bad_json", "bad_json"),
        ("cut", "stream_cut"),
        ("error", "model_error"),
        ("429", "http_429"),
        ("500", "http_500"),
        ("hang", "timeout"),
    ],
)
async def test_broken_model_stream_ends_the_turn_with_failed_and_sse_error_then_done(
    api: SseClient, event_log: EventLog, directive: str, code: str
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    try:
        async with asyncio.timeout(30):
            events = await api.send_stream(cid, f"please break [[fail={directive}]]")
    except TimeoutError:
        held = [f"{s.seq} {type(s.event).__name__}" for s in await event_log.read(cid)]
        raise AssertionError(f"the turn's stream did not end; the log holds {held}") from None
    names = [e.event for e in events]
    assert names[-2:] == ["error", "done"], names
    assert events[-1].data == "error"
    assert isinstance(events[-2].data, str) and events[-2].raw["code"] == code, events[-2].raw

    log = await event_log.read(cid)
    failed = [s.event for s in log if isinstance(s.event, Failed)]
    assert len(failed) == 1 and failed[0].code == code, failed
    # Text streamed before the break is kept as partial content, and billed.
    streamed = "".join(e.data for e in events if e.event == "token")
    kept = "".join(b.content for b in failed[0].content if b.role == "assistant")
    assert kept == streamed
    if directive not in ("429", "500"):
        assert failed[0].input_tokens > 0, "a call that streamed is billed even when it broke"

    message = await _assistant_row(api, cid)
    assert message["status"] == "failed" and message["error_code"] == code


async def _assistant_row(api: SseClient, cid: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            status, body = await api.request("GET", f"/v1/conversations/{cid}/messages")
            assert status == 200
            rows = [m for m in body["messages"] if m["role"] == "assistant"]
            if rows and rows[0]["status"] != "streaming":
                row: dict[str, Any] = rows[0]
                return row
            await asyncio.sleep(0.05)


async def test_a_dead_model_server_fails_the_turn_as_unreachable(
    api: SseClient, event_log: EventLog
) -> None:
    conversation = await api.create_conversation(model="unreachable-model")
    events = await api.send_stream(conversation["id"], "anyone there?")
    assert [e.event for e in events][-2:] == ["error", "done"]
    assert events[-2].raw["code"] == "unreachable", events[-2].raw
    # where the model lives is not told to the people in the conversation
    assert "127.0.0.1" not in events[-2].data and "http" not in events[-2].data, events[-2].data


async def test_the_conversation_takes_new_messages_after_a_failed_turn(api: SseClient) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    await api.send_stream(cid, "break [[fail=cut]]")
    events = await api.send_stream(cid, "and now properly [[tokens=4]]")
    assert events[-1].data == "ok"
    assert "".join(e.data for e in events if e.event == "token").split() == ["0", "1", "2", "3"]


async def test_a_turn_that_crashes_ends_failed_internal_error_at_once(
    api: SseClient, event_log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the turn's own code ends it visibly, by the worker that ran it, and
    the conversation goes on; not left for the partition's next owner to close."""
    cid = (await api.create_conversation())["id"]

    def crashes(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the turn")

    monkeypatch.setattr(actors.turn, "tool_round_messages", crashes)
    async with asyncio.timeout(30):
        events = await api.send_stream(cid, 'go [[tools=calculator{"expression": "1+1"}]]')
    monkeypatch.undo()
    assert [e.event for e in events][-2:] == ["error", "done"], events
    assert events[-2].raw["code"] == "internal_error", events[-2].raw
    ends = [s.event for s in await event_log.read(cid) if isinstance(s.event, Failed)]
    assert [e.code for e in ends] == ["internal_error"], ends

    async with asyncio.timeout(30):
        events = await api.send_stream(cid, "and now? [[tokens=3]]")
    assert events[-1].data == "ok", events


@pytest.mark.parametrize("directive", ["500", "cut"])
async def test_a_failed_turn_is_freed_at_once_not_left_to_the_collector(
    api: SseClient, directive: str
) -> None:
    """A turn whose model call fails lets go of its runner, and with it the history and
    the request body it sent, as soon as it ends. A long conversation whose history
    the provider refuses (over its context or body limit: an error status on every
    message) held each refused turn's whole history in a reference cycle (the failed
    call's exception, through its traceback, back to the frame that awaited the call)
    until a full collection, which the worker's thresholds make rare: `parley dev`
    grew by megabytes a message, to 2 GB in 150 messages of 100,000 characters."""
    cid = (await api.create_conversation())["id"]
    gc.collect()
    gc.disable()  # what is freed here is freed by reference counting alone
    try:
        async with asyncio.timeout(30):
            events = await api.send_stream(cid, f"please break [[fail={directive}]]")
        assert events[-1].data == "error", events
        turn_id = events[0].data["turn_id"]

        # the actor lets go of the runner a moment after the turn's end is in the log
        freed = asyncio.Event()
        freed.set()  # unless its runner is still there
        for held in gc.get_objects():
            if isinstance(held, TurnRunner) and held.turn_id == turn_id:
                freed.clear()
                weakref.finalize(held, freed.set)
        del held
        async with asyncio.timeout(10):
            await freed.wait()
    finally:
        gc.enable()
