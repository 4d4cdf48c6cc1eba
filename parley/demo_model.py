"""The demo model: a small OpenAI-compatible streaming server with scripted answers.

`parley dev` starts it when no real model endpoint is configured, and tests and
the benchmark drive it, so the whole system runs and is measured without a GPU
or an API key. It speaks the Chat Completions wire format exactly (chunk ids,
`chat.completion.chunk` objects, a `choices: []` usage chunk, `data: [DONE]`),
so everything that talks to it would talk to a real server the same way.

Its behaviour is a deterministic function of the request (the last user
message, the tools offered, whether tool results follow) plus a few
`[[directive]]`s that tests and benchmarks write into the user message; see
`plan_reply`. Nothing of parley is imported here: it is a stand-in for a remote
server, and must stay one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, Final

import msgspec
from aiohttp import web

from api.config import LISTEN_BACKLOG
from api.listener import EagerTCPSite

log = logging.getLogger(__name__)

MODEL_NAME: Final = "demo"
# How many good chunks a [[fail=...]] directive lets through before failing:
# enough that the client has yielded text, so partial content paths are exercised.
_GOOD_CHUNKS_BEFORE_FAILURE: Final = 3
_ECHO_LIMIT: Final = 300
# With no client left, a hanging reply checks this often whether it may stop.
_HANG_POLL_S: Final = 0.05
_DIRECTIVE: Final = re.compile(r"\[\[\s*([a-z-]+)\s*(?:=\s*([^\]]*?)\s*)?\]\]", re.IGNORECASE)
_CALCULATE: Final = re.compile(r"\b(?:calculate|compute)\b\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)
_TIME: Final = re.compile(r"\btime\b", re.IGNORECASE)
_BULK_DELTA: Final = 64 * 1024
_BULK_TEXT: Final = "abcdefghijklmnopqrstuvwxyz0123456789 "
_BULK_MAX: Final = 16 * 1024 * 1024
_FULL_SPEED_BATCH: Final = 32


class DemoConfig(msgspec.Struct):
    """How the demo model streams: `tokens_per_s` 0 means full speed, no sleeping."""

    tokens_per_s: float = 40.0
    think: bool = True
    # Refuse a request whose prompt and `max_tokens` together exceed this many tokens,
    # as a real provider refuses one longer than its model's context window (None: no
    # limit). The demo counts a prompt's tokens as its words.
    context_window: int | None = None


EmitLog = dict[str, list[int]]


# ------------------------------------------------------------ the script (pure)


class _Delta(msgspec.Struct, frozen=True):
    """One chunk to send. `counted` deltas carry text and are paced and billed;
    `answer` deltas are timed into the benchmark's emit log."""

    delta: dict[str, Any]
    finish_reason: str | None = None
    counted: bool = True
    answer: bool = False


class _RawLine(msgspec.Struct, frozen=True):
    """Bytes written as they are: the malformed lines of [[fail=...]]."""

    data: bytes


class _Cut(msgspec.Struct, frozen=True):
    """Close the connection now, without finish_reason or [DONE]."""


class _Hang(msgspec.Struct, frozen=True):
    """Send nothing more until the client goes away (or the server stops)."""


_Step = _Delta | _RawLine | _Cut | _Hang


class Reply(msgspec.Struct):
    """What the demo model answers to one request."""

    steps: Iterable[_Step] = ()
    status: int = 200  # not 200: an OpenAI-style JSON error with this status, no stream
    error_message: str = ""
    finished: bool = True  # ends with usage (if asked) and [DONE]
    include_usage: bool = False
    prompt_tokens: int = 0
    bench_key: str | None = None
    tokens_per_s: float | None = None  # [[rate=R]]: this reply's pace, else the server's
    flaky: tuple[str, int] | None = None  # fail the first N requests carrying this key
    silent: bool = False  # [[fail=silent]]: no answer at all, not even a status line
    error_code: str | None = None  # the error's `code`, as OpenAI names a refusal's kind


