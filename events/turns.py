"""Which turn is active where: a small, disposable record in Redis.

The worker that runs a turn writes `parley:turn:<conversation>` (with a lease)
once the turn's `started` is in the log, refreshes the lease while the turn
runs and deletes it when the turn ends. The edge reads it to answer "where
does the active turn start" and "is there a turn to cancel".

It is a hint, never the truth: who may run a conversation's turns is decided by
partition ownership (actors/partitions.py) and the log's single-writer check,
and whether a turn runs by the log. Losing Redis loses nothing of value: turns
run without the record, and the lease of a stale one expires.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo

_KEY = "parley:turn:{}"
# An idempotency key's record, `parley:idem:<conversation>:<scope>` (api.turn_routes):
# it holds the request's message id and the digest of its text
_IDEM_KEY = "parley:idem:{}:"


def idempotency_prefix(conversation_id: str) -> str:
    """What the Redis keys of the conversation's idempotency records begin with."""
    return _IDEM_KEY.format(conversation_id)


# What every connection tells the server about its client (CLIENT SETINFO). Made
# once: left to each connection, redis-py reads its own package metadata with
# importlib.metadata on every connection it opens, 0.4 ms of CPU each (1.4 under
# load), paid by every request that finds the pool short of a connection, as the
# first burst after a start does a hundred times.
_DRIVER_INFO = DriverInfo()

# Delete or refresh the key only while it still names this worker: a worker whose
# lease expired must not remove the record of the worker that took over.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['worker'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_RELEASE_RECORD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_REFRESH = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['worker'] == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# The same, and a record that is gone (flushed, evicted, a Redis restarted empty)
# written again from what the worker knows (ARGV[3]): 2 when it was restored.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 2
end
if cjson.decode(current)['worker'] == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


# A process's Redis connections at most. Each holds about 32 KB of the process's
# memory, and a burst opens as many as it has commands in flight: 1,000 SSE viewers
# joining at once (each reads its conversation's turn record) filled a pool of 256,
# 8 MB kept for good, which `bench fanout` counted as 8 KB per viewer. Redis answers
# one command at a time whatever the connections, so beyond a few dozen more of
# them buy no throughput; the burst waits its turn for a millisecond or two.
POOL_CONNECTIONS = 64


# Every command here is small (no blocking reads): 2 s is a hung server, or a
# process so loaded that the turn record is the least of its delays.
SOCKET_TIMEOUT_S = 2.0


