"""The worker host: takes the commands of the partitions it leases and hands them to actors.

One durable consumer per partition (actors/partitions.py says who may read
which); one actor per conversation with work, its commands one after another
in arrival order, different conversations concurrently. A command is acked
only when what it asked for is over; until then the worker tells JetStream
every few seconds that it is still in progress, however long it waits in a
conversation's queue, so it is never redelivered behind a live worker's back.

A worker that stops stops fetching, lets running turns finish within a grace
period, then ends the rest as `interrupted`, gives every unfinished command
back to JetStream (the partition's next owner runs what was queued) and
releases its leases so another worker takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import redis.exceptions
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from actors.actor import ConversationActor, Inbox, Settlement
from actors.command_feed import CommandFeed
from actors.partitions import PartitionLeases
from actors.snapshots import Folded
from actors.state import state_bytes
from actors.turn import ActorContext
from events.codec import decode_command
from events.errors import describe
from events.subjects import CMD_STREAM, PARTITIONS, partition_of, partition_subjects
from events.vocabulary import AnyCommand, CancelTurn

log = logging.getLogger(__name__)

ACK_WAIT_S = 30.0
# Every this often each held command is reported in progress (well inside
# ACK_WAIT_S) and the running turns' records in Redis are renewed.
HEARTBEAT_S = 5.0
# Bounds what one partition may hold unacked (queued behind turns included).
MAX_ACK_PENDING = 2_000


def durable_name(partition: int) -> str:
    return f"parley-p{partition}"


class Delivery:
    """A command's JetStream message, settled once; in `pending` until it is."""

    def __init__(self, msg: Msg, pending: set[Delivery], conversation_id: str) -> None:
        self._msg = msg
        self._pending = pending
        self.conversation_id = conversation_id
        pending.add(self)

    @property
    def attempts(self) -> int:
        return int(self._msg.metadata.num_delivered)

    def order(self) -> int:
        """Its place in the command stream: commands given back go in this order."""
        return int(self._msg.metadata.sequence.stream)

    async def ack(self) -> None:
        if self in self._pending:
            self._pending.discard(self)
            await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        # settled once: the second of two settlements (the actor's, and its
        # leaving's) is a no-op, not nats.py's MsgAlreadyAckdError
        if self in self._pending:
            self._pending.discard(self)
            await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self._msg.in_progress()


class _Running:
    def __init__(self, actor: ConversationActor, task: asyncio.Task[None]) -> None:
        self.actor = actor
        self.task = task
        self.inbox: Inbox = asyncio.Queue()


class IdleStates:
    """Folded states of conversations whose actor went idle, newest last: a new actor
    starts from one and reads only what was appended since, not the whole log.

    Bounded by count and by memory (`state_bytes`): a state holds every answer of
    its conversation in full, and 2,000 of them kept by count alone held 60 MB
    for sixty conversations of one 1 MB answer each, for as long as 2,000 newer
    ones had not come. The oldest go first; a state larger than the whole budget
    is not kept (its next actor folds the log, as after a restart)."""

    def __init__(self, *, count: int, max_bytes: int) -> None:
        self._kept: OrderedDict[str, tuple[Folded, int]] = OrderedDict()
        self._count = count
        self._max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, conversation_id: str, folded: Folded) -> None:
        self.take(conversation_id)
        size = state_bytes(folded.state)
        if size > self._max_bytes:
            return
        self._kept[conversation_id] = (folded, size)
        self.bytes += size
        while len(self._kept) > self._count or self.bytes > self._max_bytes:
            _, (_, dropped) = self._kept.popitem(last=False)
            self.bytes -= dropped

    def unsaved(self, conversation_id: str, folded: Folded) -> None:
        """The snapshot of `folded`, kept as written, was not written (Redis away or
        full): kept as it was instead, so its next actor tries again rather than
        after `every` more entries. Nothing changes if it is no longer the one kept
        (a new actor took it)."""
        kept = self._kept.get(conversation_id)
        if kept is not None and kept[0].seq == folded.seq and kept[0].saved == folded.entries:
            self._kept[conversation_id] = (folded, kept[1])

    def take(self, conversation_id: str) -> Folded | None:
        """The state kept for `conversation_id` and its log position, no longer kept."""
        kept = self._kept.pop(conversation_id, None)
        if kept is None:
            return None
        self.bytes -= kept[1]
        return kept[0]


