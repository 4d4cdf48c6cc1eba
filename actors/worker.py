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
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from actors.actor import ActorContext, ConversationActor, Outcome
from events.codec import decode_command
from events.errors import EventLogError
from events.subjects import CMD_STREAM, CMD_SUBJECTS

log = logging.getLogger(__name__)

DURABLE = "parley-workers"
ACK_WAIT_S = 30.0
# A command that keeps crashing its actor is given up after this many deliveries.
MAX_DELIVER = 20


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
            max_deliver=MAX_DELIVER,
            max_ack_pending=10_000,
            filter_subject=CMD_SUBJECTS,
        )
        sub = await self._js.pull_subscribe(
            CMD_SUBJECTS, durable=DURABLE, stream=CMD_STREAM, config=config
        )
        self.ready.set()
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
                    for msg in msgs:
                        await self._dispatch(msg, actors)
                raise _Stop
        except* _Stop:
            pass
        finally:
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
                await self._process(actor, msg)
        finally:
            # Idle actors leave; a new command spawns a fresh one that reloads from the log.
            if self._inboxes.get(actor.conversation_id) is inbox:
                del self._inboxes[actor.conversation_id]
            while not inbox.empty():
                with contextlib.suppress(nats.errors.Error):
                    await inbox.get_nowait().nak()

    async def _process(self, actor: ConversationActor, msg: Msg) -> None:
        cmd = decode_command(msg.data)
        heartbeat = asyncio.create_task(_keep_in_progress(msg))
        try:
            outcome = await actor.handle(cmd)
        except EventLogError as err:
            log.warning(
                "event log unavailable, command will be retried",
                extra={"conversation_id": actor.conversation_id, "error": str(err)},
            )
            outcome = Outcome.RETRY
        except Exception:
            # One conversation's failure must not take the worker down with it; the
            # command is retried, at most MAX_DELIVER times.
            log.exception("command failed", extra={"conversation_id": actor.conversation_id})
            outcome = Outcome.RETRY
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.ack())
            raise
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if outcome is Outcome.BUSY:
            await msg.nak(delay=self._busy_retry_s)
        elif outcome is Outcome.RETRY:
            await msg.nak(delay=1.0)
        else:
            await msg.ack()


class _Stop(Exception):
    """Ends the task group: cancels every actor, each recording how its turn ended."""


async def _keep_in_progress(msg: Msg) -> None:
    """Tell JetStream the command is still being worked on, so it is not redelivered mid-turn."""
    while True:
        await asyncio.sleep(ACK_WAIT_S / 3)
        with contextlib.suppress(nats.errors.Error):
            await msg.in_progress()
