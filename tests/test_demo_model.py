"""The demo model, driven through the real streaming client over real HTTP.

These pin the script that `parley dev`, the other tests and the benchmark rely
on: echoing answers with thinking, a tool-call round, exact token counts, and
each `[[fail=...]]` directive arriving as the client error it stands for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from actors.errors import ModelStreamError
from actors.model_client import ChatRequest, ModelEndpoint, stream_chat
from actors.model_stream import Finish, StreamItem, TextDelta, ToolCallRequest, Usage
from parley.demo_model import DemoConfig, create_demo_app, start_demo_model

CALL_LIMIT_S = 5.0
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_current_time",
            "description": "The current time.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


class Demo:
    def __init__(self, base_url: str, emit_log: dict[str, list[int]]) -> None:
        self.base_url = base_url
        self.emit_log = emit_log


@pytest_asyncio.fixture(scope="module")
async def demo() -> AsyncIterator[Demo]:
    emit_log: dict[str, list[int]] = {}
    runner, base_url = await start_demo_model("127.0.0.1", 0, DemoConfig(tokens_per_s=0), emit_log)
    yield Demo(base_url, emit_log)
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module")
async def paced_demo() -> AsyncIterator[str]:
    """A demo model at 200 tokens/s that does not think unless told to."""
    runner, base_url = await start_demo_model(
        "127.0.0.1", 0, DemoConfig(tokens_per_s=200, think=False)
    )
    yield base_url
    await runner.cleanup()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def ask(
    session: aiohttp.ClientSession,
    base_url: str,
    messages: list[dict[str, Any]] | str,
    *,
    tools: list[dict[str, Any]] | None = None,
    **timeouts: float,
) -> list[StreamItem]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    request = ChatRequest(messages=messages, tools=tools or [])
    async with asyncio.timeout(CALL_LIMIT_S):
        return [
            item
            async for item in stream_chat(
                session, ModelEndpoint(base_url=base_url, model="demo"), request, **timeouts
            )
        ]


def text(items: list[StreamItem], kind: str) -> str:
    return "".join(i.text for i in items if isinstance(i, TextDelta) and i.kind == kind)


def finish(reason: str, items: list[StreamItem]) -> Finish:
    """The Finish a stream of `items` ends with: its thinking streamed as reasoning_content."""
    return Finish(reason, text(items, "thinking") or None)


def usage(items: list[StreamItem]) -> Usage:
    found = [i for i in items if isinstance(i, Usage)]
    assert len(found) == 1, f"expected one usage item, saw {found}"
    return found[0]


# ------------------------------------------------------------ the script


async def test_base_url_carries_the_bound_port_and_lists_the_model(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    assert demo.base_url.startswith("http://127.0.0.1:") and demo.base_url.endswith("/v1")
    assert not demo.base_url.endswith(":0/v1")
    async with asyncio.timeout(CALL_LIMIT_S), session.get(demo.base_url + "/models") as response:
        models = await response.json()
    assert [m["id"] for m in models["data"]] == ["demo"]


async def test_default_answer_thinks_first_then_echoes_the_user_word_by_word(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    items = await ask(session, demo.base_url, "Tell me about otters please")
    kinds = [i.kind for i in items if isinstance(i, TextDelta)]
    assert kinds[0] == "thinking" and "thinking" not in kinds[kinds.index("answer") :]
    assert "Tell me about otters please" in text(items, "answer")
    answer_deltas = [i.text for i in items if isinstance(i, TextDelta) and i.kind == "answer"]
    assert all(d.count(" ") <= 1 and d.strip() for d in answer_deltas[:-1])
    assert all(d.endswith(" ") for d in answer_deltas[:-1]), "each delta is a word and its space"
    assert items[-2:] == [finish("stop", items), Usage(5, len(kinds))]  # 5 words asked


async def test_no_thinking_when_the_config_says_so(
    paced_demo: str, session: aiohttp.ClientSession
) -> None:
    items = await ask(session, paced_demo, "hi")
    assert text(items, "thinking") == "" and "hi" in text(items, "answer")


async def test_calculator_round_calls_the_tool_then_answers_with_its_result(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    question: dict[str, Any] = {"role": "user", "content": "Please calculate 2+3*4"}
    first = await ask(session, demo.base_url, [question], tools=TOOLS)
    calls = [i for i in first if isinstance(i, ToolCallRequest)]
    assert [(c.call_id, c.name) for c in calls] == [("call_1", "calculator")]
    assert json.loads(calls[0].arguments) == {"expression": "2+3*4"}
    assert first[-2:] == [finish("tool_calls", first), Usage(3, usage(first).output_tokens)]

    history: list[dict[str, Any]] = [
        question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0].call_id,
                    "type": "function",
                    "function": {"name": calls[0].name, "arguments": calls[0].arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "14"},
    ]
    second = await ask(session, demo.base_url, history, tools=TOOLS)
    assert not [i for i in second if isinstance(i, ToolCallRequest)]
    assert text(second, "answer") == "The result is 14."
    assert finish("stop", second) in second


async def test_time_question_calls_get_current_time_only_when_offered(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    offered = await ask(session, demo.base_url, "What time is it?", tools=TOOLS)
    assert [(i.name, i.arguments) for i in offered if isinstance(i, ToolCallRequest)] == [
        ("get_current_time", "{}")
    ]
    not_offered = await ask(session, demo.base_url, "What time is it?")
    assert not [i for i in not_offered if isinstance(i, ToolCallRequest)]
    assert finish("stop", not_offered) in not_offered


async def test_tool_call_ids_count_up_through_the_conversation(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    earlier_call = {"id": "call_1", "type": "function", "function": {"name": "calculator"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "calculate 1+1"},
        {"role": "assistant", "content": None, "tool_calls": [earlier_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        {"role": "assistant", "content": "The result is 2."},
        {"role": "user", "content": "now compute 6*7"},
    ]
    items = await ask(session, demo.base_url, messages, tools=TOOLS)
    calls = [i for i in items if isinstance(i, ToolCallRequest)]
    assert [(c.call_id, json.loads(c.arguments)) for c in calls] == [
        ("call_2", {"expression": "6*7"})
    ]


@pytest.mark.parametrize("count", [0, 1, 57])
async def test_tokens_directive_streams_exactly_n_numbered_deltas_and_bills_them(
    demo: Demo, session: aiohttp.ClientSession, count: int
) -> None:
    items = await ask(session, demo.base_url, f"count for me [[tokens={count}]]")
    deltas = [i for i in items if isinstance(i, TextDelta)]
    assert deltas == [TextDelta("answer", f"{i} ") for i in range(count)]
    assert usage(items).output_tokens == count
    assert finish("stop", items) in items


async def test_think_tags_directive_puts_thinking_in_content_that_the_client_splits(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    items = await ask(session, demo.base_url, "[[tokens=3]] [[think-tags]]")
    assert text(items, "answer") == "0 1 2 "
    thinking = text(items, "thinking")
    assert thinking and "<" not in thinking and ">" not in thinking, thinking


async def test_think_directive_adds_thinking_to_a_token_count(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    items = await ask(session, demo.base_url, "[[tokens=2]][[think]]")
    assert text(items, "thinking") and text(items, "answer") == "0 1 "


@pytest.mark.parametrize(
    ("fail", "code", "partial"),
    [
        ("bad_json", "bad_json", True),
        ("cut", "stream_cut", True),
        ("error", "model_error", True),
        ("hang", "timeout", True),
        ("429", "http_429", False),
        ("500", "http_500", False),
    ],
)
async def test_fail_directive_reaches_the_client_as_its_error(
    demo: Demo, session: aiohttp.ClientSession, fail: str, code: str, partial: bool
) -> None:
    endpoint = ModelEndpoint(base_url=demo.base_url, model="demo")
    request = ChatRequest(messages=[{"role": "user", "content": f"hello [[fail={fail}]]"}])
    items: list[StreamItem] = []
    started = time.monotonic()
    with pytest.raises(ModelStreamError) as info:
        async with asyncio.timeout(CALL_LIMIT_S):
            async for item in stream_chat(session, endpoint, request, idle_timeout=0.2):
                items.append(item)
    error = info.value
    assert error.code == code, f"expected {code!r}, saw {error.code!r}: {error.message}"
    assert bool(items) == partial, f"expected text before the failure: {partial}, saw {items}"
    assert time.monotonic() - started < 2
    if fail in ("429", "500"):
        assert (error.status, error.retryable) == (int(fail), True)


async def test_bench_directive_logs_a_send_time_for_every_answer_delta(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    before = time.perf_counter_ns()
    await ask(session, demo.base_url, "[[tokens=20]] [[bench=run-1]]")
    stamps = demo.emit_log["run-1"]
    assert len(stamps) == 20 and stamps == sorted(stamps) and stamps[0] >= before


async def test_at_full_speed_an_answer_leaves_many_events_to_a_write(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    """A write per token made the demo model the bound of `bench stream` (0.4-0.5 of
    a core, a quarter of its samples in write system calls). At full speed its
    events now leave 32 to a write, as a fast provider's arrive many to a read: each
    token is still an event of its own, in order, stamped when its write left."""
    items = await ask(session, demo.base_url, "[[tokens=100]] [[bench=full-speed]]")
    assert text(items, "answer").split() == [str(i) for i in range(100)]
    stamps = demo.emit_log["full-speed"]
    assert len(stamps) == 100 and stamps == sorted(stamps)
    # 100 answer tokens behind the thinking, in writes of 32: four or five writes
    assert len(set(stamps)) <= 5, len(set(stamps))


async def test_tokens_per_second_paces_the_stream(
    paced_demo: str, session: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    items = await ask(session, paced_demo, "[[tokens=21]]")
    elapsed = time.monotonic() - started
    # 21 deltas at 200/s: 20 intervals of 5 ms after the first.
    assert len(items) == 23 and 0.095 <= elapsed < 1.0, f"expected ~0.1 s, saw {elapsed:.3f} s"


async def test_non_streaming_request_gets_an_openai_style_400(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    async with (
        asyncio.timeout(CALL_LIMIT_S),
        session.post(demo.base_url + "/chat/completions", json=body) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert "stream" in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("max_tokens", [0, 10])
async def test_a_prompt_over_the_context_window_is_refused_as_openai_refuses_it(
    demo: Demo, session: aiohttp.ClientSession, max_tokens: int
) -> None:
    """`[[context=N]]`: the prompt's words and `max_tokens` must fit in N, or a 400 with
    OpenAI's `context_length_exceeded` comes before any byte of an answer."""
    words = "one two three four five six seven eight nine ten [[context=20]]"
    body: dict[str, Any] = {"model": "demo", "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    fits = [{"role": "user", "content": words}]
    assert text(await ask(session, demo.base_url, fits), "answer")
    too_long = [{"role": "user", "content": words}, *fits] if not max_tokens else fits
    async with (
        asyncio.timeout(CALL_LIMIT_S),
        session.post(
            demo.base_url + "/chat/completions", json={**body, "messages": too_long}
        ) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "context_length_exceeded", error
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert error["message"].startswith("This model's maximum context length is 20 tokens.")


async def test_the_configured_context_window_refuses_as_the_directive_does(
    session: aiohttp.ClientSession,
) -> None:
    runner, base_url = await start_demo_model(
        "127.0.0.1", 0, DemoConfig(tokens_per_s=0, context_window=5)
    )
    try:
        assert text(await ask(session, base_url, "four words fit here"), "answer")
        with pytest.raises(ModelStreamError) as info:
            await ask(session, base_url, "six words do not fit here")
    finally:
        await runner.cleanup()
    assert info.value.status == 400 and "maximum context length is 5" in info.value.message


@pytest.mark.parametrize("directive", ["", "[[fail=hang]]"])
async def test_client_leaving_mid_stream_leaves_no_traceback_in_the_server_log(
    paced_demo: str,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    directive: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = ModelEndpoint(base_url=paced_demo, model="demo")
    request = ChatRequest(messages=[{"role": "user", "content": f"[[tokens=500]] {directive}"}])
    stream = stream_chat(session, endpoint, request)
    async with asyncio.timeout(CALL_LIMIT_S), contextlib.aclosing(stream):
        async for _ in stream:
            break
    async with asyncio.timeout(CALL_LIMIT_S):  # the server notices within a write or a hang poll
        while not any(  # noqa: ASYNC110
            r.name == "parley.demo_model" and "went away" in r.getMessage() for r in caplog.records
        ):
            await asyncio.sleep(0.01)
    # the demo server's own records (and aiohttp's, which serves it); parley's roles
    # share this process and may log about other tests' turns
    noisy = [
        r
        for r in caplog.records
        if r.name.startswith(("parley.demo_model", "aiohttp"))
        and (r.levelno >= logging.WARNING or r.exc_info)
    ]
    assert noisy == [], [f"{r.name}: {r.getMessage()}" for r in noisy]


async def test_create_demo_app_serves_under_any_runner(session: aiohttp.ClientSession) -> None:
    runner = web.AppRunner(create_demo_app(DemoConfig(tokens_per_s=0, think=False)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        items = await ask(session, f"http://127.0.0.1:{runner.addresses[0][1]}/v1", "[[tokens=2]]")
        assert text(items, "answer") == "0 1 "
    finally:
        await runner.cleanup()