def plan_reply(body: dict[str, Any], config: DemoConfig) -> Reply:
    """Decide the whole reply from the request body; no I/O, no clock.

    Directives, anywhere in the last user message:
    `[[tokens=N]]` exactly N answer deltas "0 ", "1 ", ... (no thinking unless
    `[[think]]`); `[[think]]` think even when config.think is off;
    `[[think-tags]]` thinking as <think>...</think> inside content;
    `[[fail=bad_json|cut|error|hang]]` a few good chunks, then that failure;
    `[[fail=429]]`/`[[fail=500]]` that HTTP status before any byte; `[[fail=silent]]`
    no answer at all (the status line never comes) until the client leaves;
    `[[bench=KEY]]` log the send time of every answer delta under KEY;
    `[[bulk=N]]` an answer of N characters in deltas of 64 KiB (large answers);
    `[[tools=name{json};name{json}]]` those tool calls in one response (parallel calls),
    then an answer with their results (only tools offered; `!name` even when not);
    `[[rounds=N]]` call `get_current_time` in N rounds, one after the other, then answer;
    `[[flaky=KEY:N]]` the first N requests with this KEY get HTTP 503 (then it streams);
    `[[rate=R]]` stream this reply at R tokens/s (0: full speed), whatever the server's pace;
    `[[context=N]]` refuse, as the config's `context_window` does, a request whose prompt
    (its words) and `max_tokens` exceed N tokens.
    """
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    said = _text(messages[last_user].get("content")) if last_user >= 0 else ""
    directives = {name.lower(): value or "" for name, value in _DIRECTIVE.findall(said)}
    said = " ".join(_DIRECTIVE.sub(" ", said).split())
    stream_options = body.get("stream_options")
    reply = Reply(
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
        prompt_tokens=sum(len(_text(m.get("content")).split()) for m in messages),
        bench_key=directives.get("bench") or None,
    )
    if "rate" in directives:
        reply.tokens_per_s = _float(directives["rate"])
    window = _int(directives["context"]) if "context" in directives else config.context_window
    wanted = reply.prompt_tokens + _max_tokens(body)
    if window is not None and wanted > window:
        # OpenAI's refusal, word for word but for the numbers (a 400 before any byte)
        reply.status = 400
        reply.error_code = "context_length_exceeded"
        reply.error_message = (
            f"This model's maximum context length is {window} tokens. However, you requested"
            f" {wanted} tokens ({reply.prompt_tokens} in the messages,"
            f" {wanted - reply.prompt_tokens} in the completion). Please reduce the length"
            " of the messages or completion."
        )
        return reply
    flaky = directives.get("flaky", "")
    if ":" in flaky:
        key, _, times = flaky.partition(":")
        reply.flaky = (key, _int(times))
    fail = directives.get("fail", "")
    if fail in ("429", "500"):
        reply.status = int(fail)
        reply.error_message = f"the demo model answered {fail} on purpose ([[fail={fail}]])"
        return reply
    if fail == "silent":
        reply.silent = True
        return reply

    tags = "think-tags" in directives
    tool_results = [
        _text(m.get("content")) for m in messages[last_user + 1 :] if m.get("role") == "tool"
    ]
    offered = _offered_tools(body.get("tools"))
    if "bulk" in directives:
        size = min(_int(directives["bulk"]), _BULK_MAX)
        thinking = f"I was asked for an answer of {size} characters."
        main: Iterator[_Delta] = (_answer(piece) for piece in _bulk(size))
    elif "tokens" in directives:
        count = _int(directives["tokens"])
        thinking = f"I was asked for exactly {count} tokens; I will count them out."
        main = (_answer(f"{i} ") for i in range(count))
    elif "rounds" in directives and _calls_so_far(messages) < _int(directives["rounds"]):
        thinking = "I will ask the clock once more."
        main = _tool_calls([(f"call_{_calls_so_far(messages) + 1}", "get_current_time", "{}")])
    elif "tools" in directives and not tool_results:
        thinking = "I will call several tools at once."
        calls = _parse_calls(directives["tools"], offered)
        main = _tool_calls(
            [(f"call_{i + 1}", name, arguments) for i, (name, arguments) in enumerate(calls)]
        )
    elif tool_results:
        thinking = "The tool has answered; I will pass its result on."
        main = _answer_words(f"The result is {', '.join(tool_results)}.")
    elif (call := _wanted_call(said, offered)) is not None:
        name, arguments = call
        thinking = f"The user asks something the {name} tool can answer; I will call it."
        call_id = f"call_{_calls_so_far(messages) + 1}"
        main = _tool_call(call_id, name, arguments)
    else:
        echo = said if len(said) <= _ECHO_LIMIT else said[:_ECHO_LIMIT] + "…"
        thinking = f'The user wrote "{echo}". I will answer briefly and repeat it back.'
        main = _answer_words(
            f'You said: "{echo}". I am parley\'s demo model: I echo and call tools, '
            "nothing more. Point PARLEY_MODEL_BASE_URL at a real model for real answers."
            if echo
            else "You sent an empty message. I am parley's demo model."
        )
    # [[tokens=N]] is for exact counts, so it thinks only when asked to explicitly.
    wants_thinking = (
        tags
        or "think" in directives
        or (config.think and "tokens" not in directives and "bulk" not in directives)
    )
    think_steps = _thinking(thinking, tags=tags) if wants_thinking else iter(())
    body_steps = itertools.chain(think_steps, main)

    opening = _Delta({"role": "assistant", "content": ""}, counted=False)
    if fail in ("bad_json", "cut", "error", "hang"):
        unfinished = (step for step in body_steps if step.finish_reason is None)
        good = itertools.islice(unfinished, _GOOD_CHUNKS_BEFORE_FAILURE)
        reply.steps = itertools.chain([opening], good, [_failure(fail)])
        reply.finished = False
        return reply
    reply.steps = itertools.chain([opening], body_steps)
    return reply


