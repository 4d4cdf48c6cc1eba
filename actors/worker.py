"""The worker host: takes commands from CHAT_CMD and hands them to conversation actors.

One actor (an inbox and a task) per conversation with work; commands of one
conversation run one after another, different conversations run concurrently.
A command is acked only after its turn ended, so a worker that dies mid-turn
leaves it to be redelivered; the next actor then finds the abandoned turn in
the log, ends it with `failed`, and (thanks to `user_message.command_id`) does
not apply the same message twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats.errors
import redis.exceptions
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from actors.actor import ActorContext, ConversationActor, Outcome
from actors.decide import Rejected
from events.codec import decode_command
from events.errors import EventLogError
from events.subjects import CMD_STREAM, CMD_SUBJECTS
from events.vocabulary import SendMessage

log = logging.getLogger(__name__)

DURABLE = "parley-workers"
ACK_WAIT_S = 30.0
# Every this often a running turn tells JetStream it is still working on the
# command and renews its claim on the conversation in Redis.
HEARTBEAT_S = 5.0
# A command that crashed its actor this many times is given up (and logged).
# Deliveries do not count otherwise: a command waiting for a busy conversation
# is redelivered for as long as the other turn runs.
MAX_CRASHES = 5
_FETCH_FAILURES = 5
# Errors that say a server is away, not that the command is bad: retried without
# counting towards MAX_CRASHES.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)
_RETRY_LATER: tuple[type[BaseException], ...] = (EventLogError, *TRANSIENT)


class WorkerHost:
    def __init__(
        self,
        js: JetStreamContext,
        ctx: ActorContext,
        *,
        idle_actor_s: float = 60.0,
        busy_retry_s: float = 0.5,
    ) -> None:
        self._js = js
        self._ctx = ctx
        self._idle_actor_s = idle_actor_s
        self._busy_retry_s = busy_retry_s
        self._inboxes: dict[str, asyncio.Queue[Msg]] = {}
        self.ready = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        config = api.ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_deliver=-1,
            max_ack_pending=10_000,
            filter_subject=CMD_SUBJECTS,
        )
        sub = await self._js.pull_subscribe(
            CMD_SUBJECTS, durable=DURABLE, stream=CMD_STREAM, config=config
        )
        self.ready.set()
        failures = 0
        try:
            async with asyncio.TaskGroup() as actors:
                while not stopping.is_set():
                    try:
                        # One at a time: a batch fetch waits for the rest of its batch
                        # (up to the timeout) once the first command arrived, which
                        # would delay a lone message by up to a second.
                        msgs = await sub.fetch(1, timeout=1.0)
                    except (nats.errors.TimeoutError, TimeoutError):
                        continue
                    except nats.errors.Error as err:
                        # The broker is away or restarting. Running turns carry on
                        # (they are not this loop's); fetching resumes when it is
                        # back. Failing on and on (the consumer was deleted, say)
                        # ends the role, and its supervisor starts it afresh.
                        failures += 1
                        if failures >= _FETCH_FAILURES:
                            raise
                        log.warning("cannot fetch commands", extra={"error": repr(err)})
                        await asyncio.sleep(1.0)
                        continue
                    failures = 0
                    for msg in msgs:
                        await self._dispatch(msg, actors)
                raise _Stop
        except* _Stop:
            pass
        finally:
            # Commands handed to an actor that was cancelled before it began are
            # still waiting in its inbox: give them back now, or JetStream would
            # hold them until ack_wait runs out.
            for inbox in list(self._inboxes.values()):
                while not inbox.empty():
                    with contextlib.suppress(nats.errors.Error):
                        await asyncio.shield(inbox.get_nowait().nak())
            self._inboxes.clear()
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _dispatch(self, msg: Msg, actors: asyncio.TaskGroup) -> None:
        try:
            cmd = decode_command(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.error(
                "undecodable command dropped", extra={"subject": msg.subject, "error": str(err)}
            )
            await msg.term()
            return
        inbox = self._inboxes.get(cmd.conversation_id)
        if inbox is None:
            inbox = asyncio.Queue()
            self._inboxes[cmd.conversation_id] = inbox
            actor = ConversationActor(cmd.conversation_id, self._ctx)
            actors.create_task(self._actor_loop(actor, inbox), name=f"actor-{cmd.conversation_id}")
        inbox.put_nowait(msg)

    async def _actor_loop(self, actor: ConversationActor, inbox: asyncio.Queue[Msg]) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_actor_s):
                        msg = await inbox.get()
                except TimeoutError:
                    if inbox.empty():
                        return
                    continue
                try:
                    await self._process(actor, msg)
                except (nats.errors.Error, OSError) as err:
                    # acking or naking failed: the server redelivers after ack_wait
                    log.warning(
                        "could not settle a command",
                        extra={"conversation_id": actor.conversation_id, "error": repr(err)},
                    )
        finally:
            # Idle actors leave; a new command spawns a fresh one that reloads from the log.
            if self._inboxes.get(actor.conversation_id) is inbox:
                del self._inboxes[actor.conversation_id]
            while not inbox.empty():
                with contextlib.suppress(nats.errors.Error):
                    await inbox.get_nowait().nak()

    async def _process(self, actor: ConversationActor, msg: Msg) -> None:
        cmd = decode_command(msg.data)
        heartbeat = asyncio.create_task(self._keep_alive(msg, cmd.conversation_id))
        crashed = False
        try:
            outcome = await actor.handle(cmd)
        except _RETRY_LATER as err:
            log.warning(
                "a server is unavailable, command will be retried",
                extra={"conversation_id": actor.conversation_id, "error": repr(err)},
            )
            outcome = Outcome.RETRY
        except Exception:
            # One conversation's failure must not take the worker down with it.
            log.exception("command failed", extra={"conversation_id": actor.conversation_id})
            outcome, crashed = Outcome.RETRY, True
        except asyncio.CancelledError:
            # The worker is stopping. Never ack here: the command may not have
            # reached the log yet (the actor was still catching up or claiming).
            # Redelivered, it runs if it did not, and is recognised by its
            # command_id in the log if it did (the turn was ended as interrupted).
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await asyncio.shield(msg.nak())
            raise
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if crashed and msg.metadata.num_delivered >= MAX_CRASHES:
            await self._give_up(actor, cmd)
            await msg.term()
        elif outcome is Outcome.BUSY:
            await msg.nak(delay=self._busy_retry_s)
        elif outcome is Outcome.RETRY:
            await msg.nak(delay=1.0)
        else:
            await msg.ack()

    async def _give_up(self, actor: ConversationActor, cmd: SendMessage) -> None:
        """A command that crashed its actor again and again ends visibly: a
        `command_rejected` in the log tells its waiting viewer, and the operator."""
        log.error(
            "command given up after repeated crashes",
            extra={"conversation_id": actor.conversation_id, "command_id": cmd.command_id},
        )
        why = Rejected(
            "internal_error", f"the message could not be processed ({MAX_CRASHES} attempts)"
        )
        try:
            await actor.catch_up()
            await actor.reject(cmd, why)
        except Exception:
            log.exception(
                "could not record the given-up command",
                extra={"conversation_id": actor.conversation_id, "command_id": cmd.command_id},
            )

    async def _keep_alive(self, msg: Msg, conversation_id: str) -> None:
        """While a turn runs: JetStream must not redeliver its command, and the
        conversation's claim in Redis must not lapse (another worker would start
        a turn beside this one; the log would refuse it, but only at its first append)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()
            with contextlib.suppress(redis.exceptions.RedisError):
                await self._ctx.turns.refresh(conversation_id, self._ctx.worker_id)


class _Stop(Exception):
    """Ends the task group: cancels every actor, each recording how its turn ended."""