class WorkerHost:
    def __init__(
        self,
        js: JetStreamContext,
        ctx: ActorContext,
        *,
        partitions: int = PARTITIONS,
        idle_actor_s: float = 60.0,
        lease_ttl_s: float = 15.0,
        grace_s: float = 10.0,
        states_kept: int = 2_000,
        states_max_bytes: int = 128 * 1024 * 1024,
        replicas: int = 1,
    ) -> None:
        self._js = js
        self.partitions = partitions
        self._idle_actor_s = idle_actor_s
        self._grace_s = grace_s
        # Stopping, in the grace period: a cancel for a running turn still reaches it;
        # every other command is held, not started, and given back at the end.
        self._winding_down = False
        self._actors: dict[str, _Running] = {}
        self._loops: dict[int, asyncio.Task[None]] = {}
        self._pending: set[Delivery] = set()
        # Set once a stopping worker's feeds are closed: before, nothing is given back
        self._feeds_closed = asyncio.Event()
        self.idle_states = IdleStates(count=states_kept, max_bytes=states_max_bytes)
        self.leases = PartitionLeases(
            js, ctx.worker_id, partitions, ttl_s=lease_ttl_s, replicas=replicas
        )
        # an actor appends only while the leases are current
        self._ctx = dataclasses.replace(ctx, write_gate=self.leases)
        self.ready = asyncio.Event()

    @property
    def winding_down(self) -> bool:
        """Stopping: in the grace period in which running turns may still finish."""
        return self._winding_down

    async def run(self, stopping: asyncio.Event) -> None:
        leases = self.leases
        await leases.open()
        fetching = asyncio.Event()  # set: partition loops stop fetching
        try:
            async with asyncio.TaskGroup() as tasks:
                heartbeat = tasks.create_task(self._heartbeat())
                while not stopping.is_set():
                    try:
                        ticked = await _unless_stopped(leases.tick(self._busy), stopping)
                        if ticked is None:
                            break
                        gained, lost = ticked
                    except nats.errors.Error as err:
                        # The broker is away: keep serving what we hold (running turns
                        # wait for it in their appends) and renew once it is back. A
                        # lease that lapsed meanwhile is found lost then.
                        log.warning("partition leases not renewed", extra={"error": describe(err)})
                        gained, lost = set(), set()
                    _still_not_cancelled()
                    for partition in lost:
                        await self._drop(partition)
                    for partition in gained:
                        self._loops[partition] = tasks.create_task(
                            self._partition_loop(partition, fetching, tasks),
                            name=f"partition-{partition}",
                        )
                    if gained:
                        # beside this loop, not in it: the scan reads Redis's whole
                        # keyspace, and leases not renewed meanwhile stop every append
                        tasks.create_task(self._recover(gained, tasks), name="recovery-scan")
                    self.ready.set()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(leases.renew_every_s):
                            await stopping.wait()
                self._winding_down = True
                # Running turns may take the whole grace period, longer than a lease
                # lives: the leases stay ours meanwhile, or another worker takes the
                # partitions and cuts those turns short.
                keeping = tasks.create_task(self._keep_leases(leases))
                await self._stop(tasks, fetching)
                keeping.cancel()
                heartbeat.cancel()
        finally:
            self._loops.clear()
            await self._give_back_all()
            await leases.release_all()

    async def _keep_leases(self, leases: PartitionLeases) -> None:
        """While stopping: renew the leases held, take none."""
        while True:
            await asyncio.sleep(leases.renew_every_s)
            try:
                _, lost = await leases.tick(self._busy, take=False)
            except nats.errors.Error as err:
                log.warning("partition leases not renewed", extra={"error": describe(err)})
                continue
            for partition in lost:
                await self._drop(partition)

    def _busy(self, partition: int) -> bool:
        return any(
            partition_of(cid, self.partitions) == partition and not running.actor.idle
            for cid, running in self._actors.items()
        )

    async def _drop(self, partition: int) -> None:
        """A partition we no longer own: stop reading it and stop its conversations."""
        loop = self._loops.pop(partition, None)
        if loop is not None:
            loop.cancel()
        for cid, running in list(self._actors.items()):
            if partition_of(cid, self.partitions) == partition:
                running.task.cancel()

    async def _partition_loop(
        self, partition: int, stop: asyncio.Event, tasks: asyncio.TaskGroup
    ) -> None:
        config = api.ConsumerConfig(
            durable_name=durable_name(partition),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=partition_subjects(partition),
        )
        await self._ensure_consumer(config)

        async def dispatch(msg: Msg) -> None:
            await self._dispatch(msg, tasks)

        async def exists() -> bool:
            return not await self._consumer_gone(partition)

        feed = CommandFeed(
            self._js._nc,
            self._js._prefix,
            CMD_STREAM,
            durable_name(partition),
            dispatch,
            exists,
            late=self._hold,
            # After an outage or a pause the lease may be another worker's by now: ask
            # for its commands again once a renewal has said it is still ours.
            may_ask=lambda: partition in self.leases.owned and self.leases.current(),
        )
        await feed.run(stop)

    async def _ensure_consumer(self, config: api.ConsumerConfig) -> None:
        """The partition's durable consumer, made if absent (as every worker may, at once)."""
        assert config.durable_name is not None
        try:
            await self._js.consumer_info(CMD_STREAM, config.durable_name)
        except nats.js.errors.NotFoundError:
            await self._js.add_consumer(CMD_STREAM, config)

    async def _consumer_gone(self, partition: int) -> bool:
        try:
            await self._js.consumer_info(CMD_STREAM, durable_name(partition))
        except nats.js.errors.NotFoundError:
            return True
        except nats.errors.Error:
            return False  # no answer: cannot tell, so not known to be gone
        return False

    async def _dispatch(self, msg: Msg, tasks: asyncio.TaskGroup) -> None:
        cmd = await self._command_of(msg)
        if cmd is None:
            return
        delivery = Delivery(msg, self._pending, cmd.conversation_id)
        running = self._actors.get(cmd.conversation_id)
        if self._winding_down and not (
            isinstance(cmd, CancelTurn) and running is not None and not running.task.done()
        ):
            return  # held: given back with the others, in order, once the grace is over
        if running is None or running.task.done():
            running = self._start_actor(cmd.conversation_id, tasks)
        running.inbox.put_nowait((cmd, delivery))

    async def _hold(self, msg: Msg) -> None:
        """A command that reached a stopping worker's feed: not started, only held, so
        that it is given back with the others, in the order they were sent."""
        cmd = await self._command_of(msg)
        if cmd is not None:
            Delivery(msg, self._pending, cmd.conversation_id)

    @staticmethod
    async def _command_of(msg: Msg) -> AnyCommand | None:
        try:
            return decode_command(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.error(
                "undecodable command dropped", extra={"subject": msg.subject, "error": str(err)}
            )
            await msg.term()
            return None

    async def _recover(self, partitions: set[int], tasks: asyncio.TaskGroup) -> None:
        """Conversations of newly taken partitions that still show a running turn (a turn
        record in Redis): their worker may be gone, so each is loaded at once and an
        orphaned turn ended, rather than when its command is redelivered."""
        try:
            conversations = await self._ctx.turns.conversations()
        except (redis.exceptions.RedisError, OSError) as err:
            log.info("no recovery scan without Redis", extra={"error": describe(err)})
            return
        if self._winding_down:
            return  # stopping: the next owner recovers them
        # those still ours: the scan ran beside the lease loop, which may have lost some
        partitions = partitions & self.leases.owned.keys()
        for cid in conversations:
            if partition_of(cid, self.partitions) in partitions and cid not in self._actors:
                self._start_actor(cid, tasks).inbox.put_nowait((None, None))

    def _start_actor(self, conversation_id: str, tasks: asyncio.TaskGroup) -> _Running:
        actor = ConversationActor(
            conversation_id, self._ctx, folded=self.idle_states.take(conversation_id)
        )
        holder: list[_Running] = []
        task = tasks.create_task(self._actor_task(actor, holder), name=f"actor-{conversation_id}")
        running = _Running(actor, task)
        holder.append(running)
        self._actors[conversation_id] = running
        return running

    async def _actor_task(self, actor: ConversationActor, holder: list[_Running]) -> None:
        running = holder[0]
        try:
            await actor.run(running.inbox, self._idle_actor_s)
        except Exception:
            # One conversation's failure must not take the worker down with it.
            log.exception("actor failed", extra={"conversation_id": actor.conversation_id})
        finally:
            # Leaving (idle, failed or stopped): nothing may stay unsettled. No
            # await before the removal, so no command can slip into a dead inbox.
            cid = actor.conversation_id
            if self._actors.get(cid) is running:
                del self._actors[cid]
            snapshots = self._ctx.snapshots
            snapshot: Folded | None = None  # to write once nothing is left unsettled
            if actor.idle and actor.state.active is None and actor.state.exists:
                folded = actor.writer.folded()
                if snapshots is not None and snapshots.due(folded):
                    snapshot = folded
                    # kept as written: the next actor of it need not write it again
                    folded = msgspec.structs.replace(folded, saved=folded.entries)
                self.idle_states.keep(cid, folded)
            # Every unsettled command of this conversation is this actor's (the next
            # actor can only start after the removal above): waiting in its inbox,
            # held for its turn, or in its hands when it was stopped (a partition
            # lost mid-command). Left unsettled, the heartbeat would keep one in
            # progress for ever and the partition's new owner would never get it.
            _drain(running.inbox)
            actor.held.clear()
            if self._winding_down:
                # cut while the feeds close: what they still bring is held with the rest
                await self._feeds_closed.wait()
            leftovers = sorted(
                (d for d in self._pending if d.conversation_id == cid), key=Delivery.order
            )
            for delivery in leftovers:
                with contextlib.suppress(nats.errors.Error):
                    await asyncio.shield(delivery.nak())
            if (
                snapshot is not None
                and snapshots is not None
                and not await snapshots.save(snapshot)
            ):
                self.idle_states.unsaved(cid, snapshot)

    async def _stop(self, tasks: asyncio.TaskGroup, fetching: asyncio.Event) -> None:
        """Let running turns finish within the grace period, then cut the rest.

        The feeds go on reading meanwhile, so a cancel of a running turn still stops
        it (a user who presses Stop is not made to wait out the grace, nor billed
        for it); every other command is held, not started. Then the feeds close,
        and nothing is given back before they have, or it could come back out of
        order (see actors/command_feed.py).

        The turns still running are cut as the feeds close, not after: with NATS not
        answering, each waits for as long as it may (a feed for its requests to
        expire, a turn for its end to be appended), and one after the other they
        took the worker past its stop's deadline. What a cut actor leaves is given
        back once the feeds are closed."""
        loops = list(self._loops.values())
        try:
            try:
                async with asyncio.timeout(self._grace_s):
                    # shutdown only: a poll beats an event every actor would have to set
                    while any(not r.actor.idle for r in self._actors.values()):  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            except TimeoutError:
                log.warning(
                    "turns still running after the grace period are ended as interrupted",
                    extra={"turns": sum(1 for r in self._actors.values() if r.actor.runner)},
                )
            fetching.set()
            for running in list(self._actors.values()):
                running.task.cancel()
            for loop in loops:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loop
        finally:
            # whatever ended the stop (a cancel from outside, too): a cut actor waits
            # for this before it gives its commands back, and would wait for ever
            self._feeds_closed.set()

    async def _give_back_all(self) -> None:
        """Every command not settled goes back to JetStream, in the order it was sent."""
        for delivery in sorted(self._pending, key=Delivery.order):
            with contextlib.suppress(nats.errors.Error):
                await asyncio.shield(delivery.nak())

    async def _heartbeat(self) -> None:
        """Held commands stay in progress; running turns keep their record in Redis."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for delivery in list(self._pending):
                with contextlib.suppress(nats.errors.Error):
                    await delivery.in_progress()
            running = [c for c, r in self._actors.items() if r.actor.runner is not None]
            # a running turn's record that Redis lost is written again (Redis is disposable)
            records = {
                c: record
                for c, r in self._actors.items()
                if (record := r.actor.running_record()) is not None
            }
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._ctx.turns.refresh_all(running, self._ctx.worker_id, records)


async def _unless_stopped(
    tick: Coroutine[Any, Any, tuple[set[int], set[int]]], stopping: asyncio.Event
) -> tuple[set[int], set[int]] | None:
    """The lease tick's outcome, or None (the tick cancelled) once `stopping` is set:
    with NATS away, a tick waits out a timeout on each of its requests (10 s), and a
    worker told to stop meanwhile would wait for it before it even began to stop."""
    ticking = asyncio.ensure_future(tick)
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((ticking, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not ticking.done():
            # its outcome, should a library swallow the cancel, is nobody's
            ticking.add_done_callback(lambda t: t.cancelled() or t.exception())
            ticking.cancel()
    return ticking.result() if ticking.done() and not ticking.cancelled() else None


def _still_not_cancelled() -> None:
    """Raise the cancellation a library swallowed. asyncio.wait_for (which nats.py's
    requests use) can lose a cancel that comes as its future completes: a partition
    loop that failed cancelled the worker's main loop during a lease renewal, the
    loop went on, and the worker served nothing until it was stopped, never
    restarted."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _drain(inbox: Inbox) -> list[tuple[AnyCommand | None, Settlement | None]]:
    out: list[tuple[AnyCommand | None, Settlement | None]] = []
    while not inbox.empty():
        out.append(inbox.get_nowait())
    return out
