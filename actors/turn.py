"""Running one turn: stream the model, run tools between rounds (ReAct), end the turn.

A `TurnRunner` is made once the turn's `started` is in the log. It streams the
model (retrying with backoff and jitter while nothing has arrived yet: 429,
5xx, a refused connection), runs the tools the model asks for (in parallel
within one round, up to 99 rounds), and ends the turn with exactly one of
`done`, `cancelled` or `failed`, always with the tokens it consumed (estimated
and flagged when the provider never said).

`cancel(reason)` stops it at once: the model's HTTP stream is closed (so the
provider stops generating and billing), and `cancelled` is appended with the
partial content. Once the turn has begun writing its end, a cancel is too late
and is ignored.

What may not enter: command handling (actors.actor) and appending outside the
writer (actors.writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import aiohttp
import msgspec

from actors.billing import Accounts
from actors.content import (
    MIN_TOKENS_PER_BYTE,
    SAFE_TOKENS_PER_BYTE,
    Fitted,
    build_history,
    fit_history,
    history_budget,
    history_tokens,
    json_bytes,
    refused_tool,
    tokens_per_byte,
    tool_round_messages,
    visible_tools,
)
from actors.decide import (
    CHARS_PER_TOKEN,
    ModelChoice,
    TurnTotals,
    decide_cancelled,
    decide_done,
    decide_failed,
    decide_tool_call,
    decide_tool_result,
    decide_tool_title,
)
from actors.errors import CONTEXT_LENGTH_EXCEEDED, ModelStreamError
from actors.model_client import ChatRequest, ModelEndpoint, SentChat, read_chat, send_chat
from actors.model_stream import (
    ChatStreamParser,
    Finish,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    Usage,
)
from actors.models import MAX_TOOL_ROUNDS, ModelCatalog, ModelSpec, endpoint_api_key
from actors.snapshots import SnapshotStore
from actors.state import Conversation, history_of, messages_for_tools
from actors.tools import ToolContext, ToolOutcome, ToolRunner
from actors.writer import ALWAYS_CURRENT, NO_TICK, AppendTick, EventWriter, TurnStream, WriteGate
from events.errors import EventLogError, EventLogUnavailable
from events.ids import new_id as make_id
from events.log import EventLog
from events.turns import TurnRegistry
from events.vocabulary import Event, TurnEnd

log = logging.getLogger(__name__)


class TurnObserver(Protocol):
    """What a worker tells about its turns (the wiring counts it: parley/metrics.py).
    Calls are quick and never raise; `model` is the catalogue's name."""

    def turn_started(self, model: str) -> None: ...

    def first_token(self, model: str, seconds: float) -> None:
        """The model's first text of the turn, `seconds` after the turn's start."""

    def model_call(self, model: str, seconds: float) -> None:
        """One model call of the turn ended (each tool round is one)."""

    def turn_ended(self, model: str, end: TurnEnd | None) -> None:
        """The runner stopped, with the end it wrote; None when it wrote none (the log
        refused it, or was away as the worker stopped): whoever writes the end says
        so by `turn_closed`."""

    def turn_closed(self, model: str, end: TurnEnd) -> None:
        """A turn no runner ended, ended now as an orphan (`decide_orphan_end`): its
        worker died, or another writer's entry or an unreadable one stopped it."""


class NoTurnObserver:
    def turn_started(self, model: str) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def model_call(self, model: str, seconds: float) -> None:
        pass

    def turn_ended(self, model: str, end: TurnEnd | None) -> None:
        pass

    def turn_closed(self, model: str, end: TurnEnd) -> None:
        pass


