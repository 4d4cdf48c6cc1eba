"""The conversation actor: command handling, one actor per conversation with work.

The worker hands it the conversation's commands one at a time, in order. The
actor decides on its folded state (actors.decide), where the truth about
busy-ness is: a request is accepted into the conversation's queue (or refused,
visibly, with `command_rejected`), a cancel stops the running turn, and
`on_busy: interrupt` does both. A drain task starts the queue's head whenever
no turn runs, and runs it (actors.turn).

A command's delivery is held until what it asked for is over (its turn ended,
or it was refused or found already done), then acked; JetStream keeps it until
then (the worker tells it the command is still in progress), so a worker that
dies leaves it to be redelivered to the partition's next owner. That owner
finds in the log what became of it: a turn still open there has lost its
worker and is ended as `failed` with its partial content and estimated tokens,
and a request accepted but not started is started.

What may not enter: the turn's streaming (actors.turn) and appending outside
the writer (actors.writer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import msgspec
import redis.exceptions

from actors import webhooks
from actors.billing import Accounts, Usage
from actors.decide import (
    OrphanCause,
    Rejected,
    TurnTotals,
    choose_payer,
    decide_billing_rejected,
    decide_delete,
    decide_failed,
    decide_orphan_end,
    decide_queue_refused,
    decide_rejection,
    decide_rename,
    decide_request,
    decide_start,
    next_turn,
)
from actors.models import ModelSpec, active_version, choose_model
from actors.snapshots import Folded
from actors.state import Conversation, QueuedTurn, fold
from actors.turn import ActorContext, TurnRunner
from actors.writer import EventWriter
from events.billing import preflight_estimate, project_account
from events.errors import EventLogError, EventLogUnavailable, describe
from events.tracing import REQUEST_ID, naming, unnamed_context
from events.turns import TurnRecord
from events.vocabulary import (
    AnyCommand,
    CancelTurn,
    DeleteConversation,
    Event,
    Prices,
    RenameConversation,
    SendMessage,
    Started,
    TurnCommand,
    TurnEnd,
    TurnRequest,
)

log = logging.getLogger(__name__)


# A command whose handling crashed this many times is refused (visibly, with
# `command_rejected`) instead of being tried for ever.
MAX_ATTEMPTS = 5


class Settlement(Protocol):
    """How a command's delivery is settled with the broker (a JetStream message)."""

    @property
    def attempts(self) -> int: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...


Inbox = asyncio.Queue[tuple[AnyCommand | None, Settlement | None]]  # (None, None): recover


