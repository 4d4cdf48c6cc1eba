"""The tool registry, the built-in tools and the runner: every failure is an answer the
model can read, and no tool can stall the worker."""

from __future__ import annotations

import asyncio
import enum
import json
import threading
import time
from typing import Any

import msgspec
import pytest

from actors.builtin_tools import BUILTIN_TOOLS, calculator, evaluate
from actors.tools import (
    Tool,
    ToolContext,
    ToolError,
    ToolLoadError,
    ToolMessage,
    ToolOutcome,
    ToolReply,
    ToolRunner,
    define_tool,
    load_tools,
    merge_tools,
)

CTX = ToolContext(
    conversation_id="c",
    user_id="u",
    project_id=None,
    now_ns=1_795_704_964_000_000_000,
    messages=(
        ToolMessage("m1", "user", "How do I rotate the staging API keys?"),
        ToolMessage("a1", "assistant", "Open the project settings, then Keys."),
        ToolMessage("m2", "user", "And what about the production keys? keys keys"),
    ),
)
RUNNER = ToolRunner(BUILTIN_TOOLS)


async def run_tool(
    tools: dict[str, Tool] | ToolRunner, name: str, arguments: str, ctx: ToolContext
) -> Any:
    runner = tools if isinstance(tools, ToolRunner) else ToolRunner(tools.values())
    return await runner.run(name, arguments, ctx)


TOOLS = RUNNER


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("7/2", 3.5),
        ("7//2", 3),
        ("-3**2", -9),
        ("2**10", 1024),
        ("1.5*2", 3),
        ("2**1000", 2**1000),
        ("2**4095+(2**4095-1)", 2**4096 - 1),
        ("1**100000", 1),
        ("1.5**150", 1.5**150),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "a+1",
        "2**4096",
        "2**4095+2**4095",
        "1/0",
        "[1,2]",
        "2+",
        "x" * 300,
        "(lambda: 1)()",
        # bounded work: each of these would hold the event loop for a long time
        "(((9**99)**99)**99)**99",
        "(9**99)**99",
        "99999999999999999999**99",
        "(2**99*2**99*2**99*2**99)**50",
        "1e308*10",
        "10.0**400",
        "(-8)**0.5",
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises(ToolError):
        evaluate(expression)


@pytest.mark.parametrize(
    ("expression", "shown"),
    [
        ("10**20/3", "3.333333333333333e+19"),
        ("1e23", "1e+23"),
        ("0.1*3*10**20", "3.0000000000000004e+19"),
        ("2.0**53", "9007199254740992"),
        ("6*7.0", "42"),
    ],
)
def test_a_float_is_shown_as_an_integer_only_where_its_digits_are_exact(
    expression: str, shown: str
) -> None:
    assert calculator(expression) == shown


async def test_the_clock_tool_reads_the_injected_time() -> None:
    outcome = await run_tool(TOOLS, "get_current_time", "{}", CTX)
    assert outcome == type(outcome)(result="2026-11-26T14:56:04+00:00")


@pytest.mark.parametrize(
    ("name", "arguments", "fragment"),
    [
        ("no_such_tool", "{}", "unknown tool"),
        ("calculator", "{not json", "not valid JSON"),
        ("calculator", '{"expression": ' + "1" * 5000 + "}", "not valid JSON"),
        ("calculator", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ("calculator", "[1]", "JSON object"),
        ("calculator", '{"expression": 5}', "expression"),
        ("calculator", '{"expression": "1/0"}', "division by zero"),
    ],
)
async def test_tool_failures_become_errors_for_the_model(
    name: str, arguments: str, fragment: str
) -> None:
    outcome = await run_tool(TOOLS, name, arguments, CTX)
    assert outcome.result is None and outcome.error is not None and fragment in outcome.error


async def test_a_crashing_tool_is_an_error_result_not_a_crashed_turn() -> None:
    async def broken(args: dict[str, Any], ctx: ToolContext) -> str:
        raise RuntimeError("bug")

    tools = {"broken": Tool(name="broken", description="", parameters={}, handler=broken)}
    outcome = await run_tool(tools, "broken", "{}", CTX)
    assert outcome.error == "tool 'broken' failed: RuntimeError"


async def test_a_slow_tool_is_abandoned_with_an_error_at_its_time_limit() -> None:
    import asyncio

    async def slow(args: dict[str, Any], ctx: ToolContext) -> str:
        await asyncio.sleep(60)
        return "never"

    tools = {"slow": Tool(name="slow", description="", parameters={}, handler=slow, timeout_s=0.05)}
    outcome = await run_tool(tools, "slow", "{}", CTX)
    assert outcome.result is None and outcome.error == "tool 'slow' took longer than 0.05s"


async def test_a_huge_tool_result_is_cut_to_its_limit() -> None:
    async def chatty(args: dict[str, Any], ctx: ToolContext) -> str:
        return "x" * 1000

    tools = {
        "chatty": Tool(
            name="chatty", description="", parameters={}, handler=chatty, max_result_chars=100
        )
    }
    outcome = await run_tool(tools, "chatty", "{}", CTX)
    assert outcome.result == "x" * 100 + "\n[... 900 characters cut]", outcome


# ---------------------------------------------------------------- the registry


class Forecast(msgspec.Struct, frozen=True):
    city: str
    days: int = 3


async def forecast(args: Forecast, ctx: ToolContext) -> str:
    """The weather in a city for the next days.

    Longer notes that the model does not need.
    """
    return json.dumps({"city": args.city, "days": args.days, "user": ctx.user_id})


def test_a_tool_from_a_struct_has_the_structs_schema_and_the_docstrings_first_paragraph() -> None:
    tool = define_tool(forecast)
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "forecast",
            "description": "The weather in a city for the next days.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer", "default": 3},
                },
                "required": ["city"],
            },
        },
    }