def redis_client(
    url: str, *, max_connections: int = POOL_CONNECTIONS, wait_s: float = 5.0
) -> aioredis.Redis:
    """A Redis client whose pool waits (up to `wait_s`) for a free connection.

    The default pool refuses with MaxConnectionsError as soon as it is empty, so
    a burst of requests failed instead of queueing for a few milliseconds.

    A command whose connection fails is tried once more, at once, on a new one:
    after a Redis restart every pooled connection is dead, and without this each
    would fail one request before it was replaced. What is sent here may run twice
    after a reply was lost (SET, SET NX, ZADD, a token taken): harmless for each.
    A Redis that is down still fails fast (two refused connects). One that hangs
    (stopped, swapping) fails a command after `SOCKET_TIMEOUT_S`, not tried again:
    with redis-py's defaults (5 s, tried twice) a project's turn waited 10 s for
    its turn record, and a conversation's details 10 s for their 503.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_s,
        socket_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        driver_info=_DRIVER_INFO,
    )
    return aioredis.Redis(connection_pool=pool)


class TurnRecord(msgspec.Struct, frozen=True):
    worker: str
    turn_id: str
    after: int  # log position just before the turn's first event
    at: int


# A running turn's record lives this long unless its worker renews it (every 5 s,
# actors.worker's heartbeat). It must outlive a dead worker's partition leases
# (15 s) and the next owner's taking them over: that owner finds the conversations
# whose turn to end by these records (`_recover`). At 15 s they often expired
# first, and the orphan waited for its command's redelivery (30 s) instead.
RECORD_LEASE_MS = 30_000


class TurnRegistry:
    """The turn records of one process.

    A worker writes a record when a turn is announced, again when it starts, and
    removes it at the end: a thousand turns at once make hundreds of writes a
    second, each a round trip through redis-py's pool that cost the worker 12%
    of its CPU under `parley bench capacity` (py-spy). Writes made in the same
    pass of the event loop therefore leave together, as one pipeline: one
    connection, one socket write, one read of the answers (`_Batch`).
    """

    def __init__(self, redis: aioredis.Redis, *, lease_ms: int = RECORD_LEASE_MS) -> None:
        self._redis = redis
        self.lease_ms = lease_ms
        self._batch = _Batch(redis)

    async def put(self, conversation_id: str, record: TurnRecord) -> None:
        """Record the running turn (the partition's owner is the only writer: no NX)."""
        key, value = _KEY.format(conversation_id), msgspec.json.encode(record)
        await self._batch.send(lambda pipe: pipe.set(key, value, px=self.lease_ms))

    async def claim(self, conversation_id: str, record: TurnRecord) -> bool:
        ok = await self._redis.set(
            _KEY.format(conversation_id), msgspec.json.encode(record), nx=True, px=self.lease_ms
        )
        return bool(ok)

    async def refresh(self, conversation_id: str, worker: str) -> bool:
        key = _KEY.format(conversation_id)
        return bool(
            await self._batch.send(lambda pipe: pipe.eval(_REFRESH, 1, key, worker, self.lease_ms))
        )

    async def renew(self, conversation_id: str, record: TurnRecord) -> bool:
        """Refresh the lease of the record while it names `record.worker`, and write
        `record` again when there is none: Redis is disposable, and a record it lost
        (FLUSHALL, an eviction, a restart without its data) left a running turn
        unknown to the edges until it ended, so that a cancel answered "no turn is
        running" and a viewer joining without a position missed its beginning."""
        key, value = _KEY.format(conversation_id), msgspec.json.encode(record)
        return bool(
            await self._batch.send(
                lambda pipe: pipe.eval(_RENEW, 1, key, record.worker, self.lease_ms, value)
            )
        )

    async def refresh_all(
        self, conversation_ids: list[str], worker: str, records: dict[str, TurnRecord] | None = None
    ) -> None:
        """Refresh the leases of these records (those still this worker's), together;
        those given in `records` are written again if Redis lost them (`renew`)."""
        known = records or {}
        await asyncio.gather(
            *(
                self.renew(c, known[c]) if c in known else self.refresh(c, worker)
                for c in conversation_ids
            )
        )

    async def release(
        self, conversation_id: str, worker: str, written: TurnRecord | None = None
    ) -> None:
        """Remove the record while it names `worker`; given the record this worker
        wrote last, only while it is that record.

        Writes sent in different passes of the loop leave in different pipelines,
        on connections of their own, and one that waits for a connection can
        reach Redis after a later one: a turn's release overtaken by the next
        request's announcement deleted the announcement. Compared with what it
        releases, a late release leaves a newer record alone, and the next
        request need not wait for it."""
        key = _KEY.format(conversation_id)
        if written is None:
            await self._batch.send(lambda pipe: pipe.eval(_RELEASE, 1, key, worker))
            return
        value = msgspec.json.encode(written)
        await self._batch.send(lambda pipe: pipe.eval(_RELEASE_RECORD, 1, key, value))

    async def forget_requests(self, conversation_id: str) -> None:
        """Remove the idempotency records of the conversation's requests (their message
        ids and the digests of their text), when it is deleted: left, they would stay
        for their whole TTL (a day). SCAN, not KEYS: Redis is not blocked meanwhile."""
        match = idempotency_prefix(conversation_id) + "*"
        keys = [key async for key in self._redis.scan_iter(match=match, count=1000)]
        for start in range(0, len(keys), 500):
            await self._redis.delete(*keys[start : start + 500])

    async def conversations(self) -> list[str]:
        """The conversations that have a turn record (SCAN: no blocking KEYS)."""
        prefix = _KEY.format("")
        return [
            key.decode()[len(prefix) :]
            async for key in self._redis.scan_iter(match=prefix + "*", count=500)
        ]

    async def get(self, conversation_id: str) -> TurnRecord | None:
        raw = await self._redis.get(_KEY.format(conversation_id))
        if raw is None:
            return None
        return msgspec.json.decode(raw, type=TurnRecord)

    async def get_many(self, conversation_ids: list[str]) -> list[TurnRecord | None]:
        """The records of several conversations, in their order, in one round trip."""
        if not conversation_ids:
            return []
        raws = await self._redis.mget([_KEY.format(c) for c in conversation_ids])
        return [None if raw is None else msgspec.json.decode(raw, type=TurnRecord) for raw in raws]


# a command to add to the pipeline, and where its answer goes
# (on a pipeline it queues the command; on the client it returns its awaitable)
_Waiting = tuple[Callable[[Any], Any], "asyncio.Future[Any]"]


class _Batch:
    """Commands sent in the same pass of the event loop leave in one pipeline.

    The first command of a pass starts the pipeline's task; the others made
    before that task runs join it. Each caller gets its own command's answer,
    or its error; a broken connection fails them all (each caller handles
    Redis being away as it always did). Scripts go as EVAL, not EVALSHA: a
    pipeline holding registered scripts asks Redis whether it knows them, a
    round trip more on every pipeline.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiting: list[_Waiting] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, add: Callable[[Any], Any]) -> Any:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((add, answer))
        if len(self._waiting) == 1:
            loop.call_soon(self._start)
        return await answer

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, batch))

    def _finished(self, batch: list[_Waiting], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        for _, answer in batch:
            if not answer.done():
                answer.cancel()  # no answer will come: the process is stopping

    async def _execute(self, batch: list[_Waiting]) -> None:
        try:
            if len(batch) == 1:  # alone: as a plain command, which costs less than a pipeline
                results = [await batch[0][0](self._redis)]
            else:
                pipe = self._redis.pipeline(transaction=False)
                for add, _ in batch:
                    add(pipe)
                results = await pipe.execute(raise_on_error=False)
        except Exception as err:  # Redis away: every caller hears it
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(err)
            return
        for (_, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue  # its caller gave up waiting
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)
