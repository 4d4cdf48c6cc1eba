"""Per-user limits a public endpoint needs, kept in Redis so every edge counts together.

- **Rate**: a token bucket per user (`rate_per_s` sustained, `rate_burst` at
  once), one Lua script, Redis's own clock, so edges with skewed clocks agree.
  Over it: 429 `rate_limited` with `Retry-After`. If Redis cannot be reached the
  request goes through (logged): losing the limiter must not take the API down
  with it; the routes that need Redis answer 503 on their own.
- **Open streams**: at most `max_streams_per_user` SSE responses at once.
- **Turns**: at most `max_turns_per_user` messages whose turn has not ended.

The two caps are leases: a sorted set per user and kind whose members expire
(`lease_s`) unless the edge holding them renews them, so an edge that dies frees
its users' slots within a lease instead of holding them for ever. A stream's
lease lives as long as its request. A message's lease is taken before its
command is published and handed, once published, to a `TurnWatcher`: a
subscription to the conversation's hub with no socket, which releases it when
the turn ends (its `done`, a rejection, or the stall check's verdict), whether
or not anyone still watches the stream.

What may not enter: the routes themselves. Routes that stream or start turns
are listed in `STREAM_ROUTES` and `TURN_ROUTES`; the middleware does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from api.context import CLAIMS, CONFIG, METRICS, wants_json
from api.errors import ApiError, Handler
from api.hub import Delivery, Hubs, PendingCommand, Subscription, TurnFilter, watch
from api.sse import Envelope, Position
from events.errors import describe
from events.ids import new_id

log = logging.getLogger(__name__)

# Requests that answer with an SSE stream: always, or unless the client asks for JSON.
STREAM_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/conversations/{id}/events"): "always",
    ("POST", "/v1/conversations/{id}/messages"): "unless_json",
    ("PATCH", "/v1/conversations/{id}/messages/{mid}"): "unless_json",
    ("POST", "/v1/conversations/{id}/messages/{mid}/regenerate"): "unless_json",
    ("POST", "/v1/ai-sdk/chat"): "always",
    ("GET", "/v1/ai-sdk/chat/{id}/stream"): "always",
}
# Requests that may start a turn; the handler hands the slot over with `hold_turn`.
TURN_ROUTES = frozenset(
    {
        ("POST", "/v1/conversations/{id}/messages"),
        ("PATCH", "/v1/conversations/{id}/messages/{mid}"),
        ("POST", "/v1/conversations/{id}/messages/{mid}/regenerate"),
        ("POST", "/v1/ai-sdk/chat"),
    }
)

_REPLICATE = "if redis.replicate_commands then redis.replicate_commands() end\n"
_NOW_MS = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS[1] the bucket; ARGV: rate per second, burst. Returns {allowed, ms to wait}.
_TAKE = (
    _REPLICATE
    + _NOW_MS
    + """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed, wait = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""
)

# KEYS[1] the user's leases; ARGV: member, cap, lease ms. 1 = held, 0 = at the cap.
_ACQUIRE = (
    _REPLICATE
    + _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[2])
if cap > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""
)

