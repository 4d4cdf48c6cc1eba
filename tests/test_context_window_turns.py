"""Conversations that outgrow their model's context window keep being answered.

Against the real stack: the demo model refuses a prompt over `[[context=N]]`
tokens (its words) as OpenAI refuses one (400, `context_length_exceeded`), and
the recorder (tests/conftest.py) keeps what each call sent, for a model whose
window is configured (`recorder-windowed`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Done, Failed, Started
from tests.conftest import Recorder
from tests.sse import SseClient, SseEvent

TURN_LIMIT_S = 30


async def _send(api: SseClient, cid: str, content: str) -> list[SseEvent]:
    async with asyncio.timeout(TURN_LIMIT_S):
        return await api.send_stream(cid, content)


def _one(events: list[SseEvent], name: str) -> SseEvent:
    found = [e for e in events if e.event == name]
    assert len(found) == 1, (name, [e.raw for e in events if e.event != "token"])
    return found[0]


async def test_a_conversation_longer_than_an_unknown_window_is_answered_with_its_newest_part(
    api: SseClient, event_log: EventLog
) -> None:
    """Before: from the turn whose history passed the window on, every message failed
    `http_400`, with the provider's advice to shorten "the messages". Now the refused
    call is sent once more with the oldest exchanges left out, and answered."""
    cid = (await api.create_conversation())["id"]
    for i in range(10):  # past twice the window: halving what was sent would not do
        events = await _send(api, cid, f"[[context=150]] message {i} with some more words to grow")
        assert _one(events, "done").data == "ok", [e.raw for e in events if e.event != "token"]
    log = [s.event for s in await event_log.read(cid)]
    ends = [e for e in log if isinstance(e, Done)]
    assert len(ends) == 10 and not [e for e in log if isinstance(e, Failed)]
    # the window is not known: the first call sends it all, the refused one less
    assert all(e.history_omitted == 0 for e in log if isinstance(e, Started))
    trimmed = [e.history_omitted for e in ends]
    assert trimmed[:3] == [0, 0, 0] and all(n > 0 for n in trimmed[3:]), trimmed
    assert all(n % 2 == 0 for n in trimmed), "whole exchanges (a question and its answer)"
    # viewers are told, beside the `done`'s data
    assert _one(events, "done").raw["history_omitted"] == trimmed[-1]


async def test_a_history_refused_even_without_its_oldest_part_fails_as_too_long(
    api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    assert _one(await _send(api, cid, "[[context=500]] hello"), "done").data == "ok"
    # the personal system prompt (24 words) and this message (4) do not fit in 26
    events = await _send(api, cid, "[[context=26]] still too long")
    error = _one(events, "error")
    assert error.raw["code"] == "context_length_exceeded", error.raw
    assert "too long for the model demo" in error.data and "new conversation" in error.data
    assert _one(events, "done").data == "error"
    failed = [s.event for s in await event_log.read(cid) if isinstance(s.event, Failed)]
    assert len(failed) == 1 and failed[0].code == "context_length_exceeded"
    # two calls, both refused before any byte: nothing to bill
    assert (failed[0].input_tokens, failed[0].output_tokens) == (0, 0)
    assert failed[0].history_omitted == 2  # the second call left the first exchange out
    # and the conversation goes on
    assert _one(await _send(api, cid, "[[context=500]] again"), "done").data == "ok"


async def test_a_first_message_refused_for_length_fails_at_once_as_too_long(
    api: SseClient, event_log: EventLog
) -> None:
    """Nothing to leave out: the same request is not sent again."""
    cid = (await api.create_conversation())["id"]
    events = await _send(api, cid, "[[context=10]] the prompt alone is over ten words")
    assert _one(events, "error").raw["code"] == "context_length_exceeded"
    failed = [s.event for s in await event_log.read(cid) if isinstance(s.event, Failed)]
    assert failed[0].history_omitted == 0


async def test_a_known_window_trims_the_history_before_the_model_is_asked(
    api: SseClient, event_log: EventLog, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    cid = (await api.create_conversation(model="recorder-windowed"))["id"]
    mark = new_id()
    sent: list[str] = []
    for i in range(6):
        # 1,000 bytes first (the rate is not measured yet: a token a byte), then 8,000
        size = 1_000 if i == 0 else 8_000
        content = f"{mark} {i} " + "x" * size
        sent.append(content)
        events = await _send(api, cid, content)
        assert _one(events, "done").data == "ok", [e.raw for e in events if e.event != "token"]
        started = _one(events, "started")
        request = _request_ending_with(recording, content)
        users = [m["content"] for m in request["messages"] if m["role"] == "user"]
        non_system = [m for m in request["messages"] if m["role"] != "system"]
        # what was sent is the newest exchanges, whole, then this message
        assert users == sent[len(sent) - len(users) :], [u[:30] for u in users]
        assert non_system[0]["role"] == "user"
        omitted = 2 * i - (len(non_system) - 1)
        assert started.raw.get("history_omitted", 0) == omitted, (i, started.raw)
    log = [s.event for s in await event_log.read(cid)]
    planned = [e.history_omitted for e in log if isinstance(e, Started)]
    assert planned[-1] > 0, planned
    # planned before the call, and nothing more was left out later: nothing refused
    assert [e.history_omitted for e in log if isinstance(e, Done)] == planned


async def test_a_message_that_cannot_fit_a_known_window_ends_before_the_model_is_asked(
    api: SseClient, event_log: EventLog, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    cid = (await api.create_conversation(model="recorder-windowed"))["id"]
    # over the room at a token a byte, not at the fewest tokens text takes: sent, and
    # the provider decides (it would take 5,000 bytes in 1,250 tokens or so)
    guess = f"{new_id()} " + "y" * 5_000
    assert _one(await _send(api, cid, guess), "done").data == "ok"
    assert _request_ending_with(recording, guess)
    # over the window even at the fewest tokens chat text takes (one in 8 bytes)
    content = f"{new_id()} " + "y" * 40_000
    events = await _send(api, cid, content)
    error = _one(events, "error")
    assert error.raw["code"] == "context_length_exceeded", error.raw
    assert "This message is too long for the model recorder-windowed" in error.data, error.data
    assert not [r for r in recording.requests if _last_user(r) == content]
    failed = [s.event for s in await event_log.read(cid) if isinstance(s.event, Failed)]
    assert (failed[0].input_tokens, failed[0].output_tokens) == (0, 0)


def _last_user(request: dict[str, Any]) -> str | None:
    users = [m for m in request["messages"] if m.get("role") == "user"]
    return users[-1]["content"] if users else None


def _request_ending_with(recording: Recorder, content: str) -> dict[str, Any]:
    found = [r for r in recording.requests if _last_user(r) == content]
    assert len(found) == 1, len(found)
    return found[0]


async def test_a_refusal_for_an_answer_that_fills_the_window_says_so_and_is_not_sent_again(
    api: SseClient, event_log: EventLog, recorder: tuple[Recorder, str]
) -> None:
    """A model whose max_output_tokens (1234 for `recorder`) is not below the window its
    server has: vLLM refuses every request, naming the window. Before, the turn sent
    the history again without its earlier exchanges, was refused again, and told the
    user the conversation was too long (a new conversation got the same)."""
    recording, _ = recorder
    cid = (await api.create_conversation(model="recorder"))["id"]
    assert _one(await _send(api, cid, f"{new_id()} first"), "done").data == "ok"
    content = f"{new_id()} second"
    refusal = {
        "object": "error",
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 1234. This model's"
        " maximum context length is 1024 tokens and your request has 40 input tokens"
        " (1234 > 1024 - 40).",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    recording.script(content, (400, msgspec.json.encode(refusal)))
    events = await _send(api, cid, content)
    error = _one(events, "error")
    assert error.raw["code"] == "context_length_exceeded", error.raw
    assert "max_output_tokens" in error.data and "configuration" in error.data, error.data
    assert "new conversation" not in error.data
    # one call: leaving the earlier exchange out cannot make room the answer takes
    assert len([r for r in recording.requests if _last_user(r) == content]) == 1
    failed = [s.event for s in await event_log.read(cid) if isinstance(s.event, Failed)]
    assert (failed[0].input_tokens, failed[0].output_tokens) == (0, 0)