async def test_a_struct_tool_gets_its_arguments_converted_and_checked() -> None:
    runner = ToolRunner([define_tool(forecast)])
    ok = await runner.run("forecast", '{"city": "Oslo"}', CTX)
    assert json.loads(ok.result or "") == {"city": "Oslo", "days": 3, "user": "u"}
    bad = await runner.run("forecast", '{"city": 7}', CTX)
    assert bad.result is None and bad.error is not None and "invalid arguments" in bad.error


async def test_a_struct_tool_may_take_the_context_anywhere_or_not_at_all() -> None:
    """`define_tool` takes `handler(args: Struct)` without a context; it was called with
    one anyway and every call failed with a TypeError (and `handler(ctx, args)` got
    them swapped)."""

    def city_only(args: Forecast) -> str:
        """The city asked for."""
        return args.city

    async def context_first(ctx: ToolContext, args: Forecast) -> str:
        """Who asked, for which city."""
        return f"{ctx.user_id}:{args.city}:{args.days}"

    runner = ToolRunner([define_tool(city_only), define_tool(context_first), define_tool(forecast)])
    assert await runner.run("city_only", '{"city": "Oslo"}', CTX) == ToolOutcome(result="Oslo")
    first = await runner.run("context_first", '{"city": "Bergen", "days": 2}', CTX)
    assert first == ToolOutcome(result="u:Bergen:2")
    usual = await runner.run("forecast", '{"city": "Oslo"}', CTX)
    assert json.loads(usual.result or "") == {"city": "Oslo", "days": 3, "user": "u"}


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(msgspec.Struct):
    x: float
    y: float


class Outline(msgspec.Struct):
    """A node of an outline: it holds outlines of its own."""

    title: str
    children: list[Outline] = []


class Drawing(msgspec.Struct):
    points: list[Point]
    colour: Colour = Colour.RED
    anchor: Point | None = None
    outline: Outline | None = None
    default: str = "a field named like a keyword"


def _references(node: object) -> list[str]:
    if isinstance(node, list):
        return [ref for item in node for ref in _references(item)]
    if not isinstance(node, dict):
        return []
    own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    return own + [ref for value in node.values() for ref in _references(value)]


def test_a_schema_with_nested_structs_and_enums_is_whole_by_itself() -> None:
    """A model's API refuses a tool whose parameters refer to a component they do not
    carry ("Point", "Colour"), and with it every turn that offers the tool."""

    def draw(args: Drawing) -> str:
        """Draw."""
        return "drawn"

    def mark(at: Point, colour: Colour, near: list[Point] | None = None) -> str:
        """Mark a point."""
        return "marked"

    point = {
        "type": "object",
        "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
        "required": ["x", "y"],
    }
    drawing = define_tool(draw).parameters
    assert drawing["properties"]["points"] == {"type": "array", "items": point}
    assert drawing["properties"]["colour"] == {"enum": ["blue", "red"], "default": "red"}
    assert drawing["properties"]["anchor"]["anyOf"][0] == point
    assert drawing["properties"]["default"] == {
        "type": "string",
        "default": "a field named like a keyword",
    }
    marking = define_tool(mark).parameters
    assert marking["properties"]["at"] == point
    assert marking["properties"]["near"]["anyOf"][0] == {"type": "array", "items": point}
    for schema in (drawing, marking):
        for ref in _references(schema):
            # only a type that holds itself is referred to, and what it names is sent
            assert ref.startswith("#/$defs/"), ref
            assert ref.removeprefix("#/$defs/") in schema["$defs"], ref
    assert _references(drawing) and _references(marking) == []
    outline = drawing["$defs"]["Outline"]
    assert outline["properties"]["children"]["items"] == {"$ref": "#/$defs/Outline"}