# KEYS: leases; ARGV[1] lease ms, then one member per key. Renews those still held.
_RENEW = (
    _REPLICATE
    + _NOW_MS
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, 2 * lease)
end
return #KEYS
"""
)


class RateLimiter:
    def __init__(self, client: aioredis.Redis, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._take = client.register_script(_TAKE)

    async def take(self, user_id: str) -> float:
        """0 if the user may go on, else the seconds to wait."""
        if self._rate <= 0:
            return 0.0
        allowed, wait_ms = await self._take(
            keys=[f"parley:rate:{user_id}"], args=[self._rate, self._burst]
        )
        return 0.0 if int(allowed) else int(wait_ms) / 1000


class Leases:
    """Capped sets of leases per user, renewed while this process holds them."""

    def __init__(self, client: aioredis.Redis, lease_s: float) -> None:
        self._client = client
        self._lease_ms = int(lease_s * 1000)
        self.renew_every_s = lease_s / 3
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self.held: dict[tuple[str, str], None] = {}  # (key, member), insertion-ordered

    @staticmethod
    def key(kind: str, user_id: str) -> str:
        return f"parley:lease:{kind}:{user_id}"

    async def acquire(self, kind: str, user_id: str, member: str, cap: int) -> bool:
        key = self.key(kind, user_id)
        if not int(await self._acquire(keys=[key], args=[member, cap, self._lease_ms])):
            return False
        self.held[(key, member)] = None
        return True

    async def release(self, kind: str, user_id: str, member: str) -> None:
        key = self.key(kind, user_id)
        self.held.pop((key, member), None)
        await self._client.zrem(key, member)

    async def renew(self) -> None:
        held = list(self.held)
        for start in range(0, len(held), 500):
            part = held[start : start + 500]
            await self._renew(
                keys=[key for key, _ in part], args=[self._lease_ms, *(m for _, m in part)]
            )

    async def keep(self, stopping: asyncio.Event) -> None:
        """Renew this process's leases until `stopping`."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_every_s):
                    await stopping.wait()
            try:
                await self.renew()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                log.warning("cannot renew leases", extra={"error": describe(err)})


class TurnWatcher(Subscription):
    """Holds a user's turn slot until the turn that answers their message ends."""

    __slots__ = ()

    def take(self, delivery: Delivery) -> None:
        if self.turn is not None and self.turn.admit(delivery.stored) and delivery.ends_turn:
            self.end("done")

    def take_stall(self, error: Envelope) -> None:
        self.end("stalled")


class TurnSlot:
    """The turn slot a request took; `hold_turn` hands it to a watcher."""

    __slots__ = ("handed", "member")

    def __init__(self, member: str) -> None:
        self.member = member
        self.handed = False


