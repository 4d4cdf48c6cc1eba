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

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo

_KEY = "parley:turn:{}"

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
_REFRESH = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['worker'] == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def redis_client(url: str, *, max_connections: int = 256, wait_s: float = 5.0) -> aioredis.Redis:
    """A Redis client whose pool waits (up to `wait_s`) for a free connection.

    The default pool refuses with MaxConnectionsError as soon as it is empty, so
    a burst of requests failed instead of queueing for a few milliseconds.

    A command whose connection fails is tried once more, at once, on a new one:
    after a Redis restart every pooled connection is dead, and without this each
    would fail one request before it was replaced. What is sent here may run twice
    after a reply was lost (SET, SET NX, ZADD, a token taken): harmless for each.
    A Redis that is down still fails fast (two refused connects).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_s,
        retry=Retry(NoBackoff(), 1),
        driver_info=_DRIVER_INFO,
    )
    return aioredis.Redis(connection_pool=pool)


class TurnRecord(msgspec.Struct, frozen=True):
    worker: str
    turn_id: str
    after: int  # log position just before the turn's first event
    at: int


class TurnRegistry:
    def __init__(self, redis: aioredis.Redis, *, lease_ms: int = 15_000) -> None:
        self._redis = redis
        self.lease_ms = lease_ms
        self._release = redis.register_script(_RELEASE)
        self._refresh = redis.register_script(_REFRESH)

    async def put(self, conversation_id: str, record: TurnRecord) -> None:
        """Record the running turn (the partition's owner is the only writer: no NX)."""
        await self._redis.set(
            _KEY.format(conversation_id), msgspec.json.encode(record), px=self.lease_ms
        )

    async def claim(self, conversation_id: str, record: TurnRecord) -> bool:
        ok = await self._redis.set(
            _KEY.format(conversation_id), msgspec.json.encode(record), nx=True, px=self.lease_ms
        )
        return bool(ok)

    async def refresh(self, conversation_id: str, worker: str) -> bool:
        return bool(
            await self._refresh(keys=[_KEY.format(conversation_id)], args=[worker, self.lease_ms])
        )

    async def release(self, conversation_id: str, worker: str) -> None:
        await self._release(keys=[_KEY.format(conversation_id)], args=[worker])

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