def add(a: int, b: int = 1) -> str:
    """Add two integers."""
    return str(a + b)


async def test_a_tool_from_a_typed_signature_refuses_unknown_and_missing_arguments() -> None:
    tool = define_tool(add)
    assert tool.parameters["required"] == ["a"]
    assert tool.parameters["properties"] == {
        "a": {"type": "integer"},
        "b": {"type": "integer", "default": 1},
    }
    runner = ToolRunner([tool])
    assert (await runner.run("add", '{"a": 2, "b": 3}', CTX)).result == "5"
    assert "invalid arguments" in ((await runner.run("add", '{"b": 3}', CTX)).error or "")
    assert "invalid arguments" in ((await runner.run("add", '{"a": 1, "c": 2}', CTX)).error or "")


async def test_a_sync_tool_works_in_a_thread_and_the_event_loop_stays_free() -> None:
    threads: list[str] = []
    finished = threading.Event()

    def busy(seconds: float) -> str:
        """Hold a CPU for a while."""
        threads.append(threading.current_thread().name)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        finished.set()
        return "done"

    runner = ToolRunner([define_tool(busy)])
    ticks = 0  # the loop's turns while the tool was still running: none if it held the loop

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            if not finished.is_set():
                ticks += 1

    ticking = asyncio.create_task(ticker())
    outcome = await runner.run("busy", '{"seconds": 0.3}', CTX)
    ticking.cancel()
    assert outcome.result == "done"
    assert threads and threads[0] != threading.main_thread().name
    # (how many depends on what else the machine runs: the thread holds the GIL but
    # for Python's switch interval, and a loaded machine gives the loop few turns)
    assert ticks >= 1, "the event loop was blocked while the tool ran"


async def test_a_sync_tool_that_hangs_holds_only_its_own_slots_never_the_loops_threads() -> None:
    released = threading.Event()
    hanging: set[threading.Thread] = set()

    def stuck(x: str = "") -> str:
        """Wait for something that does not come."""
        hanging.add(threading.current_thread())
        released.wait(30)
        return "late"

    runner = ToolRunner([define_tool(stuck, timeout_s=0.2, max_concurrency=2), *BUILTIN_TOOLS])
    try:
        # more hung calls than the loop's shared executor has threads on this machine
        outcomes = await asyncio.gather(*(runner.run("stuck", "{}", CTX) for _ in range(12)))
        assert {o.error for o in outcomes} == {"tool 'stuck' took longer than 0.2s"}
        assert len(hanging) == 2, (
            f"a hung tool holds its own slots only, not {len(hanging)} threads"
        )
        # other tools and the loop's own threads are free while those two hang
        async with asyncio.timeout(2):
            assert (await runner.run("calculator", '{"expression": "1+1"}', CTX)).result == "2"
            assert await asyncio.to_thread(lambda: "free") == "free"
        assert all(t.daemon for t in hanging), "a hung tool must not keep the process from exiting"
    finally:
        released.set()
    # once its threads end, the tool's slots are back
    for thread in hanging:
        await asyncio.to_thread(thread.join, 5)
    assert (await runner.run("stuck", "{}", CTX)).result == "late"


async def test_a_tools_text_with_a_lone_surrogate_is_made_encodable() -> None:
    outside: str = json.loads('"a\\ud800b"')  # what json.loads makes of outside data

    def echo(text: str) -> str:
        """Echo."""
        return outside

    def refuse(text: str) -> str:
        """Refuse."""
        raise ToolError(f"no such thing as {outside}")

    async def rename(text: str) -> ToolReply:
        """Rename."""
        return ToolReply(result="ok", set_title=outside)

    runner = ToolRunner([define_tool(echo), define_tool(refuse), define_tool(rename)])
    assert (await runner.run("echo", '{"text": ""}', CTX)).result == "a\ufffdb"
    assert (await runner.run("refuse", '{"text": ""}', CTX)).error == "no such thing as a\ufffdb"
    assert (await runner.run("rename", '{"text": ""}', CTX)).set_title == "a\ufffdb"


async def test_calls_of_one_round_run_concurrently_within_a_tools_limit() -> None:
    running = 0
    most = 0

    async def wait(ms: int) -> str:
        """Wait."""
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(ms / 1000)
        running -= 1
        return "ok"

    runner = ToolRunner([define_tool(wait, max_concurrency=3)])
    began = time.perf_counter()
    outcomes = await asyncio.gather(*(runner.run("wait", '{"ms": 100}', CTX) for _ in range(6)))
    elapsed = time.perf_counter() - began
    assert [o.result for o in outcomes] == ["ok"] * 6
    assert most == 3, f"expected 3 at once, saw {most}"
    assert elapsed < 0.5, f"six 100 ms calls three at a time took {elapsed:.2f}s"