@dataclass(frozen=True)
class ActorContext:
    """What every actor and turn in a worker shares."""

    log: EventLog
    turns: TurnRegistry
    http: aiohttp.ClientSession
    catalog: ModelCatalog
    default_base_url: str
    default_api_key: str | None
    worker_id: str
    tools: ToolRunner = field(default_factory=lambda: ToolRunner(()))
    clock: Callable[[], int] = time.time_ns
    new_id: Callable[[], str] = make_id
    first_byte_timeout: float = 120.0
    idle_timeout: float = 120.0
    # The largest event appended; services sets it below the server's max_payload.
    max_event_bytes: int = 512 * 1024
    # Model errors before the first token (429, 5xx, connection refused) are tried
    # again this many times, after retry_base_s, 2x, 4x ... with jitter.
    model_retries: int = 3
    retry_base_s: float = 0.5
    # The worker's accounts (a cache of folded accounts shared by its actors);
    # an actor made without one uses its own.
    accounts: Accounts | None = None
    observer: TurnObserver = field(default_factory=NoTurnObserver)
    # shared by the worker's turn streams: their appends leave together
    append_tick: AppendTick = NO_TICK
    # whether the worker's leases are current: nothing is appended while they may not be
    write_gate: WriteGate = ALWAYS_CURRENT
    # where a conversation folded from its start is kept for the next actor (None: nowhere)
    snapshots: SnapshotStore | None = None


class RoundResult:
    """What one model call of a turn produced."""

    def __init__(self) -> None:
        self.deltas = 0
        self.answer: list[str] = []
        self.calls: list[ToolCallRequest] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.reasoning_content: str | None = None  # to send back with its tool calls

    @property
    def started(self) -> bool:
        return self.deltas > 0 or bool(self.calls)


