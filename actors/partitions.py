"""Which worker serves which commands: partition leases in a NATS key-value bucket.

Commands are published on `chat.cmd.<partition>.<conversation>` (events/subjects.py),
so all of a conversation's commands fall in one partition, and each partition
has one durable consumer. A worker serves a partition only while it holds that
partition's lease: a key `partition.<n>` it created, renewed every few seconds
by compare-and-set on its revision, and gone `ttl_s` after its holder stops
renewing (the bucket's max age). So one conversation is served by one worker at
a time, its commands in order; if a worker dies, another takes its partitions
within `ttl_s` and the commands it held are redelivered there.

Workers share the partitions fairly: each announces itself (`worker.<id>`),
takes free partitions up to its fair share (partitions / live workers, rounded
up) and gives back a partition above that share only when nothing of it is
running, so a new worker gets work without any turn being cut.

Leases live in NATS, not Redis: losing Redis must not stop turns. The log's
single-writer check stays the last word: two workers that briefly both think
they own a partition cannot interleave a conversation's events.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from events.errors import describe
from events.subjects import partition_of

log = logging.getLogger(__name__)
T = TypeVar("T")

BUCKET = "parley_workers"
_STREAM = f"KV_{BUCKET}"  # the stream that holds a bucket's entries
# Every worker's presence key, `worker.<id>`; an id may hold dots (a host name).
_PRESENCES = f"$KV.{BUCKET}.worker.>"
# The header of markers the server writes itself (nats-server 2.11+), named here:
# older nats-py releases lack the constant.
_MARKER_REASON = "Nats-Marker-Reason"

# What the bucket's requests raise while NATS is away or the bucket's stream
# elects a new leader (a node died): a tick that meets one is tried again.
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
)
# How long a stopping worker waits for its leases' release.
_RELEASE_WITHIN_S = 2.0
# Leases not renewed for this share of their lifetime are given up: past it,
# another worker may take them before we could renew.
_KEEP_FOR = 0.8


class PartitionLeases:
    def __init__(
        self,
        js: JetStreamContext,
        worker_id: str,
        partitions: int,
        *,
        ttl_s: float = 15.0,
        replicas: int = 1,
    ) -> None:
        self._js = js
        self.worker_id = worker_id
        self.partitions = partitions
        self.ttl_s = ttl_s
        self._replicas = replicas
        self.owned: dict[int, int] = {}  # partition -> the revision of our lease
        self._renewed_at = time.monotonic()  # when the last complete renewal began
        self._waiting: list[asyncio.Future[None]] = []  # for the next complete renewal
        # A tick that did not complete (cut short as the worker stops, or failed) may
        # have taken or renewed leases that `owned` does not show: sent, never answered.
        self._unsure = False
        # Requests to the bucket still on their way: a tick cut short leaves them to
        # land, and `release_all` waits for them before it reads what is ours.
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        try:
            self._kv = await self._js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            # Made here only if absent; an existing bucket keeps the replicas, limits and
            # placement its operator gave it (its age limit is read below).
            config = api.KeyValueConfig(
                bucket=BUCKET, ttl=self.ttl_s, history=1, replicas=self._replicas
            )
            try:
                self._kv = await self._js.create_key_value(config=config)
            except nats.js.errors.BadRequestError:  # another worker created it first
                self._kv = await self._js.key_value(BUCKET)
        # The bucket's age limit is the lease time, whoever created it: renew well within it.
        ttl = (await self._kv.status()).ttl
        if ttl:
            self.ttl_s = ttl

    # actors.writer's `WriteGate`: what an actor may append to

    def current(self) -> bool:
        """Whether the leases held were renewed recently enough that nobody can have
        taken one: not so after this process was paused for longer."""
        return time.monotonic() - self._renewed_at < _KEEP_FOR * self.ttl_s

    def holds(self, conversation_id: str) -> bool:
        return self.current() and partition_of(conversation_id, self.partitions) in self.owned

    async def renewed(self, conversation_id: str) -> bool:
        """Whether the conversation's partition is ours once the leases are current
        again: after the next complete renewal, which may find one taken."""
        while not self.current():
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            await waiter
        return partition_of(conversation_id, self.partitions) in self.owned

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 5

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("PartitionLeases.open() first")
        return self._kv

    async def tick(
        self, busy: Callable[[int], bool], *, take: bool = True
    ) -> tuple[set[int], set[int]]:
        """Renew, take and give back leases; returns the partitions gained and lost.
        With `take` false (a stopping worker's grace period) only renew what it holds.

        A tick that cannot reach the bucket (NATS away, a leader election) keeps
        what it holds: nobody else can take a lease from a bucket nobody reaches,
        and giving them up would cut every running turn, whose events wait for
        NATS in the worker. Once a lease may have lapsed, the `WriteGate` holds
        every append until a renewal gets through and says which partitions are
        still ours: a lapsed one nobody took is taken again, one another worker
        took is lost (`_tick`), as after a pause.
        """
        self._unsure = True
        try:
            ticked = await self._tick(busy, take)
            self._unsure = False
            return ticked
        except _TRANSIENT as err:
            if self.current():
                log.warning(
                    "partition leases not renewed; trying again", extra={"error": describe(err)}
                )
            else:
                log.warning(
                    "partition leases not renewed in time; appends wait until a renewal"
                    " says which are still ours",
                    extra={"error": describe(err), "partitions": sorted(self.owned)},
                )
            return set(), set()

    async def _tick(self, busy: Callable[[int], bool], take: bool) -> tuple[set[int], set[int]]:
        began = time.monotonic()
        gained: set[int] = set()
        lost: set[int] = set()
        await self._landing(self.kv.put(f"worker.{self.worker_id}", b""))
        # All renewals at once: one after the other, 16 round trips through a busy
        # event loop took longer than the lease itself under `bench capacity` (leases
        # expired, every running turn of the worker was cut as `interrupted`).
        owned = list(self.owned.items())
        outcomes = await asyncio.gather(
            *(
                self._landing(
                    self.kv.update(_key(partition), self.worker_id.encode(), last=revision)
                )
                for partition, revision in owned
            ),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        for (partition, _), outcome in zip(owned, outcomes, strict=True):
            if isinstance(outcome, int):
                self.owned[partition] = outcome
            elif isinstance(outcome, nats.js.errors.KeyWrongLastSequenceError):
                ours = await self._own_revision(partition) or await self._take_lapsed(partition)
                if ours is not None:
                    self.owned[partition] = ours
                    continue
                # it expired (we were away too long) and someone else holds it now
                del self.owned[partition]
                lost.add(partition)
                log.warning("partition lease lost", extra={"partition": partition})
            elif isinstance(outcome, BaseException):
                failure = failure or outcome
        if failure is not None:
            raise failure
        self._renewed_at = began
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)
        if not take:
            return gained, lost
        share = math.ceil(self.partitions / max(1, await self._live_workers()))
        if len(self.owned) < share:
            free = [p for p in range(self.partitions) if p not in self.owned]
            random.shuffle(free)
            for partition in free:
                if len(self.owned) >= share:
                    break
                try:
                    self.owned[partition] = await self._landing(
                        self.kv.create(_key(partition), self.worker_id.encode())
                    )
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # held by another worker
                gained.add(partition)
        elif len(self.owned) > share:
            for partition in [p for p in self.owned if not busy(p)][: len(self.owned) - share]:
                await self._release(partition)
                lost.add(partition)
        return gained, lost

    async def _take_lapsed(self, partition: int) -> int | None:
        """A lease of ours that expired while we were away (a paused process) and that
        nobody took meanwhile: taken again, its running turns go on rather than being
        cut. Its revision, or None when another worker holds it now."""
        try:
            revision = await self._landing(self.kv.create(_key(partition), self.worker_id.encode()))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        log.warning("partition lease lapsed and was taken again", extra={"partition": partition})
        return int(revision)

    async def _own_revision(self, partition: int) -> int | None:
        """The lease's revision if it still names this worker (our previous renewal
        landed but its answer was lost: a node died meanwhile), else None."""
        try:
            entry = await self.kv.get(_key(partition))
        except nats.js.errors.NotFoundError:  # absent, deleted or expired
            return None
        if entry.value != self.worker_id.encode() or entry.revision is None:
            return None
        return int(entry.revision)

    async def release_all(self) -> None:
        """Every lease given back, so that other workers take the partitions at once
        rather than when the leases lapse. At most `_RELEASE_WITHIN_S`: a worker that
        stops while NATS is away leaves them to lapse (one after the other, each
        request waiting out its timeout, took 16 x 5 s).

        After a tick that did not complete, every lease that names this worker goes,
        whatever `owned` says: a lease the tick took or renewed without hearing back
        was skipped, or refused for its stale revision, and stayed held by a worker
        that was gone until it lapsed."""
        held, self.owned = self.owned, {}
        releases: list[Awaitable[object]]
        if self._unsure:
            releases = [self._release_if_ours(p) for p in range(self.partitions)]
        else:
            releases = [self.kv.delete(_key(p), last=revision) for p, revision in held.items()]
        releases.append(self.kv.delete(f"worker.{self.worker_id}"))
        try:
            async with asyncio.timeout(_RELEASE_WITHIN_S):
                if self._in_flight:
                    # what a tick cut short sent lands first: the reads below see it
                    await asyncio.wait(set(self._in_flight))
                outcomes = await asyncio.gather(*releases, return_exceptions=True)
        except TimeoutError:
            outcomes = [TimeoutError(f"no answer within {_RELEASE_WITHIN_S:g} s")]
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, nats.errors.Error | TimeoutError):
                raise failure
        if failures:
            log.info(
                "partition leases not released; they lapse",
                extra={"within_s": self.ttl_s, "error": describe(failures[0])},
            )

    def _landing(self, request: Awaitable[T]) -> Awaitable[T]:
        """`request` to the bucket, run to its answer even when the tick awaiting it is
        cut short. A lease created or renewed after `release_all` read it as not ours
        stayed held by a worker that was gone, until it lapsed (seen in CI)."""
        task = asyncio.ensure_future(request)
        self._in_flight.add(task)
        task.add_done_callback(self._landed)
        return asyncio.shield(task)

    def _landed(self, task: asyncio.Future[Any]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled():
            task.exception()  # read: what a cut tick no longer awaits is not worth a warning

    async def _release_if_ours(self, partition: int) -> None:
        revision = await self._own_revision(partition)
        if revision is not None:
            await self.kv.delete(_key(partition), last=revision)

    async def _release(self, partition: int) -> None:
        revision = self.owned.pop(partition)
        try:
            await self.kv.delete(_key(partition), last=revision)
        except nats.errors.Error as err:
            log.info(
                "partition lease not released; it expires",
                extra={"partition": partition, "error": describe(err)},
            )

    async def _live_workers(self) -> int:
        """The workers whose presence key holds a value: one that stopped left a delete
        marker, one that died has none left (the bucket's age limit removed it).

        Asked of the bucket's stream in plain requests, the presences it holds and the
        latest entry of each, not with `kv.keys()`: that made a consumer on the stream
        at every tick, which nats-py only unsubscribes from, so the server kept each
        for 5 minutes (measured: some 100 per idle worker, 1,600 for 16 workers).
        """
        info = await self._js.stream_info(_STREAM, subjects_filter=_PRESENCES)
        subjects = list(info.state.subjects or {})
        outcomes = await asyncio.gather(
            *(self._js.get_last_msg(_STREAM, subject) for subject in subjects),
            return_exceptions=True,
        )
        live = 0
        for outcome in outcomes:
            if isinstance(outcome, nats.js.errors.NotFoundError):
                continue  # expired since it was listed
            if isinstance(outcome, BaseException):
                raise outcome
            live += _holds_value(outcome.headers or {})
        return max(1, live)


def _holds_value(headers: dict[str, str]) -> bool:
    """Whether a key's latest entry is a value rather than the marker of a delete or
    purge (KV-Operation) or of the server's own removal (Nats-Marker-Reason, on
    buckets that keep such markers)."""
    return headers.get(KV_OP) not in (KV_DEL, KV_PURGE) and _MARKER_REASON not in headers


def _key(partition: int) -> str:
    return f"partition.{partition}"
