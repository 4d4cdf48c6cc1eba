"""The conversation actor: the imperative shell around `actors.decide`.

One actor per active conversation, hosted by a worker. For each command it
catches up with the log, decides, appends, evolves and runs the turn: streams
the model, runs tools between rounds (ReAct, up to 99 rounds), and ends the
turn with `done` or `failed`, always with the tokens it consumed.

The actor's state is only ever changed by `evolve` on events it appended, so it
equals a fresh fold of the log; if another writer appended meanwhile, the next
append is refused (EventLogConflict) and the actor reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import msgspec
import redis.exceptions

from actors.content import build_history, tool_round_messages, visible_tools
from actors.decide import (
    Conversation,
    ModelChoice,
    Rejected,
    TurnTotals,
    decide_done,
    decide_failed,
    decide_rejection,
    decide_send,
    decide_tool_call,
    decide_tool_result,
    evolve,
    history_of,
)
from actors.errors import ModelStreamError
from actors.model_client import ChatRequest, ModelEndpoint, stream_chat
from actors.model_stream import Finish, StreamItem, TextDelta, ToolCallRequest, Usage
from actors.models import MAX_TOOL_ROUNDS, ModelCatalog, ModelSpec, choose_model
from actors.sizing import fit
from actors.tools import Tool, ToolContext, ToolOutcome, run_tool
from events.codec import Unreadable
from events.errors import EventLogConflict, EventLogError
from events.ids import new_id as make_id
from events.log import EventLog
from events.turns import TurnRecord, TurnRegistry
from events.vocabulary import (
    AnyEvent,
    ChunkKind,
    Event,
    SendMessage,
)
from events.vocabulary import Chunk as ChunkEvent

log = logging.getLogger(__name__)

# Rough tokens per character, used only when a stream broke before reporting usage:
# a billed call is billed also then (DESIGN section 1), marked `tokens_estimated`.
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class ActorContext:
    """What every actor in a worker shares."""

    log: EventLog
    turns: TurnRegistry
    http: aiohttp.ClientSession
    catalog: ModelCatalog
    default_base_url: str
    default_api_key: str | None
    worker_id: str
    tools: dict[str, Tool] = field(default_factory=dict)
    clock: Callable[[], int] = time.time_ns
    new_id: Callable[[], str] = make_id
    first_byte_timeout: float = 120.0
    idle_timeout: float = 120.0
    # The largest event appended; services sets it below the server's max_payload.
    max_event_bytes: int = 512 * 1024


class Outcome(Enum):
    DONE = "done"  # handled (the turn ran, or the command was a duplicate): ack
    BUSY = "busy"  # another worker runs a turn here: try again shortly
    REJECTED = "rejected"  # the command can never apply: ack and drop
    RETRY = "retry"  # the log refused or was unreachable: try again later


class ConversationActor:
    def __init__(self, conversation_id: str, ctx: ActorContext) -> None:
        self.conversation_id = conversation_id
        self.ctx = ctx
        self.state = Conversation(conversation_id=conversation_id)
        self.seq = 0

    # ---------------------------------------------------------------- log

    async def catch_up(self) -> None:
        """Fold every event appended since our last known position (ours or another writer's).

        Entries this version cannot read are folded too (`evolve` skips a newer
        version's event, and marks the conversation broken for a damaged one):
        the actor never stops at them.
        """
        for stored in await self.ctx.log.read(self.conversation_id, after=self.seq):
            if isinstance(stored.event, Unreadable):
                log.warning(
                    "unreadable event in the log",
                    extra={
                        "conversation_id": self.conversation_id,
                        "seq": stored.seq,
                        "type": stored.event.type,
                        "error": stored.event.error,
                    },
                )
            self.state = evolve(self.state, stored.event)
            self.seq = stored.seq

    async def append(self, events: Sequence[Event]) -> None:
        # No event may be larger than a JetStream message: split or cut the rare
        # one that would be (actors.sizing), or its append fails and the turn hangs.
        events = fit(list(events), self.ctx.max_event_bytes, self.ctx.new_id)
        try:
            self.seq = await self.ctx.log.append(self.conversation_id, events, self.seq)
        except EventLogConflict:
            # Our view is stale: forget it; the next command starts from the log.
            self.state = Conversation(conversation_id=self.conversation_id)
            self.seq = 0
            raise
        for event in events:
            self.state = evolve(self.state, _as_any(event))

    # ---------------------------------------------------------------- commands

    async def handle(self, cmd: SendMessage) -> Outcome:
        await self.catch_up()
        if self.state.active is not None and self.state.broken is None:
            current = await self.ctx.turns.get(self.conversation_id)
            if current is not None and current.worker != self.ctx.worker_id:
                return Outcome.BUSY
            await self._close_abandoned_turn()
        spec = self._model_spec(cmd.model)
        choice = choose_model(spec)
        decision = decide_send(self.state, cmd, choice, self.ctx.clock(), self.ctx.new_id)
        if isinstance(decision, Rejected):
            await self.reject(cmd, decision)
            return Outcome.REJECTED
        if not decision:
            return Outcome.DONE  # already in the log: a redelivered command
        record = TurnRecord(
            worker=self.ctx.worker_id,
            turn_id=_turn_id(decision),
            after=self.seq,
            at=self.ctx.clock(),
        )
        try:
            # Inside the try: a claim cancelled in flight may have landed in Redis,
            # and a record nobody releases would make the conversation look busy
            # until its lease ran out.
            if not await self.ctx.turns.claim(self.conversation_id, record):
                return Outcome.BUSY
            await self.append(decision)
            await self._run_turn(spec, choice)
        except EventLogConflict:
            log.warning(
                "another writer owns the conversation",
                extra={"conversation_id": self.conversation_id},
            )
            return Outcome.RETRY
        finally:
            await asyncio.shield(self._release())
        return Outcome.DONE

    async def _release(self) -> None:
        try:
            await self.ctx.turns.release(self.conversation_id, self.ctx.worker_id)
        except (redis.exceptions.RedisError, OSError) as err:
            # the lease runs out on its own; until then the conversation looks busy
            log.warning(
                "could not release the turn record",
                extra={"conversation_id": self.conversation_id, "error": repr(err)},
            )

    async def reject(self, cmd: SendMessage, why: Rejected) -> None:
        """Record that `cmd` starts no turn (unless the log already says what became of it)."""
        log.warning(
            "command rejected",
            extra={
                "conversation_id": self.conversation_id,
                "command_id": cmd.command_id,
                "code": why.code,
                "detail": why.message,
            },
        )
        if not self.state.exists or cmd.command_id in self.state.commands_seen:
            return  # nowhere to record it, or already recorded
        await self.append(
            [decide_rejection(self.state, cmd, why, self.ctx.clock(), self.ctx.new_id)]
        )

    def _model_spec(self, requested: str | None) -> ModelSpec:
        spec = self.ctx.catalog.get(requested or self.state.model)
        return spec or self.ctx.catalog.get(None) or ModelSpec(name=self.ctx.catalog.default_model)

    async def _close_abandoned_turn(self) -> None:
        """A turn whose worker died is ended with `failed` before a new turn starts."""
        failed = decide_failed(
            self.state,
            "interrupted",
            "the worker running this turn stopped before it finished",
            TurnTotals(),
            self.ctx.clock(),
            self.ctx.new_id,
        )
        await self.append([failed])

    # ---------------------------------------------------------------- the turn

    async def _run_turn(self, spec: ModelSpec, choice: ModelChoice) -> None:
        state = self.state
        personal = state.personal
        messages = build_history(history_of(state), personal=personal)
        tools = visible_tools([t.schema() for t in self.ctx.tools.values()], personal=personal)
        endpoint = ModelEndpoint(
            base_url=spec.base_url or self.ctx.default_base_url,
            model=spec.upstream_name or spec.name,
            api_key=spec.api_key or self.ctx.default_api_key,
        )
        writer = TurnWriter(self)
        totals = TurnTotals()
        stop_reason = "stop"
        try:
            for round_number in range(MAX_TOOL_ROUNDS + 1):
                request = ChatRequest(
                    messages=messages,
                    tools=tools,
                    max_tokens=choice.max_tokens,
                    temperature=choice.temperature,
                )
                result = RoundResult()
                try:
                    await self._stream_round(endpoint, request, writer, result)
                finally:
                    totals = _add_usage(totals, result, messages)
                if result.finish_reason:
                    stop_reason = result.finish_reason
                if not result.calls:
                    break
                if round_number == MAX_TOOL_ROUNDS:
                    await writer.close()
                    await self._fail(
                        "tool_rounds_exhausted",
                        f"the model asked for tools in more than {MAX_TOOL_ROUNDS} rounds",
                        totals,
                    )
                    return
                messages = [*messages, *await self._run_tools(result, writer)]
            await writer.close()
            done = decide_done(self.state, stop_reason, totals, self.ctx.clock(), self.ctx.new_id)
            await self.append([done])
        except ModelStreamError as err:
            await writer.close()
            await self._fail(err.code, err.message, totals)
        except asyncio.CancelledError:
            # The worker is stopping: record the turn's end before giving up the command.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._stop_for_shutdown(writer, totals))
            raise
        except EventLogError:
            raise  # the log refused or is gone: nothing can be recorded; the command is retried
        except Exception as err:
            # A bug must end this turn visibly, not kill the worker or leave the turn open.
            log.exception("turn crashed", extra={"conversation_id": self.conversation_id})
            await writer.abort()
            await self._fail("internal_error", f"{type(err).__name__}: {err}", totals)
        finally:
            await writer.abort()

    async def _stream_round(
        self,
        endpoint: ModelEndpoint,
        request: ChatRequest,
        writer: TurnWriter,
        result: RoundResult,
    ) -> None:
        stream = stream_chat(
            self.ctx.http,
            endpoint,
            request,
            first_byte_timeout=self.ctx.first_byte_timeout,
            idle_timeout=self.ctx.idle_timeout,
        )
        # aclosing: leaving early (the log refused an append) closes the HTTP
        # stream at once, so the model stops generating and billing.
        async with contextlib.aclosing(stream):
            async for item in stream:
                writer.raise_if_failed()
                self._take(item, writer, result)

    @staticmethod
    def _take(item: StreamItem, writer: TurnWriter, result: RoundResult) -> None:
        if isinstance(item, TextDelta):
            result.deltas += 1
            if item.kind == "answer":
                result.answer.append(item.text)
            writer.chunk(item.kind, item.text)
        elif isinstance(item, ToolCallRequest):
            result.calls.append(item)
        elif isinstance(item, Usage):
            result.usage = item
        elif isinstance(item, Finish):
            result.finish_reason = item.reason

    async def _run_tools(self, result: RoundResult, writer: TurnWriter) -> list[dict[str, Any]]:
        """Run the round's tool calls; returns the messages that carry them back to the model."""
        state, ctx = self.state, self.ctx
        calls = [
            msgspec.structs.replace(c, call_id=c.call_id or ctx.new_id()) for c in result.calls
        ]
        context = ToolContext(
            conversation_id=self.conversation_id,
            user_id=state.user_id,
            project_id=state.project_id,
            now_ns=ctx.clock(),
        )
        outcomes: list[ToolOutcome] = []
        for call in calls:
            writer.event(decide_tool_call(state, call, ctx.clock(), ctx.new_id))
            began = time.perf_counter()
            outcome = await run_tool(ctx.tools, call.name, call.arguments, context)
            duration_ms = round((time.perf_counter() - began) * 1000, 3)
            writer.event(
                decide_tool_result(state, call, outcome, duration_ms, ctx.clock(), ctx.new_id)
            )
            outcomes.append(outcome)
        return tool_round_messages("".join(result.answer), calls, outcomes)

    async def _fail(self, code: str, message: str, totals: TurnTotals) -> None:
        log.info(
            "turn failed",
            extra={"conversation_id": self.conversation_id, "code": code, "detail": message},
        )
        failed = decide_failed(self.state, code, message, totals, self.ctx.clock(), self.ctx.new_id)
        await self.append([failed])

    async def _stop_for_shutdown(self, writer: TurnWriter, totals: TurnTotals) -> None:
        async with asyncio.timeout(5):
            with contextlib.suppress(Exception):
                await writer.close()
            if self.state.active is not None:
                await self._fail("interrupted", "the worker stopped during the turn", totals)


class RoundResult:
    """What one model call of a turn produced."""

    def __init__(self) -> None:
        self.deltas = 0
        self.answer: list[str] = []
        self.calls: list[ToolCallRequest] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None


def _add_usage(
    totals: TurnTotals, result: RoundResult, messages: list[dict[str, Any]]
) -> TurnTotals:
    """Add one model call to the turn's totals: reported usage, else an estimate."""
    if result.usage is not None:
        return TurnTotals(
            input_tokens=totals.input_tokens + result.usage.input_tokens,
            output_tokens=totals.output_tokens + result.usage.output_tokens,
            estimated=totals.estimated,
        )
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return TurnTotals(
        input_tokens=totals.input_tokens + math.ceil(chars / _CHARS_PER_TOKEN),
        output_tokens=totals.output_tokens + result.deltas,
        estimated=True,
    )


class TurnWriter:
    """Appends a turn's events in order with one append in flight (adaptive batching).

    While an append is on its way, new text piles up; the next append carries all
    of it as one chunk per run of the same kind. At a low token rate every token
    goes out alone, at a high rate tokens share an event, and the log never
    becomes the bottleneck of the stream.
    """

    def __init__(self, actor: ConversationActor) -> None:
        self._actor = actor
        self._pending: list[Event | tuple[ChunkKind, str]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._run(), name=f"writer-{actor.conversation_id}")

    def chunk(self, kind: ChunkKind, text: str) -> None:
        if text:
            self._pending.append((kind, text))
            self._wake.set()

    def event(self, event: Event) -> None:
        self._pending.append(event)
        self._wake.set()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Stop at once, dropping what is pending (the turn is ending anyway)."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def close(self) -> None:
        """Write everything pending, stop, and re-raise an append failure."""
        self._closing = True
        self._wake.set()
        try:
            await self._task
        except asyncio.CancelledError:
            if self._error is None:
                raise
        self.raise_if_failed()

    async def _run(self) -> None:
        actor = self._actor
        turn_id = actor.state.active.turn_id if actor.state.active else ""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    batch, self._pending = self._pending, []
                    for event in _coalesce(batch, actor, turn_id):
                        await actor.append([event])
                if self._closing:
                    return
        except BaseException as err:
            self._error = err
            raise


def _coalesce(
    batch: list[Event | tuple[ChunkKind, str]], actor: ConversationActor, turn_id: str
) -> list[Event]:
    out: list[Event] = []
    run_kind: ChunkKind | None = None
    run: list[str] = []

    def flush() -> None:
        if run_kind is not None and run:
            out.append(
                ChunkEvent(
                    conversation_id=actor.conversation_id,
                    at=actor.ctx.clock(),
                    event_id=actor.ctx.new_id(),
                    turn_id=turn_id,
                    kind=run_kind,
                    text="".join(run),
                )
            )

    for item in batch:
        if isinstance(item, tuple):
            kind, text = item
            if kind != run_kind:
                flush()
                run_kind, run = kind, []
            run.append(text)
        else:
            flush()
            run_kind, run = None, []
            out.append(item)
    flush()
    return out


def _turn_id(events: Sequence[Event]) -> str:
    for event in events:
        turn_id = getattr(event, "turn_id", None)
        if isinstance(turn_id, str):
            return turn_id
    return ""


def _as_any(event: Event) -> AnyEvent:
    # Every concrete Event subclass is a member of AnyEvent; this narrows the static type.
    return event  # type: ignore[return-value]