def _failure(kind: str) -> _Step:
    if kind == "bad_json":
        return _RawLine(b"data: {not json\n\n")
    if kind == "error":
        error = {"error": {"message": "the demo model failed on purpose", "type": "server_error"}}
        return _RawLine(b"data: " + msgspec.json.encode(error) + b"\n\n")
    if kind == "cut":
        return _Cut()
    return _Hang()


def _bulk(size: int) -> Iterator[str]:
    """`size` characters of filler text, in pieces of _BULK_DELTA."""
    block = _BULK_TEXT * (_BULK_DELTA // len(_BULK_TEXT) + 1)
    for start in range(0, size, _BULK_DELTA):
        yield block[: min(_BULK_DELTA, size - start)]


def _answer(text: str) -> _Delta:
    return _Delta({"content": text}, answer=True)


def _answer_words(text: str) -> Iterator[_Delta]:
    # One word plus its following space per delta, like a tokenizer's pieces.
    words = text.split(" ")
    for i, word in enumerate(words):
        yield _answer(word if i == len(words) - 1 else word + " ")


def _thinking(text: str, *, tags: bool) -> Iterator[_Delta]:
    words = text.split(" ")
    pieces = [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]
    if not tags:
        for piece in pieces:
            yield _Delta({"reasoning_content": piece})
        return
    # The tags are deliberately cut across deltas, as real tokenizers cut them,
    # so clients must reassemble them.
    pieces = ["<thi", "nk>" + pieces[0], *pieces[1:], "</th", "ink>"]
    for piece in pieces:
        yield _Delta({"content": piece})


def _parse_calls(spec: str, offered: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """`name{json};name{json}` -> [(name, json)], only tools that were offered.

    `!name{json}` calls that name even when it was not offered, as a model that
    makes up a tool's name (or was told one by a prompt injection) would.
    """
    calls = []
    for part in spec.split(";"):
        name, brace, rest = part.strip().partition("{")
        name, unoffered = name.strip().removeprefix("!"), name.strip().startswith("!")
        if unoffered or name in offered:
            calls.append((name, brace + rest if brace else "{}"))
    return calls


def _tool_calls(calls: list[tuple[str, str, str]]) -> Iterator[_Delta]:
    """Several calls in one response, each announced then its arguments in one piece."""
    for index, (call_id, name, arguments) in enumerate(calls):
        yield _Delta(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ]
            }
        )
    yield _Delta({}, finish_reason="tool_calls", counted=False)


