"""The built-in tools and the tool runner: every failure is an answer the model can read."""

from __future__ import annotations

from typing import Any

import pytest

from actors.tools import BUILTIN_TOOLS, Tool, ToolContext, ToolError, evaluate, run_tool

CTX = ToolContext(
    conversation_id="c", user_id="u", project_id=None, now_ns=1_795_704_964_000_000_000
)
TOOLS = {tool.name: tool for tool in BUILTIN_TOOLS}


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
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "a+1",
        "2**1000",
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


async def test_the_clock_tool_reads_the_injected_time() -> None:
    outcome = await run_tool(TOOLS, "get_current_time", "{}", CTX)
    assert outcome == type(outcome)(result="2026-11-26T14:56:04+00:00")


@pytest.mark.parametrize(
    ("name", "arguments", "fragment"),
    [
        ("no_such_tool", "{}", "unknown tool"),
        ("calculator", "{not json", "not valid JSON"),
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