async def test_a_tool_that_returns_something_else_than_text_is_an_error() -> None:
    async def number() -> int:
        """A number, wrongly."""
        return 42

    outcome = await ToolRunner([define_tool(number)]).run("number", "{}", CTX)
    assert outcome.error == "tool 'number' returned int, not text"


def test_tools_named_by_module_path_are_loaded_and_may_replace_a_built_in() -> None:
    loaded = load_tools(["tests.tool_plugin:TOOLS", "tests.tool_plugin:make_tools"])
    names = [tool.name for tool in loaded]
    assert names == ["shout", "calculator", "reverse"], names
    merged = {tool.name: tool for tool in merge_tools(BUILTIN_TOOLS, loaded)}
    assert merged["calculator"].description == "A deployment's own calculator."
    assert {"get_current_time", "search_messages", "set_title", "shout", "reverse"} <= set(merged)


def test_a_bad_tool_spec_says_what_is_wrong() -> None:
    with pytest.raises(ToolLoadError, match="module:attribute"):
        load_tools(["no-colon-here"])
    with pytest.raises(ToolLoadError, match="int is not a Tool"):
        load_tools(["tests.tool_plugin:NOT_A_TOOL"])
    with pytest.raises(ToolLoadError, match=r"no module named 'tests\.no_such_plugin'"):
        load_tools(["tests.no_such_plugin:TOOLS"])
    with pytest.raises(ToolLoadError, match=r"'tests\.tool_plugin' has no attribute 'NOPE'"):
        load_tools(["tests.tool_plugin:NOPE"])


@pytest.mark.parametrize("name", ["look up", "order/lookup", "ünïcode", "x" * 65])
def test_a_tool_name_a_model_api_refuses_is_refused_where_the_tool_is_made(name: str) -> None:
    """OpenAI-compatible APIs take `^[a-zA-Z0-9_-]{1,64}$` and refuse the whole request
    otherwise: one such tool would fail every turn, since every call offers them all."""
    with pytest.raises(ValueError, match="is not 1 to 64 letters"):
        define_tool(add, name=name)


def test_a_badly_named_tool_of_a_module_stops_its_loading_in_one_line() -> None:
    with pytest.raises(ToolLoadError, match=r"BAD_NAME' \(PARLEY_TOOLS\): tool name 'zz search'"):
        load_tools(["tests.tool_plugin_badly_named:BAD_NAME"], use_entry_points=False)


def test_a_hand_made_tool_with_a_name_a_model_api_refuses_stops_the_loading() -> None:
    with pytest.raises(
        ToolLoadError, match=r"BADLY_NAMED' \(PARLEY_TOOLS\): tool name 'look up/order'"
    ):
        load_tools(["tests.tool_plugin:BADLY_NAMED"], use_entry_points=False)
    assert define_tool(add, name="A-valid_name-" + "x" * 51).name.endswith("x")


def test_two_of_a_deployments_tools_with_one_name_stop_the_loading() -> None:
    """The later silently replaced the earlier: a tool the deployment installed was
    never offered, and nothing said so."""
    with pytest.raises(ToolLoadError, match="two tools are named 'shout'") as refused:
        load_tools(["tests.tool_plugin:TOOLS", "tests.tool_plugin:SHOUT_TOO"])
    assert "'tests.tool_plugin:TOOLS'" in str(refused.value)
    assert "'tests.tool_plugin:SHOUT_TOO'" in str(refused.value)
    # the same tools named twice (an entry point, and PARLEY_TOOLS too) are one
    twice = load_tools(["tests.tool_plugin:TOOLS", "tests.tool_plugin:TOOLS"])
    assert [tool.name for tool in twice] == ["shout", "calculator"]


# ---------------------------------------------------------------- built-ins


async def test_search_finds_the_conversations_messages_best_first() -> None:
    outcome = await RUNNER.run("search_messages", '{"query": "production keys"}', CTX)
    found = json.loads(outcome.result or "")
    # most matching words first; a tie goes to the newer message
    assert [m["message_id"] for m in found["matches"]] == ["m2", "a1", "m1"], found
    assert found["total"] == 3
    empty = await RUNNER.run("search_messages", '{"query": "!!"}', CTX)
    assert empty.error == "the query has no words to search for"


async def test_set_title_names_the_conversation() -> None:
    outcome = await RUNNER.run("set_title", '{"title": "  Key   rotation "}', CTX)
    assert outcome.set_title == "Key rotation" and outcome.error is None
    refused = await RUNNER.run("set_title", json.dumps({"title": "x" * 300}), CTX)
    assert refused.set_title is None and "at most 200" in (refused.error or "")