def _tool_call(call_id: str, name: str, arguments: str) -> Iterator[_Delta]:
    yield _Delta(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            ]
        },
        counted=False,
    )
    third = max(1, len(arguments) // 3)
    cuts = [0, third, 2 * third, len(arguments)] if len(arguments) >= 3 else [0, 1, len(arguments)]
    for start, end in itertools.pairwise(cuts):
        if end > start:
            yield _Delta(
                {"tool_calls": [{"index": 0, "function": {"arguments": arguments[start:end]}}]}
            )
    yield _Delta({}, finish_reason="tool_calls", counted=False)


def _wanted_call(said: str, offered: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    calculate = _CALCULATE.search(said)
    if calculate and "calculator" in offered:
        expression = calculate.group(1).strip().rstrip("?.!").strip()
        if expression:
            parameter = _first_parameter(offered["calculator"], default="expression")
            return "calculator", msgspec.json.encode({parameter: expression}).decode()
    if _TIME.search(said) and "get_current_time" in offered:
        return "get_current_time", "{}"
    return None


def _offered_tools(tools: object) -> dict[str, dict[str, Any]]:
    """Tool name -> its JSON schema parameters, from an OpenAI `tools` list."""
    offered: dict[str, dict[str, Any]] = {}
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            offered[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return offered


def _first_parameter(parameters: dict[str, Any], *, default: str) -> str:
    properties = parameters.get("properties")
    if isinstance(properties, dict) and properties:
        return default if default in properties else str(next(iter(properties)))
    return default


def _calls_so_far(messages: list[dict[str, Any]]) -> int:
    return sum(
        len(m["tool_calls"])
        for m in messages
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
    )


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _max_tokens(body: dict[str, Any]) -> int:
    """The answer's room the request asks for (either field OpenAI takes), 0 when unset."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _float(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        return 0.0
    return rate if rate > 0 and rate < float("inf") else 0.0


def _int(value: str) -> int:
    try:
        return max(0, int(value))
    except ValueError:
        return 0


# ------------------------------------------------------------ the server (I/O)


class _DemoState:
    def __init__(self, config: DemoConfig, emit_log: EmitLog | None) -> None:
        self.config = config
        self.emit_log = emit_log
        self.replies = itertools.count(1)
        self.flaky: dict[str, int] = {}  # [[flaky=KEY:N]]: requests seen per key
        self.open_streams = 0
        self.went_away = 0
        # Set on shutdown so that hanging replies end instead of holding the
        # runner's cleanup for its whole shutdown timeout.
        self.stopping = asyncio.Event()


_STATE: Final = web.AppKey("parley_demo_state", _DemoState)


def create_demo_app(config: DemoConfig, emit_log: EmitLog | None = None) -> web.Application:
    """The demo model as an aiohttp application (`POST /v1/chat/completions`, `GET /v1/models`)."""
    app = web.Application()
    app[_STATE] = _DemoState(config, emit_log)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/demo/streams", _streams)
    app.router.add_post("/v1/demo/bench", _bench_times)
    app.on_shutdown.append(_stop_replies)
    return app


async def start_demo_model(
    host: str, port: int, config: DemoConfig, emit_log: EmitLog | None = None
) -> tuple[web.AppRunner, str]:
    """Serve the demo model; returns the runner (call `cleanup()`) and its base URL.

    Port 0 picks a free port; the URL carries the port actually bound.
    """
    runner = web.AppRunner(create_demo_app(config, emit_log), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = EagerTCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}/v1"


async def _stop_replies(app: web.Application) -> None:
    app[_STATE].stopping.set()


async def _streams(request: web.Request) -> web.Response:
    """How many answers are being streamed now, and how many clients left mid-answer
    (tests check that a cancelled turn closed its model stream)."""
    state = request.app[_STATE]
    return web.json_response({"open": state.open_streams, "went_away": state.went_away})


async def _bench_times(request: web.Request) -> web.Response:
    """The send times ([[bench=KEY]]) of the keys asked for, `{"keys": [...]}`, removed once
    read: a benchmark whose viewers run in another process collects them here. Times are
    `time.perf_counter_ns()`, CLOCK_MONOTONIC on Linux, which every process shares."""
    state = request.app[_STATE]
    keys = msgspec.json.decode(await request.read(), type=dict[str, list[str]]).get("keys", [])
    emitted = state.emit_log if state.emit_log is not None else {}
    return web.Response(
        body=msgspec.json.encode({key: emitted.pop(key, []) for key in keys}),
        content_type="application/json",
    )


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "parley"}],
        }
    )


def _error_response(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else None
    param = "messages" if code == "context_length_exceeded" else None
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status=status,
        headers=headers,
    )


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError as err:
        return _error_response(400, f"the request body is not JSON: {err}", "invalid_request_error")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error_response(400, "'messages' (a list) is required", "invalid_request_error")
    if body.get("stream") is not True:
        return _error_response(
            400, 'the demo model only streams: send "stream": true', "invalid_request_error"
        )
    reply = plan_reply(body, state.config)
    if reply.flaky is not None:
        key, times = reply.flaky
        state.flaky[key] = state.flaky.get(key, 0) + 1
        if state.flaky[key] <= times:
            return _error_response(
                503, f"the demo model is flaky on purpose ([[flaky={key}:{times}]])", "server_error"
            )
    if reply.status != 200:
        kind = (
            "rate_limit_exceeded"
            if reply.status == 429
            else "invalid_request_error"
            if reply.status == 400
            else "server_error"
        )
        return _error_response(reply.status, reply.error_message, kind, reply.error_code)
    if reply.silent:  # a provider that took the request and never answers
        # polled: aiohttp gives a handler no event for its client leaving
        while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return web.Response(status=504)  # nobody is there to read it

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    state.open_streams += 1
    try:
        await response.prepare(request)
        await _send(request, response, reply, state, model=str(body.get("model") or MODEL_NAME))
    except ConnectionResetError:
        # The client left mid-answer (it was cancelled or timed out): an everyday
        # event for a streaming server, not an error worth a traceback.
        state.went_away += 1
        log.debug("demo model: client went away mid-stream")
    finally:
        state.open_streams -= 1
    return response


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    reply: Reply,
    state: _DemoState,
    *,
    model: str,
) -> None:
    header = {
        "id": f"chatcmpl-demo-{next(state.replies)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    rate = state.config.tokens_per_s if reply.tokens_per_s is None else reply.tokens_per_s
    interval = 1.0 / rate if rate > 0 else 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    bench = (
        state.emit_log.setdefault(reply.bench_key, [])
        if state.emit_log is not None and reply.bench_key
        else None
    )
    sent = 0
    finish_sent = False
    # At full speed, events leave _FULL_SPEED_BATCH to a socket write, as a fast
    # provider's stream arrives (many events a TCP segment): a write per token made
    # this process the bound of `bench stream`.
    batch: list[bytes] = []
    batch_answers = 0

    async def flush() -> None:
        nonlocal batch, batch_answers
        if batch:
            if bench is not None:
                now = time.perf_counter_ns()
                bench.extend(now for _ in range(batch_answers))
            data, batch, batch_answers = b"".join(batch), [], 0
            await response.write(data)

    for step in reply.steps:
        if isinstance(step, _Delta):
            if step.counted and interval:
                # Paced against the start, not the previous write, so the rate holds
                # however long each write took.
                delay = started + sent * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            chunk = {
                **header,
                "choices": [
                    {
                        "index": 0,
                        "delta": step.delta,
                        "logprobs": None,
                        "finish_reason": step.finish_reason,
                    }
                ],
            }
            if interval:
                if step.answer and bench is not None:
                    bench.append(time.perf_counter_ns())
                await response.write(_event(chunk))
            else:
                batch.append(_event(chunk))
                batch_answers += step.answer
                if len(batch) >= _FULL_SPEED_BATCH:
                    await flush()
            sent += step.counted
            finish_sent = finish_sent or step.finish_reason is not None
            continue
        await flush()
        if isinstance(step, _RawLine):
            await response.write(step.data)
        elif isinstance(step, _Cut):
            if request.transport is not None:
                request.transport.close()
            return
        else:
            await _hang(request, state)
            return
    await flush()
    if not reply.finished:
        return
    if not finish_sent:
        chunk = {
            **header,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
        }
        await response.write(_event(chunk))
    if reply.include_usage:
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": sent,
            "total_tokens": reply.prompt_tokens + sent,
        }
        await response.write(_event({**header, "choices": [], "usage": usage}))
    await response.write(b"data: [DONE]\n\n")


async def _hang(request: web.Request, state: _DemoState) -> None:
    # aiohttp does not cancel a handler when its client leaves, so the hang watches
    # the connection itself; writing keep-alives instead would defeat its purpose.
    while not state.stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            state.went_away += 1
            log.debug("demo model: client went away during a hang")
            return
        try:
            await asyncio.wait_for(state.stopping.wait(), _HANG_POLL_S)
        except TimeoutError:
            continue


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"