class TurnRunner:
    def __init__(
        self,
        ctx: ActorContext,
        writer: EventWriter,
        spec: ModelSpec,
        choice: ModelChoice,
        *,
        turn_id: str | None = None,
    ) -> None:
        """`turn_id`: the turn this runner will run, when it is made before its
        `started` is in the log (so that a cancel naming it finds it meanwhile);
        otherwise the writer's active turn."""
        self.ctx = ctx
        self.writer = writer
        self.spec = spec
        self.choice = choice
        if turn_id is None:
            active = writer.state.active
            if active is None:
                raise ValueError("a turn runner needs a started turn")
            turn_id = active.turn_id
        self.turn_id = turn_id
        self._task: asyncio.Task[None] | None = None
        self._running = False  # the task has had its first step
        self._cancel_reason: str | None = None
        self._ending = False
        self._began = time.perf_counter()
        self._first_token = False
        self._ended: Sequence[Event] = ()  # what this runner appended as the turn's end
        # Awaited just before the turn's end (done, failed, cancelled) is appended,
        # under the writer's lock, with the state the end is decided on: the actor
        # announces there a turn queued behind this one.
        self.before_end: Callable[[Conversation], Awaitable[None]] | None = None
        # the first model call, sent before the turn runs (`ask_now`), and what it asks
        self._plan: _CallPlan | None = None
        self._early: asyncio.Task[SentChat] | None = None
        self._early_began = 0.0

    def plan(self, state: Conversation) -> int:
        """Plan the turn's first model call on `state` (the conversation once this turn's
        `started` is in): its history, the newest part that fits in the model's context
        window. Returns how many earlier messages it leaves out (`started` says so)."""
        self._plan = _plan_call(self.ctx, self.spec, state)
        return self._plan.first.omitted

    def ask_now(self) -> None:
        """Send the planned first model call now, while `started` is still on its way to
        the log: the model's first token and the append overlap instead of following
        each other. What the model streams meanwhile waits in the connection until the
        turn runs; a turn that does not run closes it (`discard`), and the provider
        stops. A history that cannot fit is not sent: the turn ends without a call."""
        plan = self._plan
        if plan is None or _too_long(plan, plan.messages):
            return
        self._early_began = time.perf_counter()
        self._early = asyncio.create_task(
            self._send(plan.endpoint, self._request(plan, plan.first.messages)),
            name=f"ask-{self.turn_id}",
        )

    def discard(self) -> None:
        """The turn will not run (or has run): close its early model call unread."""
        early, self._early = self._early, None
        if early is not None:
            early.cancel()
            early.add_done_callback(_close_unread)

    def _early_totals(self, plan: _CallPlan) -> TurnTotals:
        """What the first model call, sent before the turn ran (`ask_now`), consumed by
        now: the part of its answer that has arrived, taken without waiting and counted
        as any call's is (`add_usage`). A turn cancelled before it ran closes that call
        unread; what the provider produced for it until then is still billed."""
        early, messages = self._early, plan.first.messages
        if early is None or not early.done() or early.cancelled() or early.exception():
            return TurnTotals()  # no answer yet: a call that produced nothing
        sent = early.result()
        # a whole answer (a server that ignored `stream: true`) was read to its end
        # as it was sent: nothing of it is left to arrive
        items = sent.answer if sent.answer is not None else ChatStreamParser().feed(sent.arrived())
        result = RoundResult()
        for item in items:
            _tally(item, result)
        sent_bytes, omitted = _sent_bytes(plan, messages), plan.first.omitted
        return add_usage(TurnTotals(), result, messages, sent_bytes=sent_bytes, omitted=omitted)

    def cancel(self, reason: str) -> bool:
        """Stop the turn; False when it is already writing its end. A turn not running
        yet (its runner made, `run` not called) ends as cancelled as soon as it runs."""
        if self._ending or (self._task is not None and self._task.done()):
            return False
        if self._cancel_reason is None:
            self._cancel_reason = reason
            # A task cancelled before its first step never runs its body: the turn
            # would get no end. One that has not run yet reads the reason at its start.
            if self._task is not None and self._running:
                self._task.cancel()
        return True

    async def run(self) -> None:
        observer, model = self.ctx.observer, self.spec.name
        observer.turn_started(model)
        self._task = asyncio.create_task(self._run(), name=f"turn-{self.turn_id}")
        try:
            await self._task
        finally:
            end = self._ended[-1] if self._ended else None
            observer.turn_ended(model, end if isinstance(end, TurnEnd) else None)

    async def _run(self) -> None:
        self._running = True  # no await before the cancel check below
        ctx = self.ctx
        plan = self._plan or _plan_call(ctx, self.spec, self.writer.state)
        endpoint, messages = plan.endpoint, plan.messages
        stream = TurnStream(self.writer, self.turn_id, ctx.clock, ctx.new_id, ctx.append_tick)
        totals = TurnTotals()
        stop_reason = "stop"
        # the tokens the history may take: the window's room, and after a refusal for
        # length half of what the refused call was estimated to send
        budget, shrunk = plan.budget, False
        try:
            if self._cancel_reason is not None:
                # Cancelled before it ran: end it as such, with what its first call,
                # sent as the turn started, consumed meanwhile.
                totals = self._early_totals(plan)
                raise asyncio.CancelledError
            for round_number in range(MAX_TOOL_ROUNDS + 1):
                result = RoundResult()
                while True:  # twice at most: once more after a refusal for length
                    fitted = fit_history(messages, budget, plan.rate)
                    if _too_long(plan, messages):
                        raise _does_not_fit(self.spec.name, plan, messages)
                    try:
                        request = self._request(plan, fitted.messages)
                        await self._stream_round(endpoint, request, stream, result)
                        break
                    except ModelStreamError as err:
                        if err.code != CONTEXT_LENGTH_EXCEEDED or result.started:
                            raise
                        answer, window = self.choice.max_tokens, err.context_window
                        if answer is not None and window is not None and answer >= window:
                            # The answer's room alone fills the window the provider
                            # names: no message fits, whatever is left out. The model's
                            # configuration is wrong, not the conversation.
                            log.warning(
                                "the model's max_output_tokens fills its context window",
                                extra={**self._log_fields(), "detail": err.message},
                            )
                            raise _answer_fills_window(self.spec.name, answer, window) from err
                        # Refused as longer than the window (not known, or underestimated):
                        # once more, the history trimmed to the room in the window the
                        # refusal named (a history twice the window is not saved by
                        # halving it), else, or when that room is no less than what our
                        # count says was sent, to half of that; unless that was tried
                        # already or nothing more can be left out.
                        room = history_budget(
                            err.context_window,
                            self.spec.max_output_tokens,
                            math.ceil(plan.tools_bytes * plan.rate),
                        )
                        sent = history_tokens(fitted.messages, plan.rate)
                        budget = room if room is not None and room < sent else sent // 2
                        harder = fit_history(messages, budget, plan.rate)
                        if shrunk or harder.omitted == fitted.omitted:
                            raise _refused_as_too_long(self.spec.name) from err
                        shrunk = True
                        log.info(
                            "the model refused the history as too long; trying it shorter",
                            extra={**self._log_fields(), "detail": err.message},
                        )
                    finally:
                        totals = add_usage(
                            totals,
                            result,
                            fitted.messages,
                            sent_bytes=_sent_bytes(plan, fitted.messages),
                            omitted=fitted.omitted,
                        )
                if result.finish_reason:
                    stop_reason = result.finish_reason
                if not result.calls:
                    break
                if round_number == MAX_TOOL_ROUNDS:
                    await self._fail(
                        stream,
                        "tool_rounds_exhausted",
                        f"the model asked for tools in more than {MAX_TOOL_ROUNDS} rounds",
                        totals,
                    )
                    return
                messages = [*messages, *await self._run_tools(result, stream)]
            self._ending = True
            await stream.close()
            await self._append_end(
                lambda s: decide_done(s, stop_reason, totals, ctx.clock(), ctx.new_id)
            )
        except ModelStreamError as err:
            await self._fail(stream, err.code, err.message, totals, detail=err.detail)
        except asyncio.CancelledError:
            reason = self._cancel_reason
            if reason is None:
                # The worker is stopping: record the turn's end before giving up.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._stop_for_shutdown(stream, totals))
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await self._cancelled(stream, reason, totals)
        except EventLogUnavailable as err:
            # The broker stayed away longer than an append waits for it (the log's
            # `outage_s`): end the turn with what the log has of it and every token
            # the model consumed, once the broker is back. If it is still away, this
            # raises too, and the conversation's next owner ends the turn (orphan).
            await self._fail(stream, "log_unavailable", str(err), totals)
        except EventLogError:
            raise  # the log refused (another writer): nothing can be recorded here
        except Exception as err:
            # A bug must end this turn visibly, not kill the worker or leave the turn open.
            log.exception("turn crashed", extra=self._log_fields())
            try:
                # What the turn wrote before the bug goes in first: an append cut off on
                # its way may land unseen, and the end, appended after it, would then
                # be refused as another writer's (the turn ended `log_conflict`).
                await stream.close()
            except Exception:  # an append refused, or the bug was in what it wrote
                await stream.abort()
            await self._fail(stream, "internal_error", f"{type(err).__name__}: {err}", totals)
        finally:
            self.discard()
            await stream.abort()

    def _request(self, plan: _CallPlan, messages: list[dict[str, Any]]) -> ChatRequest:
        return ChatRequest(
            messages=messages,
            tools=plan.tools,
            max_tokens=self.choice.max_tokens,
            temperature=self.choice.temperature,
            max_tokens_field=self.spec.max_tokens_field,
            include_usage=self.spec.include_usage,
        )

    async def _send(self, endpoint: ModelEndpoint, request: ChatRequest) -> SentChat:
        return await send_chat(
            self.ctx.http,
            endpoint,
            request,
            first_byte_timeout=self.ctx.first_byte_timeout,
            idle_timeout=self.ctx.idle_timeout,
        )

    async def _stream_round(
        self,
        endpoint: ModelEndpoint,
        request: ChatRequest,
        stream: TurnStream,
        result: RoundResult,
    ) -> None:
        began = time.monotonic()
        for attempt in range(self.ctx.model_retries + 1):
            try:
                await self._stream_once(endpoint, request, stream, result)
                return
            except ModelStreamError as err:
                if result.started or not err.retryable or attempt == self.ctx.model_retries:
                    raise
                delay = backoff(attempt, self.ctx.retry_base_s, err.retry_after)
                # The attempts share one wait for a first token: a model that let a
                # whole first-byte timeout pass is not waited for three times more.
                if time.monotonic() - began + delay >= self.ctx.first_byte_timeout:
                    raise
                log.info(
                    "model call failed before its first token; trying again",
                    extra={
                        **self._log_fields(),
                        "code": err.code,
                        "detail": str(err),
                        "retry_in_s": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)

    async def _stream_once(
        self,
        endpoint: ModelEndpoint,
        request: ChatRequest,
        stream: TurnStream,
        result: RoundResult,
    ) -> None:
        # The turn's first call may have been sent already (`ask_now`), with this request.
        early, self._early = self._early, None
        began = self._early_began if early is not None else time.perf_counter()
        try:
            sent = await (early if early is not None else self._send(endpoint, request))
            chat = read_chat(sent)
            # aclosing: leaving early (a cancel, a refused append) closes the HTTP
            # stream at once, so the model stops generating and billing.
            async with contextlib.aclosing(chat):
                async for item in chat:
                    stream.raise_if_failed()
                    _take(item, stream, result)
                    if not self._first_token and isinstance(item, TextDelta):
                        self._first_token = True
                        self.ctx.observer.first_token(
                            self.spec.name, time.perf_counter() - self._began
                        )
        finally:
            # A call that failed left its exception in the task, and the exception's
            # traceback holds this frame: kept in a local, the task would close a
            # reference cycle through the whole turn (its runner, its history, the
            # request body), freed only by a full collection.
            early = None
            self.ctx.observer.model_call(self.spec.name, time.perf_counter() - began)

    async def _run_tools(self, result: RoundResult, stream: TurnStream) -> list[dict[str, Any]]:
        """Run the round's tool calls concurrently; each result is written as it comes."""
        ctx, state = self.ctx, self.writer.state
        calls = [
            msgspec.structs.replace(c, call_id=c.call_id or ctx.new_id()) for c in result.calls
        ]
        context = ToolContext(
            conversation_id=state.conversation_id,
            user_id=state.user_id,
            project_id=state.project_id,
            now_ns=ctx.clock(),
            messages=messages_for_tools(state),
        )
        for call in calls:
            stream.event(decide_tool_call(state, call, ctx.clock(), ctx.new_id))

        async def one(call: ToolCallRequest) -> ToolOutcome:
            began = time.perf_counter()

            def written(outcome: ToolOutcome) -> None:
                duration_ms = round((time.perf_counter() - began) * 1000, 3)
                stream.event(
                    decide_tool_result(state, call, outcome, duration_ms, ctx.clock(), ctx.new_id)
                )

            # What personal scope hides from the model it may still name: refused, not run.
            outcome = refused_tool(call.name, personal=state.personal)
            if outcome is None:
                try:
                    outcome = await ctx.tools.run(call.name, call.arguments, context)
                except asyncio.CancelledError:
                    # The turn was stopped while the tool ran: its call gets an end in
                    # the log too (written before the turn's), or it shows as pending
                    # for ever.
                    written(ToolOutcome(error="cancelled: the turn stopped before it answered"))
                    raise
            written(outcome)
            if outcome.set_title is not None:
                stream.event(decide_tool_title(state, outcome.set_title, ctx.clock(), ctx.new_id))
            return outcome

        outcomes = await asyncio.gather(*(one(call) for call in calls))
        return tool_round_messages(
            "".join(result.answer),
            calls,
            outcomes,
            reasoning_content=result.reasoning_content,
            content_without_text="" if self.spec.tool_call_content == "empty" else None,
        )

    async def _fail(
        self, stream: TurnStream, code: str, message: str, totals: TurnTotals, *, detail: str = ""
    ) -> None:
        self._ending = True
        where = f" ({detail})" if detail else ""
        log.info(
            "turn failed", extra={**self._log_fields(), "code": code, "detail": message + where}
        )
        with contextlib.suppress(EventLogError):
            await stream.close()
        await self._append_end(
            lambda s: decide_failed(s, code, message, totals, self.ctx.clock(), self.ctx.new_id)
        )

    async def _cancelled(self, stream: TurnStream, reason: str, totals: TurnTotals) -> None:
        self._ending = True
        await stream.close()
        await self._append_end(
            lambda s: decide_cancelled(s, reason, totals, self.ctx.clock(), self.ctx.new_id)
        )

    async def _append_end(self, decide: Callable[[Conversation], Event]) -> None:
        self._ended = await self.writer.append_decided(
            lambda s: [decide(s)], before=self.before_end
        )

    async def _stop_for_shutdown(self, stream: TurnStream, totals: TurnTotals) -> None:
        self._ending = True
        async with asyncio.timeout(5):
            with contextlib.suppress(Exception):
                await stream.close()
            if _still_running(self.writer.state, self.turn_id):
                # what is queued behind it runs on the partition's next worker: a
                # viewer keeps its stream through this end (`before_end`)
                await self._append_end(
                    lambda s: decide_failed(
                        s,
                        "interrupted",
                        "the worker stopped during the turn",
                        totals,
                        self.ctx.clock(),
                        self.ctx.new_id,
                    )
                )

    def _log_fields(self) -> dict[str, str]:
        return {"conversation_id": self.writer.conversation_id, "turn_id": self.turn_id}


class _CallPlan(NamedTuple):
    """What a turn's model calls ask, and where."""

    endpoint: ModelEndpoint
    messages: list[dict[str, Any]]  # the whole history
    tools: list[dict[str, Any]]
    tools_bytes: int
    rate: float  # tokens a byte, to estimate what is sent with
    budget: int | None  # the tokens the history may take in the model's window (None: not known)
    least_budget: int | None  # ... with the tool schemas counted at their fewest tokens
    first: Fitted  # what the first call sends of the history


def _plan_call(ctx: ActorContext, spec: ModelSpec, state: Conversation) -> _CallPlan:
    """The first call of the turn running on `state`: its history (the newest part that
    fits in the model's context window, when it is known) and tools."""
    assert state.active is not None
    messages = build_history(
        history_of(state, upto=state.active.user_message_id), personal=state.personal
    )
    tools = visible_tools(ctx.tools.schemas(), personal=state.personal)
    measured = state.input_rate
    rate = (
        tokens_per_byte(measured.tokens, measured.bytes)
        if measured is not None and measured.model == spec.name
        else SAFE_TOKENS_PER_BYTE
    )
    tools_bytes = json_bytes(tools) if tools else 0  # encoded once, counted at each rate
    budget = history_budget(
        spec.context_window, spec.max_output_tokens, math.ceil(tools_bytes * rate)
    )
    return _CallPlan(
        endpoint=ModelEndpoint(
            base_url=spec.base_url or ctx.default_base_url,
            model=spec.upstream_name or spec.name,
            api_key=endpoint_api_key(spec, ctx.default_api_key),
        ),
        messages=messages,
        tools=tools,
        tools_bytes=tools_bytes,
        rate=rate,
        budget=budget,
        least_budget=history_budget(
            spec.context_window,
            spec.max_output_tokens,
            math.ceil(tools_bytes * MIN_TOKENS_PER_BYTE),
        ),
        first=fit_history(messages, budget, rate),
    )


def _too_long(plan: _CallPlan, messages: list[dict[str, Any]]) -> bool:
    """Even with every earlier exchange left out, and counted at the fewest tokens chat
    text takes (one in 8 bytes), the history is over the window's room: no model can
    take it. (Between that and the safe count, what is least is sent, and the
    provider decides: a text tokenized at 4 bytes a token is not refused on a guess.)"""
    if plan.least_budget is None:
        return False
    return fit_history(messages, 0, MIN_TOKENS_PER_BYTE).tokens > plan.least_budget


def _sent_bytes(plan: _CallPlan, messages: list[dict[str, Any]]) -> int:
    return plan.tools_bytes + sum(json_bytes(m) for m in messages)


def _does_not_fit(model: str, plan: _CallPlan, messages: list[dict[str, Any]]) -> ModelStreamError:
    """The turn ends before its model is asked: the message being answered (with this
    turn's tool rounds) cannot fit, whatever is left out."""
    least = fit_history(messages, 0, MIN_TOKENS_PER_BYTE).tokens
    return ModelStreamError(
        CONTEXT_LENGTH_EXCEEDED,
        f"This message is too long for the model {model}: with the instructions and this"
        f" turn's tool results it takes at least {least} tokens, and the model has room"
        f" for {max(plan.least_budget or 0, 0)} beside its answer. Shorten it, or send it"
        " in parts.",
    )


def _answer_fills_window(model: str, answer: int, window: int) -> ModelStreamError:
    return ModelStreamError(
        CONTEXT_LENGTH_EXCEEDED,
        f"The model {model} cannot answer any message: its answer is given {answer} tokens"
        f" (its max_output_tokens), and its context window, as its server says, is {window}"
        " tokens, answer and messages together. This is the model's configuration, not"
        " your conversation: an operator must lower its max_output_tokens.",
    )


def _refused_as_too_long(model: str) -> ModelStreamError:
    return ModelStreamError(
        CONTEXT_LENGTH_EXCEEDED,
        f"This conversation is too long for the model {model}, even with its oldest"
        " messages left out: shorten your message, or start a new conversation.",
    )


def _close_unread(sending: asyncio.Task[SentChat]) -> None:
    """A discarded early call, once its sending is over: close what it got."""
    if not sending.cancelled() and sending.exception() is None:
        sending.result().close()


def _take(item: StreamItem, stream: TurnStream, result: RoundResult) -> None:
    _tally(item, result)
    if isinstance(item, TextDelta):
        stream.chunk(item.kind, item.text)


def _tally(item: StreamItem, result: RoundResult) -> None:
    """Count one item of a call's answer into what the call produced."""
    if isinstance(item, TextDelta):
        result.deltas += 1
        if item.kind == "answer":
            result.answer.append(item.text)
    elif isinstance(item, ToolCallRequest):
        result.calls.append(item)
    elif isinstance(item, Usage):
        result.usage = item
    elif isinstance(item, Finish):
        result.finish_reason = item.reason
        result.reasoning_content = item.reasoning_content


def _still_running(state: Conversation, turn_id: str) -> bool:
    return state.active is not None and state.active.turn_id == turn_id


def add_usage(
    totals: TurnTotals,
    result: RoundResult,
    messages: list[dict[str, Any]],
    *,
    sent_bytes: int = 0,
    omitted: int = 0,
) -> TurnTotals:
    """Add one model call, which sent `messages` (`sent_bytes` with the tool schemas,
    `omitted` earlier messages left out), to the turn's totals: reported usage, else
    an estimate."""
    omitted = max(totals.history_omitted, omitted)
    if result.usage is not None:
        return TurnTotals(
            input_tokens=totals.input_tokens + result.usage.input_tokens,
            output_tokens=totals.output_tokens + result.usage.output_tokens,
            estimated=totals.estimated,
            input_bytes=totals.input_bytes + sent_bytes,
            history_omitted=omitted,
        )
    if not result.started and result.finish_reason is None:
        # Nothing came back (refused, an error status, no first byte): providers do
        # not bill a call that produced nothing, and neither do we.
        return msgspec.structs.replace(totals, history_omitted=omitted)
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return TurnTotals(
        input_tokens=totals.input_tokens + math.ceil(chars / CHARS_PER_TOKEN),
        output_tokens=totals.output_tokens + result.deltas,
        estimated=True,
        history_omitted=omitted,
    )


def backoff(attempt: int, base_s: float, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""
    delay = random.uniform(0, base_s * (2**attempt))
    return max(delay, retry_after or 0.0)