class Limits:
    """The edge's limiter and leases, and the watchers that hold turn slots."""

    def __init__(
        self,
        client: aioredis.Redis,
        hubs: Hubs,
        *,
        rate_per_s: float,
        burst: int,
        lease_s: float,
        max_turn_s: float = 3600.0,
    ) -> None:
        self.rate = RateLimiter(client, rate_per_s, burst)
        self.leases = Leases(client, lease_s)
        self._hubs = hubs
        self._max_turn_s = max_turn_s
        self._watchers: dict[str, asyncio.Task[None]] = {}  # by message id
        self._stopping = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._keeper = asyncio.create_task(self.leases.keep(self._stopping), name="lease-keeper")

    async def close(self) -> None:
        self._stopping.set()
        tasks = [*self._watchers.values(), *([self._keeper] if self._keeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def watching(self, message_id: str) -> bool:
        return message_id in self._watchers

    def watch(
        self,
        user_id: str,
        member: str,
        conversation_id: str,
        after: int,
        message_id: str,
        command: PendingCommand,
    ) -> None:
        task = asyncio.create_task(
            self._watch(user_id, member, conversation_id, after, message_id, command),
            name=f"turn-slot-{message_id}",
        )
        self._watchers[message_id] = task
        task.add_done_callback(lambda _: self._watchers.pop(message_id, None))

    async def _watch(
        self,
        user_id: str,
        member: str,
        conversation_id: str,
        after: int,
        message_id: str,
        command: PendingCommand,
    ) -> None:
        turn = TurnFilter(message_id)
        seen = after
        try:
            async with asyncio.timeout(self._max_turn_s):
                while True:
                    watcher = TurnWatcher(Position(seq=seen), turn=turn, command=command)
                    reason = await self._follow(conversation_id, watcher)
                    if reason != "broken":
                        return
                    seen = max(seen, watcher.seen)
                    await asyncio.sleep(1.0)  # the broker is back soon; look again
        except TimeoutError:
            log.warning(
                "turn slot held too long; released", extra={"conversation_id": conversation_id}
            )
        finally:
            try:
                await self.leases.release("turns", user_id, member)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                log.warning(
                    "cannot release a turn slot; it expires", extra={"error": describe(err)}
                )

    async def _follow(self, conversation_id: str, watcher: TurnWatcher) -> str:
        return await watch(self._hubs, conversation_id, watcher)


LIMITS = web.AppKey("limits", Limits)
TURN_SLOT = web.RequestKey("turn_slot", TurnSlot)


def hold_turn(
    request: web.Request, conversation_id: str, message_id: str, after: int, command_seq: int
) -> None:
    """Called by a route once a message's command is published: the user's turn slot
    stays taken until that message's turn ends (see the module docstring)."""
    slot = request.get(TURN_SLOT)
    limits = request.app[LIMITS]
    if slot is None or limits.watching(message_id):
        return  # no cap, or a retry of a message already watched here: the slot is freed
    slot.handed = True
    limits.watch(
        request[CLAIMS].sub,
        slot.member,
        conversation_id,
        after,
        message_id,
        PendingCommand(stream_seq=command_seq),
    )


_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


async def _acquire(limits: Limits, kind: str, user: str, member: str, cap: int) -> bool:
    """A slot under the cap. With Redis away the caps cannot be counted, and like the
    rate limiter they let the request through: losing Redis loosens limits, it does
    not stop conversations (README: what degrades while Redis is away)."""
    try:
        return await limits.leases.acquire(kind, user, member, cap)
    except _REDIS_DOWN as err:
        log.warning(
            "limit unavailable; request let through", extra={"limit": kind, "error": describe(err)}
        )
        return True


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    claims = request.get(CLAIMS)
    if claims is None:
        return await handler(request)  # a public path
    app = request.app
    config = app[CONFIG]
    limits = app[LIMITS]
    metrics = app[METRICS]
    try:
        wait = await limits.rate.take(claims.sub)
    except _REDIS_DOWN as err:
        log.warning("rate limiter unavailable; request let through", extra={"error": describe(err)})
        wait = 0.0
    if wait > 0:
        metrics.limited("rate")
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests; at most {config.limits.rate_per_s:g} per second "
            f"(bursts of {config.limits.rate_burst}); retry in {wait:.2f} s",
            retry_after=math.ceil(wait),
        )
    resource = request.match_info.route.resource
    route = (request.method, resource.canonical if resource is not None else "")
    streams = STREAM_ROUTES.get(route)
    held: list[tuple[str, str]] = []
    try:
        streaming = streams == "always" or (streams is not None and not wants_json(request))
        if streaming and config.limits.max_streams_per_user > 0:
            member = new_id()
            if not await _acquire(
                limits, "streams", claims.sub, member, config.limits.max_streams_per_user
            ):
                metrics.limited("streams")
                raise ApiError(
                    429,
                    "too_many_streams",
                    f"at most {config.limits.max_streams_per_user} open event streams per user; "
                    "close one first",
                    retry_after=1,
                )
            held.append(("streams", member))
        if route in TURN_ROUTES and config.limits.max_turns_per_user > 0:
            member = new_id()
            if not await _acquire(
                limits, "turns", claims.sub, member, config.limits.max_turns_per_user
            ):
                metrics.limited("turns")
                raise ApiError(
                    429,
                    "too_many_turns",
                    f"at most {config.limits.max_turns_per_user} messages per user may wait for "
                    "their answer at once; wait for one to finish",
                    retry_after=1,
                )
            request[TURN_SLOT] = TurnSlot(member)
        return await handler(request)
    finally:
        slot = request.get(TURN_SLOT)
        if slot is not None and not slot.handed:
            held.append(("turns", slot.member))
        for kind, member in held:
            try:
                await limits.leases.release(kind, claims.sub, member)
            except _REDIS_DOWN as err:
                log.warning("cannot release a lease; it expires", extra={"error": describe(err)})