class ConversationActor:
    def __init__(
        self,
        conversation_id: str,
        ctx: ActorContext,
        *,
        folded: Folded | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.ctx = ctx
        self.writer = EventWriter(
            conversation_id,
            ctx.log,
            max_event_bytes=ctx.max_event_bytes,
            new_id=ctx.new_id,
            folded=folded,
            gate=ctx.write_gate,
            snapshots=ctx.snapshots,
        )
        self.accounts = ctx.accounts or Accounts(ctx.log, ctx.clock, ctx.new_id)
        self.held: dict[str, Settlement] = {}  # command_id -> its delivery, until it is over
        # command_id -> the request that sent it, for queued turns (events/tracing.py)
        self._request_ids: dict[str, str] = {}
        self.runner: TurnRunner | None = None
        self._loaded = False
        self._drain: asyncio.Task[None] | None = None
        # a turn started with its request (`_request`), its runner in `runner`, waiting
        # for the drain: the log's position before that request
        self._started_after: int | None = None
        self._started_request_id = ""  # the request of the turn `_started_after` runs
        # the turn this actor ran last and the request that asked for it: a turn the log
        # stops is ended later, on the next read of the log, naming that request
        self._ran: tuple[str, str] = ("", "")
        self._deciding = False  # a request is on its way through `_request`
        self._written: TurnRecord | None = None  # the turn record this actor wrote last
        # the record this actor meant to write last, written or not (Redis away)
        self._meant: TurnRecord | None = None
        # the record write of a request that started its turn, still on its way: the
        # turn's own record is written after it (`_run_started`)
        self._announcing: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None

    @property
    def state(self) -> Conversation:
        return self.writer.state

    @property
    def idle(self) -> bool:
        return not self.held and (self._drain is None or self._drain.done())

    async def run(self, inbox: Inbox, idle_s: float) -> None:
        """Handle the inbox until it has been empty and the actor idle for `idle_s`."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            while True:
                try:
                    async with asyncio.timeout(idle_s):
                        cmd, settle = await inbox.get()
                except TimeoutError:
                    if inbox.empty() and self.idle:
                        return
                    continue
                if cmd is None or settle is None:
                    await self.recover()
                else:
                    await self.handle(cmd, settle)

    async def recover(self) -> None:
        """Load the conversation (ending a turn whose worker is gone) and run its queue:
        for a conversation of a partition this worker just took over."""
        try:
            await self.writer.catch_up()
            self._loaded = True
            await self._settle_past()
        except EventLogError as err:
            self._loaded = False
            log.warning(
                "recovery postponed",
                extra={"conversation_id": self.conversation_id, "error": describe(err)},
            )
            return
        self._kick()

    async def handle(self, cmd: AnyCommand, settle: Settlement) -> None:
        # Its log lines, and those of a turn it starts now, name the request that sent
        # it; a turn it queues names it when it starts (`_drain_queue`). Noted before
        # it is decided: the queue's task, still running for the turn before (a
        # project's turn is charged as it ends), may start the queued turn while this
        # command's handling still awaits something after its append.
        if cmd.request_id and isinstance(cmd, TurnRequest):
            self._request_ids[cmd.command_id] = cmd.request_id
        try:
            with naming(cmd.request_id):
                await self._handle(cmd, settle)
        finally:
            if self._request_ids:  # only those of turns still waiting to start
                queued = {q.command_id for q in self.state.queue}
                self._request_ids = {c: r for c, r in self._request_ids.items() if c in queued}

    async def _handle(self, cmd: AnyCommand, settle: Settlement) -> None:
        announced: asyncio.Task[None] | None = None
        try:
            if not self._loaded:
                if (
                    isinstance(cmd, TurnRequest)
                    and cmd.after is not None
                    and self.writer.seq == 0
                    and self.runner is None
                ):
                    # A new actor announces the request while it reads the conversation,
                    # from where the edge read the log's end before publishing it: no
                    # turn of this request starts earlier (see `_request`). A Redis
                    # round trip less on a fresh conversation's way to its first token.
                    announced = asyncio.create_task(self._record_turn("", cmd.after))
                await self.writer.catch_up()
                self._loaded = True
                await self._settle_past()
            if self.state.deleted:
                # Nothing is appended after a tombstone: every command for a deleted
                # conversation is acknowledged and dropped (its edge answers 404).
                log.info(
                    "command for a deleted conversation dropped",
                    extra={"conversation_id": self.conversation_id, "command_id": cmd.command_id},
                )
                await settle.ack()
                return
            if isinstance(cmd, CancelTurn):
                self.cancel(cmd.turn_id, "user")
                await settle.ack()
            elif isinstance(cmd, RenameConversation):
                # beside a running turn, as a tool's title is: not queued behind it
                now = self.ctx.clock()
                await self.writer.append_decided(
                    lambda s: decide_rename(s, cmd, now, self.ctx.new_id)
                )
                await settle.ack()
            elif self.writer.stale:
                # Another writer appended: our running turn was just refused and is
                # stopping. Decided on the forgotten (empty) view, this request would
                # be refused as a conversation that does not exist, and lost; it is
                # handed back, and redelivered it finds the log's truth.
                self._loaded = False
                log.warning(
                    "command handed back: the log refused this actor's view",
                    extra={"conversation_id": self.conversation_id},
                )
                await settle.nak(delay=1.0)
                return
            elif isinstance(cmd, DeleteConversation):
                await self._delete(cmd, settle)
            else:
                await self._request(cmd, settle, announced)
                announced = None
        except EventLogError as err:
            # the log refused (another writer: reload) or is away: try again later
            self._loaded = False
            log.warning(
                "command not handled, will be redelivered",
                extra={"conversation_id": self.conversation_id, "error": describe(err)},
            )
            self.held.pop(cmd.command_id, None)
            await settle.nak(delay=1.0)
            return
        except Exception:
            # One command's failure must not take the conversation down with it.
            log.exception("command failed", extra={"conversation_id": self.conversation_id})
            self._loaded = False
            self.held.pop(cmd.command_id, None)
            await self._retry_or_refuse(cmd, settle)
            return
        finally:
            if announced is not None:  # its request was not decided: take it back
                await announced
                if not self.state.busy:
                    await self._forget_turn()
        self._kick()

    async def _retry_or_refuse(self, cmd: AnyCommand, settle: Settlement) -> None:
        """Try a crashed command again later, or, after MAX_ATTEMPTS, refuse it visibly
        so that whoever waits for it gets an end (and the operator a log line)."""
        if settle.attempts < MAX_ATTEMPTS or isinstance(cmd, CancelTurn | DeleteConversation):
            # a delete is never given up: the user was told the content goes
            await settle.nak(delay=1.0)
            return
        if isinstance(cmd, RenameConversation):  # nobody waits for it: said, then dropped
            log.error(
                "rename given up after repeated failures",
                extra={"conversation_id": self.conversation_id, "command_id": cmd.command_id},
            )
            await settle.ack()
            return
        log.error(
            "command given up after repeated failures",
            extra={"conversation_id": self.conversation_id, "command_id": cmd.command_id},
        )
        why = Rejected(
            "internal_error", f"the request could not be processed ({MAX_ATTEMPTS} attempts)"
        )
        try:
            await self.writer.catch_up()
            now = self.ctx.clock()
            await self.writer.append_decided(
                lambda s: (
                    [decide_rejection(s, cmd, why, now, self.ctx.new_id)]
                    if s.exists and cmd.command_id not in s.commands_done
                    else []
                )
            )
        except Exception:
            log.exception(
                "could not record the given-up command",
                extra={"conversation_id": self.conversation_id, "command_id": cmd.command_id},
            )
        await settle.ack()

    async def _delete(self, cmd: DeleteConversation, settle: Settlement) -> None:
        """Delete the conversation: refuse what waits, stop what runs (ended and charged
        as a user's Stop ends it), append the tombstone, then erase the log and Redis.

        The charge of the stopped turn is on its account's subject before the
        tombstone: once the conversation's events are purged nothing could compute
        it. A worker that dies after the tombstone leaves this command unacked: it
        is redelivered, finds the conversation deleted, and erases again."""
        cid, new_id = self.conversation_id, self.ctx.new_id
        if not self.state.exists:
            await settle.ack()  # none to delete (the edge checked; a stray command)
            return
        now = self.ctx.clock()
        # Refused first, so that no queued turn starts when the running one ends.
        await self.writer.append_decided(
            lambda s: decide_queue_refused(s, now, new_id) if s.exists else []
        )
        self.cancel(None, "user")
        drain = self._drain
        if drain is not None and not drain.done():
            await asyncio.wait([drain])  # the stopped turn's end and its charge
        if not self._loaded or self.writer.stale:
            # the drain met a log that refused it (another writer): try from the log
            await settle.nak(delay=1.0)
            return
        await self._settle_past()  # a turn the log shows open ended, the last one charged
        await self._settle_finished()  # the refused requests' commands
        # The purge takes the turn ends the webhooks have not delivered yet (the stopped
        # turn's `cancelled` among them): the tombstone carries them, content-free.
        unsent = await webhooks.unsent_ends(self.ctx.log, cid)
        deleted = await self.writer.append_decided(
            lambda s: decide_delete(s, cmd, self.ctx.clock(), new_id, unsent)
        )
        if not deleted:
            log.warning("delete postponed: a turn is still open", extra={"conversation_id": cid})
            await settle.nak(delay=1.0)
            return
        log.info("conversation deleted", extra={"conversation_id": cid})
        held, self.held = self.held, {}
        for other in held.values():  # nothing they asked for will happen now
            await other.ack()
        await self._erase()
        await settle.ack()

    async def _erase(self) -> None:
        """Erase a deleted conversation: its log's entries before the tombstone, its
        snapshot, turn record and idempotency records in Redis; the edges are told
        first. Idempotent, and done again whenever a deleted conversation is loaded (a
        worker that died on the way). Raises EventLogError to have its command tried
        again."""
        cid = self.conversation_id
        # the edges first: they stop serving it from their caches while the rest goes
        await self.ctx.log.announce_gone(cid)
        await self.ctx.log.erase(cid, self.writer.tombstone_seq)
        try:
            if self.ctx.snapshots is not None:
                await self.ctx.snapshots.forget(cid)
            await self.ctx.turns.release(cid, self.ctx.worker_id)
            await self.ctx.turns.forget_requests(cid)
        except (redis.exceptions.RedisError, OSError) as err:
            raise EventLogUnavailable(
                f"conversation {cid}: its Redis state could not be removed ({describe(err)})"
            ) from err

    def cancel(self, turn_id: str | None, reason: str) -> bool:
        runner = self.runner
        if runner is None or (turn_id is not None and runner.turn_id != turn_id):
            return False
        return runner.cancel(reason)

    async def _request(
        self, cmd: TurnCommand, settle: Settlement, announced: asyncio.Task[None] | None = None
    ) -> None:
        self._deciding = True
        try:
            await self._decide_request(cmd, settle, announced)
        finally:
            self._deciding = False

    async def _decide_request(
        self, cmd: TurnCommand, settle: Settlement, announced: asyncio.Task[None] | None
    ) -> None:
        now = self.ctx.clock()
        outcome: list[Event] | Rejected = []
        # where this request's turn begins: the log's end now, read again under the
        # writer's lock (an append on its way then is before it too)
        before = self.writer.seq
        prestart: _Prestart | None = None
        if announced is None and not self.state.busy:
            # Announced while it is accepted: a viewer that joins without a position
            # must find where this conversation's next turn begins. The edge gives
            # a record the log says is coming a moment to arrive (api.hub
            # `turn_state`), so the append does not wait for Redis.
            announced = asyncio.create_task(self._record_turn("", before))

        def decide(state: Conversation) -> Sequence[Event]:
            nonlocal outcome, prestart, before
            before = self.writer.seq
            outcome = decide_request(state, cmd, now, self.ctx.new_id)
            if not isinstance(outcome, Rejected):
                # An idle conversation's request starts its turn (`started` and the
                # title) in the same append, whose events leave together: its first
                # token waits for one round trip. Idle on this state, the one the
                # request is decided on: a request that comes while the turn before
                # is still ending (its `done` on its way, its record being released),
                # as the next message of a chat does, starts at once too, and the
                # queue runs it as soon as the turn before is over. Not a project's
                # turn: whom it bills is looked up first (`_payer`), and it may be
                # refused before it runs.
                idle = not state.busy and self._started_after is None
                if idle and state.project_id is None and outcome:
                    prestart = self._start_with(state, cmd, outcome, now)
                    if prestart is not None:
                        return [*outcome, *prestart.started]
                return outcome
            if not state.exists:
                return []  # nowhere to record it
            return [decide_rejection(state, cmd, outcome, now, self.ctx.new_id)]

        try:
            # the turn runs once its `started` is in (the model asked meanwhile, by
            # `_start_with`)
            await self.writer.append_decided(decide)
        except BaseException:
            if prestart is not None:
                prestart.runner.discard()
            if announced is not None:
                await announced  # before a release that may follow
            raise
        if prestart is not None:
            # The turn is in the log: a cancel from now on finds it, though it runs
            # only when the drain gets to it. Its record in Redis is still on its
            # way (a loaded worker's write: 500 ms p50 at 1,000 turns), and the turn
            # does not wait for it: the turn's own record follows it.
            self.runner = prestart.runner
            self._started_after = before
            self._started_request_id = cmd.request_id
            self._announcing = announced
        elif announced is not None:
            await announced  # before a release below, or the queue's, can follow it
        if not self.state.busy and (self._drain is None or self._drain.done()):
            await self._forget_turn()
        if isinstance(outcome, Rejected):
            log.info(
                "command rejected",
                extra={
                    "conversation_id": self.conversation_id,
                    "command_id": cmd.command_id,
                    "code": outcome.code,
                    "detail": outcome.message,
                },
            )
            await settle.ack()
            return
        if not outcome and cmd.command_id in self.state.commands_done:
            await settle.ack()  # a redelivery of a command whose turn is over
            return
        self.held[cmd.command_id] = settle
        interrupts = bool(outcome) and getattr(outcome[0], "interrupts", False)
        if interrupts:
            self.cancel(None, "superseded")

    def _start_with(
        self,
        state: Conversation,
        cmd: TurnCommand,
        accepted: Sequence[Event],
        now: int,
    ) -> _Prestart | None:
        """`started` for `cmd`, whose request was just `accepted` on an idle `state`, if
        it is the queue's head once folded in (None: it starts as queued turns do).
        The turn's model is asked at once: its first token comes while the append
        is on its way (bench burst: 1.6 ms p50 of a first token's 7)."""
        folded = fold(state, accepted)
        queued = next_turn(folded)
        if queued is None or queued.command_id != cmd.command_id:
            return None
        spec = self._model_spec(queued.model)
        choice = choose_model(spec)
        decided = decide_start(folded, queued, choice, now, self.ctx.new_id)
        if not decided or not isinstance(first := decided[0], Started):
            return None
        runner = TurnRunner(self.ctx, self.writer, spec, choice, turn_id=first.turn_id)
        _note_omitted(decided, runner.plan(fold(folded, decided)))
        runner.ask_now()
        return _Prestart(decided, runner)

    def _kick(self) -> None:
        """Start the queue's head if no turn runs."""
        if self._tasks is None or (self._drain is not None and not self._drain.done()):
            return
        if self._started_after is not None or next_turn(self.state) is not None:
            # The task outlives the command that kicked it, and runs other requests'
            # turns: it names none itself, each turn it runs names its own.
            self._drain = self._tasks.create_task(
                self._drain_queue(), name=f"drain-{self.conversation_id}", context=unnamed_context()
            )

    async def _drain_queue(self) -> None:
        running = ""  # the request of the turn under way: a failure that stops it names it
        try:
            while True:
                if (after := self._started_after) is not None:
                    self._started_after = None
                    # the request that started it: the one that kicked this task, or
                    # one that came while the turn before was ending and left its turn
                    # to this task
                    running = self._started_request_id
                    with naming(running):
                        await self._run_started(after)
                    running = ""
                    await self._settle_finished()
                while (queued := next_turn(self.state)) is not None:
                    running = self._request_ids.pop(queued.command_id, "")
                    with naming(running):
                        await self._run_one(queued)
                    running = ""
                    await self._settle_finished()
                # A request decided while the turn before was ending is in the state
                # once no append is under way. One that started its turn (or queued
                # one) keeps the record until its own replaces it.
                await self.writer.quiet()
                if self._started_after is not None or next_turn(self.state) is not None:
                    continue
                if self._deciding:
                    return  # the request being decided releases the record or starts a turn
                # Idle: the record goes, and nothing waits for that. Awaited here, a
                # request accepted meanwhile found this task running and its turn
                # waited for the release (a Redis write: 500 ms p50 for a loaded
                # worker at 1,000 turns). The release deletes only the record written
                # last before it, so a later one is left alone in either order.
                self._forget_turn_soon()
                return
        except EventLogError as err:
            # Another writer appended (our view is stale) or the log is away. Give
            # every held command back; redelivered, they find the log's truth.
            self._loaded = False
            with naming(running):
                log.warning(
                    "turn stopped by the log, commands will be redelivered",
                    extra={"conversation_id": self.conversation_id, "error": describe(err)},
                )
            await self._give_back(delay=1.0)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the actor is stopping
            # Not a stop: a cancel that escaped from something the queue awaited. It
            # must not end the queue unseen, or the conversation waits for good.
            await self._queue_failed()
        except Exception:
            await self._queue_failed()

    async def _queue_failed(self) -> None:
        """A bug stopped the queue: say so, and hand its commands back. Redelivered, the
        log is read again and a turn left open is ended as an orphan's."""
        log.exception("turn queue failed", extra={"conversation_id": self.conversation_id})
        self._loaded = False
        held, self.held = self.held, {}
        for command_id, settle in held.items():
            cmd = _placeholder(self.conversation_id, command_id)
            await self._retry_or_refuse(cmd, settle)

    async def _run_one(self, queued: QueuedTurn) -> None:
        spec = self._model_spec(queued.model)
        choice = choose_model(spec)
        payer = await self._payer(queued)
        priced = active_version(spec) is not None
        now = self.ctx.clock()
        turn_id = self.ctx.new_id()
        self._ran = (turn_id, REQUEST_ID.get())
        # Announced while the turn starts, not before: until the new record is in,
        # the one it replaces (this request's, or the turn's before it in the
        # queue) starts a joining viewer earlier still, so nothing is missed, and
        # the turn's first token does not wait for Redis. It is in before the
        # queue's end releases the record.
        announce = asyncio.create_task(self._record_turn(turn_id, self.writer.seq))
        decided: list[Event] = []

        def start(state: Conversation) -> Sequence[Event]:
            if next_turn(state) != queued:
                return []
            decided.extend(
                decide_start(
                    state, queued, choice, now, self.ctx.new_id, turn_id, payer if priced else None
                )
            )
            if decided and isinstance(decided[0], Started):
                _note_omitted(decided, runner.plan(fold(state, decided)))
                if payer is None:
                    # no pre-flight to pass first: the model is asked while `started` is
                    # on its way (`TurnRunner.ask_now`)
                    runner.ask_now()
            return decided

        # A cancel finds the turn's runner from the moment the turn is announced, while
        # its `started` is on its way and through a billed turn's title and pre-flight,
        # and stops it before the model is asked.
        runner = TurnRunner(self.ctx, self.writer, spec, choice, turn_id=turn_id)
        runner.before_end = self._announce_queued
        self.runner = runner
        try:
            # A billed turn's pre-flight refusal is appended after its `started`.
            started = await self.writer.append_decided(start)
            active = self.state.active
            if not started or active is None or active.turn_id != turn_id:
                return
            if payer is not None and not await self._preflight(spec, choice.prices, payer, priced):
                return
            await runner.run()
        finally:
            self._let_go(runner)
            await announce
        await self._charge_last()

    async def _run_started(self, after: int) -> None:
        """Run the turn its request started in the same append (`_request`), whose
        runner (perhaps cancelled already) waits in `self.runner`; `after` is the
        log's position before that request."""
        earlier, self._announcing = self._announcing, None
        runner, active = self.runner, self.state.active
        if runner is None or active is None or active.turn_id != runner.turn_id:
            if runner is not None:
                runner.discard()
            self.runner = None
            if earlier is not None:
                await earlier  # before the queue's release can follow it
            return  # the view was refused and forgotten since: the log decides again
        self._ran = (runner.turn_id, REQUEST_ID.get())
        announce = asyncio.create_task(self._record_turn(runner.turn_id, after, earlier))
        runner.before_end = self._announce_queued
        try:
            await runner.run()
        finally:
            self._let_go(runner)
            await announce
        await self._charge_last()  # an earlier billed turn's, if it is still owed

    def _let_go(self, runner: TurnRunner) -> None:
        """A turn's runner is done; the actor's may already be the next turn's (started
        by its request while this one was ending)."""
        runner.discard()  # a model call it sent before it ran, if it never ran
        if self.runner is runner:
            self.runner = None

    async def _payer(self, queued: QueuedTurn) -> str | None:
        project = self.state.project_id
        if project is None:
            return None
        funded = (await self.accounts.state(project_account(project))).events > 0
        return choose_payer(self.state, queued.user_id, funded)

    async def _preflight(self, spec: ModelSpec, prices: Prices, payer: str, priced: bool) -> bool:
        """A billed turn runs only at a known price, and only if its account can afford
        the estimate, which is held for it until it is charged (actors.billing)."""
        now = self.ctx.clock()
        if not priced:
            message = (
                f"model {spec.name} has no active version with prices; "
                "a billed turn cannot run unpriced"
            )
            await self.writer.append_decided(
                lambda s: [
                    decide_failed(
                        s, "model_not_priced", message, TurnTotals(), now, self.ctx.new_id
                    )
                ],
                before=self._announce_queued,
            )
            return False
        turn = self.state.active
        assert turn is not None
        refusal = await self.accounts.reserve(
            payer, turn.turn_id, self.conversation_id, preflight_estimate(prices)
        )
        if refusal is None:
            return True
        log.info(
            "turn refused by the pre-flight",
            extra={"conversation_id": self.conversation_id, "account": payer},
        )
        await self.writer.append_decided(
            lambda s: [
                decide_billing_rejected(
                    s, refusal.account, refusal.needed, refusal.available, now, self.ctx.new_id
                )
            ],
            before=self._announce_queued,
        )
        return False

    async def _charge_last(self) -> None:
        """Charge the latest billed turn once it ended (a no-op when it already was):
        after our own turns, and when loading a conversation whose worker may have
        died between the turn's end and its charge.

        Only the latest ended turn is remembered, so a charge the log refuses
        (EventLogError) stops the queue: no turn starts before the one before it
        is charged, and the redelivered commands try again."""
        billed = self.state.last_billed
        if billed is None:
            return
        usage = Usage(
            input_tokens=billed.input_tokens,
            output_tokens=billed.output_tokens,
            estimated=billed.estimated,
            end=billed.end,
            user_id=billed.user_id,
            project_id=self.state.project_id,
        )
        await self.accounts.charge(
            billed.payer, billed.turn_id, self.conversation_id, billed.prices, usage
        )

    async def _settle_finished(self) -> None:
        for command_id in [c for c in self.held if c in self.state.commands_done]:
            await self.held.pop(command_id).ack()

    async def _give_back(self, delay: float) -> None:
        held, self.held = self.held, {}
        for settle in held.values():
            await settle.nak(delay=delay)

    async def _settle_past(self) -> None:
        """What a conversation just read from the log left unfinished: a turn left open
        is ended, the last one charged. That work is for the request of that turn, not
        for the command whose handling read the log (a rename, the next message): its
        lines name the turn's request when this actor ran it, else none."""
        active, (turn_id, request_id) = self.state.active, self._ran
        with naming(request_id if active and active.turn_id == turn_id else ""):
            if self.state.deleted:
                await self._erase()
                return
            await self._close_orphan()
            await self._charge_last()

    async def _close_orphan(self) -> None:
        """A turn open in the log that no runner of ours runs: end it with its partial
        content and the tokens the log shows it consumed. Also in a conversation whose
        log holds an unreadable entry: it takes no new work, but what its last turn
        consumed is still billed and its reservation released."""
        active = self.state.active
        if active is None or self.runner is not None:
            return
        cause: OrphanCause = "worker_lost"
        if self.state.broken is not None:
            cause = "log_unreadable"
        elif active.turn_id == self.writer.stopped_turn:  # another writer's entry stopped it
            cause = "log_conflict"
        log.warning(
            "ending a turn left open",
            extra={
                "conversation_id": self.conversation_id,
                "turn_id": active.turn_id,
                "cause": cause,
            },
        )
        now = self.ctx.clock()
        ended = await self.writer.append_decided(
            lambda s: [decide_orphan_end(s, now, self.ctx.new_id, cause)] if s.active else [],
            # turns queued behind it run next: a viewer keeps its stream through this end
            before=self._announce_queued,
        )
        for end in ended:
            if isinstance(end, TurnEnd):
                self.ctx.observer.turn_closed(active.model, end)

    def _model_spec(self, requested: str | None) -> ModelSpec:
        catalog = self.ctx.catalog
        spec = catalog.get(requested or self.state.model)
        return spec or catalog.get(None) or ModelSpec(name=catalog.default_model)

    # The turn record in Redis tells the edge where the running turn starts and
    # which turn a cancel stops. It is a hint, not the truth (the log is): when
    # Redis is away, or writing it fails at all, turns run without it.
    async def _record_turn(
        self, turn_id: str, after: int, earlier: asyncio.Task[None] | None = None
    ) -> None:
        """Write the turn record; after `earlier`, a write of it still on its way (two
        writes sent in different passes of the loop may reach Redis in either order)."""
        if earlier is not None:
            await asyncio.wait([earlier])
        try:
            record = TurnRecord(
                worker=self.ctx.worker_id, turn_id=turn_id, after=after, at=self.ctx.clock()
            )
            self._written = self._meant = record
            await self.ctx.turns.put(self.conversation_id, record)
        except (redis.exceptions.RedisError, OSError) as err:
            self._written = None  # what the record holds is not known: release by worker
            log.warning(
                "turn record not written",
                extra={"conversation_id": self.conversation_id, "error": describe(err)},
            )
        except Exception:
            self._written = None
            log.exception(
                "turn record not written", extra={"conversation_id": self.conversation_id}
            )

    def running_record(self) -> TurnRecord | None:
        """The turn record of the turn running now, as this actor wrote it (or tried
        to): the heartbeat writes it again if Redis has lost it (`TurnRegistry.renew`)."""
        runner, meant = self.runner, self._meant
        if runner is None or meant is None or meant.turn_id != runner.turn_id:
            return None
        return meant

    async def _announce_queued(self, state: Conversation) -> None:
        """Just before a turn's end is appended (under the writer's lock, on the state
        the end is decided on): when another turn waits behind it, the record says one
        is coming (no id yet). A viewer following the conversation then keeps its
        stream through the end instead of taking the conversation for idle. The
        record's position is the log's before the end (the end's own is not known
        yet): a viewer joining in that moment reads the end, then the next turn."""
        if state.queue:
            await self._record_turn("", self.writer.seq)

    async def _forget_turn(self) -> None:
        await self._release(self._written)

    def _forget_turn_soon(self) -> None:
        """`_forget_turn` in a task of its own, for the record written last by now."""
        if self._tasks is not None:
            self._tasks.create_task(
                self._release(self._written), name=f"release-{self.conversation_id}"
            )

    async def _release(self, written: TurnRecord | None) -> None:
        try:
            await self.ctx.turns.release(self.conversation_id, self.ctx.worker_id, written)
        except (redis.exceptions.RedisError, OSError) as err:
            log.warning(
                "turn record not released; it expires",
                extra={"conversation_id": self.conversation_id, "error": describe(err)},
            )
        except Exception:
            log.exception(
                "turn record not released", extra={"conversation_id": self.conversation_id}
            )


def _note_omitted(decided: list[Event], omitted: int) -> None:
    """Say in the turn's `started` (the first of `decided`) how many earlier messages its
    first model call leaves out. Planned on the state folded with `started` as decided:
    the count changes nothing a plan reads, so it holds for the event appended."""
    started = decided[0]
    if omitted and isinstance(started, Started):
        decided[0] = msgspec.structs.replace(started, history_omitted=omitted)


class _Prestart(NamedTuple):
    """A turn decided to start in the append that accepts its request."""

    # `started` and what was decided with it (the title), one append
    started: Sequence[Event]
    runner: TurnRunner  # its model asked already


def _placeholder(conversation_id: str, command_id: str) -> SendMessage:
    """Enough of a held command to refuse it by its id (its body is not kept)."""
    return SendMessage(
        conversation_id=conversation_id,
        command_id=command_id,
        user_id="",
        at=0,
        message_id="",
        content="",
    )
